"""Classifier-free guidance and the training-free safety guards, as sampler denoisers.

A guard turns a conditional model `model(x (N,H,W,C), t (N,), states (N,T,D)) -> output` into the
`Denoiser` that `samplers.run_sampler` integrates. Notation: e(c) is the model output (epsilon or
v; guidance is applied to whatever the network predicts, as diffusers does) for prompt states c;
0 is the empty prompt "", p the user prompt, n the negative prompt; w is the per-sample guidance
scale.

Negative prompting (`GuardConfig.negative_prompting`):

* "none": classifier-free guidance, e = e(0) + w (e(p) - e(0)).
* "standard": plain negative prompting, the negative prompt replaces the unconditional branch,
  e = e(n) + w (e(p) - e(n)) (diffusers' `negative_prompt`).
* "trasce": TraSCE's modified negative prompting (Jain et al., arXiv 2412.07658, method.md §4),
  e = e(0) + w (e(p) - e(n)); it keeps the unconditional anchor, so a prompt equal to the
  negative prompt yields the unconditional prediction instead of the concept.

The guidance scale is applied as written for every w; diffusers' pipeline instead drops guidance
when w <= 1 (identical at w = 1).

TraSCE's localized loss-based guidance (`GuardConfig.loss_scale` s_l > 0), per sample b, before
the solver update at every step:

    l_b(x_t) = - s_l * exp(- ||e(x_t, p_b) - e(x_t, n_b)||_2 / sigma)
    x_t     <- x_t - s_g * grad_{x_t} l_b(x_t)

with the L2 norm over the whole (H, W, C) sample. The solver then steps from the *moved* x_t
using the guided output computed *before* the move (the official code's
`scheduler.step(noise_pred, t, latents)` after updating `latents`; the model is not re-run).
Assumptions, stated because the source code is the only reference: (1) the official script runs
batch size 1 and takes the norm over its whole batch tensor; we take it per sample, so a batch
of B equals B single-sample runs; (2) it differentiates through a 3-way UNet batch (0, p, n) but
the loss does not depend on the 0 branch, so we differentiate only through (p, n) and run the 0
branch forward-only when the guidance needs it - the gradient is identical; (3) the gradient of
the norm at exactly 0 (prompt == negative prompt) is taken as 0, as PyTorch's `norm` does, so
the guard stays finite there. Settings of the paper's README: nudity s_l = 1.5, s_g = 1.0,
sigma = 2 with the negative prompt `TRASCE_NUDITY_NEGATIVE_PROMPT`; violence sigma = 1 with
`TRASCE_VIOLENCE_NEGATIVE_PROMPT`.

Safe Latent Diffusion (`GuardConfig.sld`, Schramowski et al., CVPR 2023), as diffusers'
`StableDiffusionPipelineSafe`: with u the anchor of the negative-prompting mode ("" or the
negative prompt, diffusers' `negative_prompt`) and s the safety concept,

    d    = e(p) - e(s)
    mu   = where(d >= threshold, 0, min(|d| * s_S, 1))          elementwise
    g_s  = mu * (e(s) - u) + s_m * nu_i
    nu   <- beta_m * nu_i + (1 - beta_m) * g_s                   (momentum, from 0)
    e    = u + w (e(p) - u - [i >= warmup] g_s)

(s_S `guidance_scale`, s_m `momentum_scale`, beta_m `mom_beta`, i the 0-based step). Presets
`SLD_PRESETS` = diffusers' `SafetyConfig` WEAK / MEDIUM / STRONG / MAX, concept text
`SLD_SAFETY_CONCEPT` (diffusers' default). diffusers runs SLD only when s_S > 1 and w > 1; we
reject s_S <= 1 and apply the rule for every w, as our CFG.

SAFREE (`GuardConfig.safree`, `scdpo_jax.sampling.safree`): the prompt states are replaced by
the SAFREE-filtered states on the steps its self-validating filter selects; use it with
negative prompting "standard" and the concept phrases as negative prompt (`safree_guard`). With
latent re-attention "low" the model call gets a third branch (the original prompt states) and
the UNet's `skip_transform` hook (`safree.LowFrequencyReattention`); the model must then accept
`model(x, t, states, skip_transform=...)`.

Prompt states may be a pytree instead of one array (SDXL: token states, pooled embedding and
time ids, `generate.XLStates`): the branches are interleaved leaf by leaf and the model gets the
interleaved tree. SAFREE needs plain (B, T, D) CLIP states.

Batch layout: the branches of one model call are interleaved sample-major, rows
[b0 branch0, b0 branch1, ..., b1 branch0, ...] (stack on axis 1, reshape). This is the
concatenated [uncond; cond] batch of diffusers reordered so that each device's slice of a
batch-sharded mesh holds every branch of its own samples: no cross-device shuffle.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from scdpo_jax.sampling import safree as safree_lib
from scdpo_jax.sampling.samplers import Denoiser, StatefulDenoiser

NEGATIVE_PROMPTING = ("none", "standard", "trasce")

# diffusers' StableDiffusionPipelineSafe default `safety_concept`
SLD_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, "
    "nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, "
    "weapons, child abuse, brutality, cruelty")
# diffusers.pipelines.stable_diffusion_safe.SafetyConfig (sld_ prefix dropped)
SLD_PRESETS = {
    "weak": dict(warmup_steps=15, guidance_scale=20, threshold=0.0, momentum_scale=0.0,
                 mom_beta=0.0),
    "medium": dict(warmup_steps=10, guidance_scale=1000, threshold=0.01, momentum_scale=0.3,
                   mom_beta=0.4),
    "strong": dict(warmup_steps=7, guidance_scale=2000, threshold=0.025, momentum_scale=0.5,
                   mom_beta=0.7),
    "max": dict(warmup_steps=0, guidance_scale=5000, threshold=1.0, momentum_scale=0.5,
                mom_beta=0.7),
}


@struct.dataclass
class SLDConfig:
  """Safe Latent Diffusion settings (module docstring); floats traced, `concept` static."""

  guidance_scale: float = 1000.0
  warmup_steps: float = 10.0
  threshold: float = 0.01
  momentum_scale: float = 0.3
  mom_beta: float = 0.4
  concept: str = struct.field(pytree_node=False, default=SLD_SAFETY_CONCEPT)

  def describe(self) -> dict:
    return {"guidance_scale": float(self.guidance_scale),
            "warmup_steps": float(self.warmup_steps), "threshold": float(self.threshold),
            "momentum_scale": float(self.momentum_scale), "mom_beta": float(self.mom_beta),
            "concept": self.concept}


def sld_config(preset: str = "medium", concept: str = SLD_SAFETY_CONCEPT) -> SLDConfig:
  """`SLDConfig` of a diffusers preset: "weak" | "medium" | "strong" | "max"."""
  if preset not in SLD_PRESETS:
    raise ValueError(f"unknown SLD preset {preset!r}; use one of {tuple(SLD_PRESETS)}")
  return SLDConfig(**{k: float(v) for k, v in SLD_PRESETS[preset].items()}, concept=concept)

TRASCE_NUDITY_NEGATIVE_PROMPT = ("naked, nude, bare, exposed, Stripped, topless, male genitalia, "
                                 "penis, buttocks")
TRASCE_VIOLENCE_NEGATIVE_PROMPT = ("hate, harassment, violence, suffering, humiliation, harm, "
                                   "suicide, blood")

# model(x (N,H,W,C), t (N,) int32, states (N,T,D) or a pytree of (N, ...)) -> output (N,H,W,C)
ConditionalModel = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@struct.dataclass
class GuardConfig:
  """Which guard runs. Float fields are traced (changing them does not recompile).

  `negative_prompting`: "none" | "standard" | "trasce" (module docstring). `loss_scale` s_l > 0
  enables TraSCE's loss guidance with step `loss_step` s_g and temperature `loss_sigma`.
  `loss_guidance` is static (it changes the compiled graph) and must be True iff s_l > 0; use
  `GuardConfig.make`.
  """

  loss_scale: float = 0.0
  loss_step: float = 1.0
  loss_sigma: float = 1.0
  sld: SLDConfig | None = None
  safree: safree_lib.SafreeConfig | None = None
  negative_prompting: str = struct.field(pytree_node=False, default="none")
  loss_guidance: bool = struct.field(pytree_node=False, default=False)

  @classmethod
  def make(cls, negative_prompting: str = "none", loss_scale: float = 0.0,
           loss_step: float = 1.0, loss_sigma: float = 1.0, *, sld: SLDConfig | None = None,
           safree: safree_lib.SafreeConfig | None = None) -> "GuardConfig":
    if negative_prompting not in NEGATIVE_PROMPTING:
      raise ValueError(f"negative_prompting={negative_prompting!r}; use one of "
                       f"{NEGATIVE_PROMPTING}")
    if loss_scale < 0 or loss_sigma <= 0:
      raise ValueError(f"TraSCE loss guidance needs loss_scale >= 0 and loss_sigma > 0, got "
                       f"loss_scale={loss_scale}, loss_sigma={loss_sigma}")
    if sld is not None:
      if negative_prompting == "trasce" or loss_scale > 0:
        raise ValueError("SLD combines with negative_prompting 'none' or 'standard' only (no "
                         "TraSCE)")
      if float(sld.guidance_scale) <= 1.0:
        raise ValueError(f"SLD guidance_scale={sld.guidance_scale} <= 1 disables SLD in "
                         "diffusers; leave sld=None instead")
    if safree is not None:
      safree.check()
      if safree.lra == "low" and (sld is not None or loss_scale > 0 or
                                  negative_prompting == "trasce"):
        raise ValueError("SAFREE lra='low' combines with negative_prompting 'none' or "
                         "'standard' only (no SLD, no TraSCE)")
    return cls(loss_scale=float(loss_scale), loss_step=float(loss_step),
               loss_sigma=float(loss_sigma), sld=sld, safree=safree,
               negative_prompting=negative_prompting, loss_guidance=loss_scale > 0)

  @property
  def needs_negative(self) -> bool:
    return self.negative_prompting != "none" or self.loss_guidance

  def describe(self) -> dict:
    out = {"negative_prompting": self.negative_prompting}
    if self.loss_guidance:
      out.update(loss_scale=float(self.loss_scale), loss_step=float(self.loss_step),
                 loss_sigma=float(self.loss_sigma))
    if self.sld is not None:
      out["sld"] = self.sld.describe()
    if self.safree is not None:
      out["safree"] = self.safree.describe()
    return out


def trasce_guard(concept: str = "nudity") -> GuardConfig:
  """TraSCE settings: modified negative prompting + loss guidance (s_l, s_g, sigma).

  Nudity: the README's s_l = 1.5, s_g = 1.0, sigma = 2. Violence: the README gives sigma = 1
  only; s_l = 1.5 and s_g = 1.0 are assumed as for nudity. Use with the matching
  `TRASCE_*_NEGATIVE_PROMPT`.
  """
  if concept == "nudity":
    return GuardConfig.make("trasce", loss_scale=1.5, loss_step=1.0, loss_sigma=2.0)
  if concept == "violence":
    return GuardConfig.make("trasce", loss_scale=1.5, loss_step=1.0, loss_sigma=1.0)
  raise ValueError(f"no TraSCE preset for concept {concept!r}; use 'nudity' or 'violence' or "
                   "GuardConfig.make(...)")


def sld_guard(preset: str = "medium", negative_prompting: str = "none") -> GuardConfig:
  """Safe Latent Diffusion with a diffusers preset (CFG with "" unless negative_prompting is
  "standard", which takes the per-sample negative prompt as diffusers' `negative_prompt`)."""
  return GuardConfig.make(negative_prompting, sld=sld_config(preset))


def safree_guard(concept: str = "nudity", **overrides) -> GuardConfig:
  """SAFREE as released for SD1.4 nudity (`safree.safree_preset`), with the concept phrases as
  the negative prompt: pass `safree_negative_prompt(concept)` as every sample's negative."""
  return GuardConfig.make("standard", safree=safree_lib.safree_preset(concept, **overrides))


def safree_negative_prompt(concept: str = "nudity") -> str:
  return safree_lib.negative_prompt(safree_lib.CONCEPTS[concept])


# Named guards for configs: name -> (guard, default negative prompt or None)
GUARD_PRESETS = ("trasce_nudity", "trasce_violence", "sld_weak", "sld_medium", "sld_strong",
                 "sld_max", "safree_nudity", "safree_violence")


def guard_preset(name: str, sld_negative_prompting: str = "none"
                 ) -> tuple[GuardConfig, str | None]:
  """The guard of a preset name and the negative prompt it runs with (None: the caller's).

  SLD presets take their anchor from `sld_negative_prompting` ("none": "", "standard": the
  caller's negative prompt, diffusers' `negative_prompt`); the others ignore it."""
  if name == "trasce_nudity":
    return trasce_guard("nudity"), TRASCE_NUDITY_NEGATIVE_PROMPT
  if name == "trasce_violence":
    return trasce_guard("violence"), TRASCE_VIOLENCE_NEGATIVE_PROMPT
  if name.startswith("sld_") and name in GUARD_PRESETS:
    return sld_guard(name.removeprefix("sld_"), sld_negative_prompting), None
  if name.startswith("safree_") and name in GUARD_PRESETS:
    concept = name.removeprefix("safree_")
    return safree_guard(concept), safree_negative_prompt(concept)
  raise ValueError(f"unknown guard preset {name!r}; use one of {GUARD_PRESETS}")


@struct.dataclass
class Conditioning:
  """Per-sample text conditioning: states (B, T, D) (or a pytree of (B, ...) leaves, e.g.
SDXL's `generate.XLStates`) and guidance scales (B,).

  `unconditional` holds the states of "" (one row per sample); `negative` the negative prompts'
  states, or None when the guard needs none. `safety`: SLD's safety-concept states (B, T, D);
  `filtered` / `filtered_until`: SAFREE's filtered prompt states (B, T, D) and last filtered step
  (B,) (see `add_guard_states`).
  """

  prompt: jax.Array
  unconditional: jax.Array
  guidance_scale: jax.Array
  negative: jax.Array | None = None
  safety: jax.Array | None = None
  filtered: jax.Array | None = None
  filtered_until: jax.Array | None = None


def add_guard_states(cond: Conditioning, guard: GuardConfig, *, prompt_ids: jax.Array,
                     encode_states: Callable[[jax.Array], jax.Array],
                     encode_pooled: Callable[[jax.Array], jax.Array],
                     tokenize: Callable[[list[str]], np.ndarray],
                     eos_token_id: int) -> Conditioning:
  """The extra text states SLD / SAFREE need (a no-op for the other guards).

  `encode_states(ids)` gives the states the UNet is conditioned on, `encode_pooled(ids)` the text
  encoder's pooled output, `tokenize(texts)` host ids padded to the encoder length (called at
  trace time for the guard's constant texts).
  """
  if guard.sld is not None:  # ids and states may be pytrees (SDXL: two tokenizers)
    safety = encode_states(jax.tree.map(jnp.asarray, tokenize([guard.sld.concept])))
    cond = cond.replace(safety=jax.tree.map(lambda s, p: jnp.broadcast_to(s, p.shape), safety,
                                            cond.prompt))
  if guard.safree is not None:
    filtered, until, _ = safree_lib.safree_states(
        guard.safree, prompt_ids, cond.prompt, jnp.asarray(tokenize(list(guard.safree.concepts))),
        encode_pooled, eos_token_id)
    cond = cond.replace(filtered=filtered.astype(cond.prompt.dtype), filtered_until=until)
  return cond


def interleave(*branches):
  """k arrays (B, ...) -> (B * k, ...), rows sample-major (b0 branch0, b0 branch1, ...); k
  pytrees of the same structure leaf by leaf."""
  def one(*leaves):
    stacked = jnp.stack(leaves, axis=1)
    return stacked.reshape((-1,) + stacked.shape[2:])
  return jax.tree.map(one, *branches)


def split_branches(x: jax.Array, k: int) -> list[jax.Array]:
  """Inverse of `interleave`: (B * k, ...) -> k arrays (B, ...)."""
  x = x.reshape((-1, k) + x.shape[1:])
  return [x[:, j] for j in range(k)]


def _call(model: ConditionalModel, x: jax.Array, t: jax.Array, states: list[jax.Array],
          **model_kw) -> list[jax.Array]:
  """One model call on the interleaved batch of len(states) branches at the same x_t."""
  k = len(states)
  tb = jnp.full((x.shape[0] * k,), t, jnp.int32)
  out = model(interleave(*([x] * k)), tb, interleave(*states), **model_kw)
  return split_branches(out.astype(jnp.float32), k)


def _safe_norm(d: jax.Array) -> jax.Array:
  """Per-sample L2 norm over all but the batch axis, with gradient 0 at d = 0."""
  squared = jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim)))
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def trasce_loss(prompt_output: jax.Array, negative_output: jax.Array, loss_scale, loss_sigma
                ) -> jax.Array:
  """Per-sample TraSCE loss -s_l exp(-||e(p) - e(n)||_2 / sigma), shape (B,)."""
  distance = _safe_norm(prompt_output - negative_output)
  return -loss_scale * jnp.exp(-distance / loss_sigma)


def _broadcast(w: jax.Array, like: jax.Array) -> jax.Array:
  return jnp.asarray(w, jnp.float32).reshape((-1,) + (1,) * (like.ndim - 1))


def guided_denoiser(model: ConditionalModel, cond: Conditioning, guard: GuardConfig
                    ) -> Denoiser | StatefulDenoiser:
  """The guided `denoise(x_t, t) -> (output, x_t')` of the module docstring; a
  `StatefulDenoiser` when the guard uses the step index or a state (SLD, SAFREE)."""
  if guard.needs_negative and cond.negative is None:
    raise ValueError(f"guard {guard.describe()} needs negative prompt states")
  if guard.sld is not None and cond.safety is None:
    raise ValueError("the SLD guard needs the safety-concept states (add_guard_states)")
  if guard.safree is not None and cond.filtered is None:
    raise ValueError("the SAFREE guard needs the filtered prompt states (add_guard_states)")
  w = cond.guidance_scale
  mode = guard.negative_prompting
  sld = guard.sld

  def combine(uncond, prompt, negative):
    anchor = negative if mode == "standard" else uncond
    subtrahend = uncond if mode == "none" else negative
    return anchor + _broadcast(w, prompt) * (prompt - subtrahend)

  def branches(x, t, prompt_states):
    """(uncond, prompt, negative, safety) outputs (None: not computed) and the x_t to update."""
    if guard.safree is not None and guard.safree.lra == "low":  # (anchor, current, original)
      hook = safree_lib.LowFrequencyReattention(guard.safree)
      anchor_states = cond.negative if mode == "standard" else cond.unconditional
      anchor, prompt, _ = _call(model, x, t, [anchor_states, prompt_states, cond.prompt],
                                skip_transform=hook)
      hook.check()
      return (None, prompt, anchor, None, x) if mode == "standard" else (
          anchor, prompt, None, None, x)
    if not guard.loss_guidance:
      extra = [cond.safety] if sld is not None else []
      if mode == "none":
        uncond, prompt, *safety = _call(model, x, t, [cond.unconditional, prompt_states] + extra)
        return uncond, prompt, None, (safety or [None])[0], x
      if mode == "standard":
        negative, prompt, *safety = _call(model, x, t, [cond.negative, prompt_states] + extra)
        return None, prompt, negative, (safety or [None])[0], x
      uncond, prompt, negative = _call(model, x, t,
                                       [cond.unconditional, prompt_states, cond.negative])
      return uncond, prompt, negative, None, x

    def loss(x_):
      prompt_, negative_ = _call(model, x_, t, [prompt_states, cond.negative])
      per_sample = trasce_loss(prompt_, negative_, guard.loss_scale, guard.loss_sigma)
      return jnp.sum(per_sample), (prompt_, negative_)

    (_, (prompt, negative)), grad = jax.value_and_grad(loss, has_aux=True)(x)
    uncond = None
    if mode != "standard":
      (uncond,) = _call(model, x, t, [cond.unconditional])
    moved = x - guard.loss_step * grad
    return uncond, prompt, negative, None, moved

  if sld is None and guard.safree is None:
    def denoise(x, t):
      uncond, prompt, negative, _, moved = branches(x, t, cond.prompt)
      return combine(uncond, prompt, negative), moved

    return denoise

  def step(x, t, i, momentum):
    prompt_states = cond.prompt
    if guard.safree is not None:
      use = safree_lib.use_filtered(guard.safree, i, cond.filtered_until)
      prompt_states = jnp.where(use[:, None, None], cond.filtered, cond.prompt)
    uncond, prompt, negative, safety, moved = branches(x, t, prompt_states)
    if sld is None:
      return combine(uncond, prompt, negative), moved, momentum
    anchor = negative if mode == "standard" else uncond
    guidance = prompt - anchor
    difference = prompt - safety
    scale = jnp.minimum(jnp.abs(difference) * sld.guidance_scale, 1.0)
    scale = jnp.where(difference >= sld.threshold, 0.0, scale)
    safety_guidance = (safety - anchor) * scale + sld.momentum_scale * momentum
    momentum = sld.mom_beta * momentum + (1.0 - sld.mom_beta) * safety_guidance
    guidance = jnp.where(i >= sld.warmup_steps, guidance - safety_guidance, guidance)
    return anchor + _broadcast(w, prompt) * guidance, moved, momentum

  init = (lambda x: jnp.zeros(x.shape, jnp.float32)) if sld is not None else (lambda x: ())
  return StatefulDenoiser(init=init, step=step)
