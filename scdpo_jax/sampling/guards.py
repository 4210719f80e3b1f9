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

Batch layout: the branches of one model call are interleaved sample-major, rows
[b0 branch0, b0 branch1, ..., b1 branch0, ...] (stack on axis 1, reshape). This is the
concatenated [uncond; cond] batch of diffusers reordered so that each device's slice of a
batch-sharded mesh holds every branch of its own samples: no cross-device shuffle.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from scdpo_jax.sampling.samplers import Denoiser

NEGATIVE_PROMPTING = ("none", "standard", "trasce")

TRASCE_NUDITY_NEGATIVE_PROMPT = ("naked, nude, bare, exposed, Stripped, topless, male genitalia, "
                                 "penis, buttocks")
TRASCE_VIOLENCE_NEGATIVE_PROMPT = ("hate, harassment, violence, suffering, humiliation, harm, "
                                   "suicide, blood")

# model(x (N,H,W,C), t (N,) int32, states (N,T,D)) -> output (N,H,W,C)
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
  negative_prompting: str = struct.field(pytree_node=False, default="none")
  loss_guidance: bool = struct.field(pytree_node=False, default=False)

  @classmethod
  def make(cls, negative_prompting: str = "none", loss_scale: float = 0.0,
           loss_step: float = 1.0, loss_sigma: float = 1.0) -> "GuardConfig":
    if negative_prompting not in NEGATIVE_PROMPTING:
      raise ValueError(f"negative_prompting={negative_prompting!r}; use one of "
                       f"{NEGATIVE_PROMPTING}")
    if loss_scale < 0 or loss_sigma <= 0:
      raise ValueError(f"TraSCE loss guidance needs loss_scale >= 0 and loss_sigma > 0, got "
                       f"loss_scale={loss_scale}, loss_sigma={loss_sigma}")
    return cls(loss_scale=float(loss_scale), loss_step=float(loss_step),
               loss_sigma=float(loss_sigma), negative_prompting=negative_prompting,
               loss_guidance=loss_scale > 0)

  @property
  def needs_negative(self) -> bool:
    return self.negative_prompting != "none" or self.loss_guidance

  def describe(self) -> dict:
    out = {"negative_prompting": self.negative_prompting}
    if self.loss_guidance:
      out.update(loss_scale=float(self.loss_scale), loss_step=float(self.loss_step),
                 loss_sigma=float(self.loss_sigma))
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


@struct.dataclass
class Conditioning:
  """Per-sample text conditioning: states (B, T, D) and guidance scales (B,).

  `unconditional` holds the states of "" (one row per sample); `negative` the negative prompts'
  states, or None when the guard needs none.
  """

  prompt: jax.Array
  unconditional: jax.Array
  guidance_scale: jax.Array
  negative: jax.Array | None = None


def interleave(*branches: jax.Array) -> jax.Array:
  """k arrays (B, ...) -> (B * k, ...), rows sample-major (b0 branch0, b0 branch1, ...)."""
  stacked = jnp.stack(branches, axis=1)
  return stacked.reshape((-1,) + stacked.shape[2:])


def split_branches(x: jax.Array, k: int) -> list[jax.Array]:
  """Inverse of `interleave`: (B * k, ...) -> k arrays (B, ...)."""
  x = x.reshape((-1, k) + x.shape[1:])
  return [x[:, j] for j in range(k)]


def _call(model: ConditionalModel, x: jax.Array, t: jax.Array, states: list[jax.Array]
          ) -> list[jax.Array]:
  """One model call on the interleaved batch of len(states) branches at the same x_t."""
  k = len(states)
  tb = jnp.full((x.shape[0] * k,), t, jnp.int32)
  out = model(interleave(*([x] * k)), tb, interleave(*states))
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


def guided_denoiser(model: ConditionalModel, cond: Conditioning, guard: GuardConfig) -> Denoiser:
  """The guided `denoise(x_t, t) -> (output, x_t')` of the module docstring."""
  if guard.needs_negative and cond.negative is None:
    raise ValueError(f"guard {guard.describe()} needs negative prompt states")
  w = cond.guidance_scale
  mode = guard.negative_prompting

  def combine(uncond, prompt, negative):
    anchor = negative if mode == "standard" else uncond
    subtrahend = uncond if mode == "none" else negative
    return anchor + _broadcast(w, prompt) * (prompt - subtrahend)

  def denoise(x, t):
    if not guard.loss_guidance:
      if mode == "none":
        uncond, prompt = _call(model, x, t, [cond.unconditional, cond.prompt])
        return combine(uncond, prompt, None), x
      if mode == "standard":
        negative, prompt = _call(model, x, t, [cond.negative, cond.prompt])
        return combine(None, prompt, negative), x
      uncond, prompt, negative = _call(model, x, t,
                                       [cond.unconditional, cond.prompt, cond.negative])
      return combine(uncond, prompt, negative), x

    def loss(x_):
      prompt_, negative_ = _call(model, x_, t, [cond.prompt, cond.negative])
      per_sample = trasce_loss(prompt_, negative_, guard.loss_scale, guard.loss_sigma)
      return jnp.sum(per_sample), (prompt_, negative_)

    (_, (prompt, negative)), grad = jax.value_and_grad(loss, has_aux=True)(x)
    uncond = None
    if mode != "standard":
      (uncond,) = _call(model, x, t, [cond.unconditional])
    moved = x - guard.loss_step * grad
    return combine(uncond, prompt, negative), moved

  return denoise
