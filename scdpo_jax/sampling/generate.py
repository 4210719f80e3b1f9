"""Text-to-image generation with a Stable Diffusion of our Flax models: one jitted function
(text encoder -> guided sampler scan -> VAE decode), batch-sharded over the mesh.

Layout: images come back channels-last (B, H, W, 3) float32 in [-1, 1]; latents are
(B, H/f, W/f, C) with f the VAE downsampling factor. A pipeline without a VAE (`sd.vae is None`)
is a pixel-space model: the sampler's output is the image (f = 1, no decode; ShapeWorld).
Prompt states are the text encoder's `last_hidden_state` by default (what SD 1.x and diffusers'
SD 2.x use; see `text_layer`). Each sample is fully determined by (prompt, negative prompt, seed,
image index, guidance scale) and the settings (see `samplers.py` on randomness): batch
composition, batch size and device count do not change it (beyond float rounding of differently
partitioned computations). `data.images.to_uint8` turns the images into uint8 exactly as
diffusers' pipelines do.

Stable Diffusion XL: `TextToImage(sdxl, ...)` with a `pipeline_xl.StableDiffusionXL` builds a
`TextToImageXL` (same API, samplers and guard code) whose branch states are `XLStates`, what
diffusers' `StableDiffusionXLPipeline` feeds its UNet: `prompt_embeds` of both text encoders,
the pooled embedding and the micro-conditioning time ids (`conditioning_xl`). The unconditional
branch is zeros (embeddings and pooled; time ids kept) when the pipeline's
`force_zeros_for_empty_prompt` is set, else the encoding of ""; a negative prompt branch is
always encoded (diffusers zeroes only when no `negative_prompt` is given). Guards on SDXL:
negative prompting ("none" / "standard" / "trasce"), TraSCE loss guidance and SLD (the safety
concept is one more encoded branch); SAFREE is rejected (its filter works on one CLIP encoder's
token states and pooled output).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from scdpo_jax import parallel
from scdpo_jax.models import clip, conditioning_xl, layers
from scdpo_jax.models import tokenizer as tokenizer_lib
from scdpo_jax.models import vae as vae_lib
from scdpo_jax.models.pipeline import StableDiffusion
from scdpo_jax.models.pipeline_xl import StableDiffusionXL
from scdpo_jax.sampling import guards, samplers


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """What a generation run does besides the prompts.

  `sampler` "ddim" | "dpmsolver++"; `eta` (DDIM only); `scheduler_overrides` replace keys of the
  checkpoint's scheduler config (e.g. {"timestep_spacing": "trailing"}); `height`/`width` in
  pixels (None: the UNet's sample_size times the VAE factor); `guard` the guidance/safety guard;
  `text_layer` the text-encoder layer the UNet is conditioned on (-1: `last_hidden_state`; see
  `CLIPTextModel.encode_prompt_states`; must match what the UNet was trained with; SDXL: -1
  only, diffusers' penultimate states of both encoders).

  SDXL micro-conditioning (diffusers' arguments of the same names): `original_size` and
  `target_size` (height, width), None = the generated (height, width); `crops_coords_top_left`
  (top, left). Stable Diffusion 1.x / 2.x pipelines take none (they must stay at the defaults).

  `scan_unroll`: sampler steps per iteration of the sampler's `lax.scan` (same images). 1 on
  GPU/TPU; on XLA:CPU a guard that differentiates inside the loop (TraSCE's loss guidance) runs
  about 10x faster with every step unrolled, at a longer compile.

  `persistent_cache`: False compiles this program afresh in every process and never writes it
  to JAX's persistent compilation cache (the same program, the same images): for programs that
  XLA:CPU loads from the cache slower than it compiles them. jaxlib 0.10.2 looks up each YNN
  fusion of a cached executable by scanning the module's instructions; ShapeWorld's unrolled
  TraSCE sampler (4.4 MB cached) took 65 s to load and 37 s to compile. An entry written before
  is still read (delete it from the cache folder).
  """

  sampler: str = "ddim"
  num_steps: int = 50
  eta: float = 0.0
  height: int | None = None
  width: int | None = None
  guard: guards.GuardConfig = dataclasses.field(default_factory=guards.GuardConfig)
  scheduler_overrides: tuple[tuple[str, Any], ...] = ()
  text_layer: int = -1
  original_size: tuple[int, int] | None = None
  crops_coords_top_left: tuple[int, int] = (0, 0)
  target_size: tuple[int, int] | None = None
  scan_unroll: int = 1
  persistent_cache: bool = True


class TextToImage:
  """Generate batches of images: `__call__(prompts, seeds, image_indices, guidance_scales,
  negative_prompts) -> (B, H, W, 3) float32 numpy in [-1, 1]`.

  `batch_size` is the compiled batch: shorter requests are padded (outputs dropped), longer ones
  split. With a `mesh`, the batch axis is sharded over the mesh axes of the `rules`' `batch`
  entry (`batch_size` must divide over them), the parameters follow their logical axis names
  under `rules` (replicated on a pure data-parallel mesh), and the whole program (text encoder,
  sampler scan, decoder) is traced under the rules (`parallel.with_logical_rules`), so the
  models' activation constraints apply. Multi-process: every process passes the same full
  request and gets the full images back.

  Other UNet weights of the same architecture (a fine-tune) go through `with_unet_params`, which
  reuses the compiled program. A `StableDiffusionXL` pipeline gives a `TextToImageXL` (module
  docstring).
  """

  def __new__(cls, sd=None, *args, **kwargs):
    if cls is TextToImage and isinstance(sd, StableDiffusionXL):
      cls = TextToImageXL
    return super().__new__(cls)

  def __init__(self, sd: StableDiffusion, settings: SamplingSettings, *, batch_size: int = 4,
               mesh: Mesh | None = None, rules=parallel.DEFAULT_RULES):
    for name in ("unet", "text_encoder", "tokenizer", "schedule") + self._extra_components:
      if getattr(sd, name, None) is None:  # None on a StableDiffusion given to TextToImageXL
        raise ValueError(f"{type(self).__name__} needs the pipeline component {name!r}")
    self.sd = sd
    self.settings = settings
    self._check_settings(settings)
    self.batch_size = int(batch_size)
    self.mesh = mesh
    factor = sd.vae.config.downsample_factor if sd.vae is not None else 1
    default_h, default_w = (side * factor for side in sd.unet.config.sample_hw)
    self.height = int(settings.height or default_h)
    self.width = int(settings.width or default_w)
    if self.height % factor or self.width % factor:
      raise ValueError(f"height/width must be multiples of the VAE factor {factor}, got "
                       f"{self.height}x{self.width}")
    self.latent_shape = (self.height // factor, self.width // factor,
                         sd.unet.config.in_channels)
    self.plan = samplers.make_plan(sd.schedule, settings.sampler, settings.num_steps,
                                   eta=settings.eta, **dict(settings.scheduler_overrides))
    self._setup_text()
    params = (sd.unet_params, sd.vae_params, self._text_params())
    if mesh is not None:
      rules = parallel.rules_from_config(rules)
      parallel.check_batch_fits(self.batch_size, mesh, "generation batch_size", rules)
      self._param_shardings = self._shardings_of_params(rules)
      self.params = jax.tree.map(_place, params, self._param_shardings)
      batch = lambda ndim: parallel.batch_sharding(mesh, ndim, rules)
      self._batch_sharding = batch(4)
      self._input_shardings = (batch(2), batch(2), batch(1), batch(1), batch(1))
      self._fn = jax.jit(parallel.with_logical_rules(self._generate, mesh, rules), in_shardings=(
          self._param_shardings, *self._input_shardings, parallel.replicated(mesh),
          parallel.replicated(mesh)), out_shardings=batch(4))
    else:
      self._param_shardings = None
      self.params = jax.device_put(params)
      self._batch_sharding = None
      self._input_shardings = None
      self._fn = jax.jit(self._generate)

  def with_unet_params(self, unet_params: Any) -> "TextToImage":
    """This sampler with the UNet weights `unet_params` (same tree and shapes as the pipeline's
    UNet, e.g. a fine-tune's `load_unet` result); the VAE / text encoder weights and the compiled
    program are shared with `self`, which is left unchanged."""
    current = self.params[0]
    if jax.tree.structure(unet_params) != jax.tree.structure(current) or any(
        np.shape(a) != np.shape(b)
        for a, b in zip(jax.tree.leaves(unet_params), jax.tree.leaves(current))):
      raise ValueError("with_unet_params: the UNet parameters do not match the pipeline UNet's "
                       "tree or shapes (another architecture?)")
    if self._param_shardings is not None:
      placed = jax.tree.map(_place, unet_params, self._param_shardings[0])
    else:
      placed = jax.device_put(unet_params)
    new = copy.copy(self)
    new.params = (placed, *self.params[1:])
    return new

  def _shardings_of_params(self, rules):
    sd = self.sd
    unet_shapes = layers.abstract_params(sd.unet)
    vae_shapes = layers.abstract_params(sd.vae) if sd.vae is not None else None
    return tuple(parallel.logical_shardings(s, self.mesh, rules)
                 for s in (unet_shapes, vae_shapes, self._text_shapes()))

  # ------------------------------------------------------------------------------ text hooks
  # (Stable Diffusion 1.x / 2.x here; `TextToImageXL` overrides them)

  _extra_components: tuple[str, ...] = ()

  def _check_settings(self, settings: SamplingSettings) -> None:
    if (settings.original_size is not None or settings.target_size is not None
        or tuple(settings.crops_coords_top_left) != (0, 0)):
      raise ValueError("original_size / crops_coords_top_left / target_size are SDXL "
                       "micro-conditioning; this Stable Diffusion pipeline takes none (leave "
                       "them at None / (0, 0) / None)")

  def _setup_text(self) -> None:
    sd = self.sd
    self.max_length = sd.text_encoder.config.max_position_embeddings
    self._uncond_ids = tokenizer_lib.tokenize(sd.tokenizer, [""], self.max_length)

  def _text_params(self) -> Any:
    return self.sd.text_encoder_params

  def _text_shapes(self) -> Any:
    return layers.abstract_params(self.sd.text_encoder)

  def _conditioning(self, text_params, prompt_ids, negative_ids, guidance_scales, guard
                    ) -> guards.Conditioning:
    """Traced: the guard's per-sample branch states."""
    sd = self.sd
    encode = lambda ids: sd.text_encoder.apply(
        {"params": text_params}, ids, method=clip.CLIPTextModel.encode_prompt_states,
        layer=self.settings.text_layer)
    prompt_states = encode(prompt_ids)
    uncond = jnp.broadcast_to(encode(jnp.asarray(self._uncond_ids)), prompt_states.shape)
    negative = encode(negative_ids) if guard.needs_negative else None
    cond = guards.Conditioning(prompt=prompt_states, unconditional=uncond,
                               guidance_scale=guidance_scales, negative=negative)
    return guards.add_guard_states(  # SLD's safety concept, SAFREE's filtered prompt states
        cond, guard, prompt_ids=prompt_ids, encode_states=encode,
        encode_pooled=lambda ids: sd.text_encoder.apply({"params": text_params},
                                                        ids).pooler_output,
        tokenize=self._ids, eos_token_id=sd.tokenizer.eos_token_id)

  def _model(self, unet_params) -> guards.ConditionalModel:
    sd = self.sd

    def model(x, t, states, skip_transform=None):  # skip_transform: SAFREE lra "low"
      return sd.unet.apply({"params": unet_params}, x, t, states, skip_transform=skip_transform)

    return model

  # ------------------------------------------------------------------------------ jitted body

  def _generate(self, params, prompt_ids, negative_ids, seeds, image_indices, guidance_scales,
                guard, plan):
    unet_params, vae_params, text_params = params
    sd = self.sd
    cond = self._conditioning(text_params, prompt_ids, negative_ids, guidance_scales, guard)
    model = self._model(unet_params)
    keys = samplers.sample_keys(seeds, image_indices)
    x_start = samplers.initial_noise(keys, self.latent_shape)
    latents = samplers.run_sampler(plan, guards.guided_denoiser(model, cond, guard), x_start,
                                   keys, batch_sharding=self._batch_sharding,
                                   unroll=self.settings.scan_unroll)
    if sd.vae is None:  # pixel-space pipeline
      return jnp.clip(latents.astype(jnp.float32), -1.0, 1.0)
    images = sd.vae.apply({"params": vae_params}, vae_lib.unscale_latents(latents, sd.vae.config),
                          method="decode")
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

  # ------------------------------------------------------------------------------ host API

  def _ids(self, prompts: Sequence[str]) -> Any:
    """Host token ids (B, T) int32 (SDXL: a tuple, one per tokenizer)."""
    return tokenizer_lib.tokenize(self.sd.tokenizer, list(prompts), self.max_length)

  def __call__(self, prompts: Sequence[str], seeds: Sequence[int],
               image_indices: Sequence[int], guidance_scales: Sequence[float],
               negative_prompts: Sequence[str] | None = None) -> np.ndarray:
    n = len(prompts)
    if not (len(seeds) == len(image_indices) == len(guidance_scales) == n):
      raise ValueError("prompts, seeds, image_indices and guidance_scales must have one entry "
                       f"per image; got {len(prompts)}, {len(seeds)}, {len(image_indices)}, "
                       f"{len(guidance_scales)}")
    guard = self.settings.guard
    if negative_prompts is None:
      if guard.needs_negative:
        raise ValueError(f"the guard {guard.describe()} needs negative_prompts")
      negative_prompts = [""] * n
    out = []
    for start in range(0, n, self.batch_size):
      stop = min(start + self.batch_size, n)
      pad = self.batch_size - (stop - start)
      take = lambda xs: list(xs[start:stop]) + [xs[stop - 1]] * pad
      inputs = (self._ids(take(prompts)), self._ids(take(negative_prompts)),
                np.asarray([int(s) % 2 ** 32 for s in take(seeds)], np.uint32),
                np.asarray(take(image_indices), np.int32),
                np.asarray(take(guidance_scales), np.float32))
      if self._input_shardings is not None:
        inputs = tuple(jax.tree.map(lambda v, s=s: _place(v, s), x)
                       for x, s in zip(inputs, self._input_shardings))
      with _cache_writes(self.settings.persistent_cache):  # the first call compiles
        images = self._fn(self.params, *inputs, guard, self.plan)
      out.append(_to_host(images)[: stop - start])
    return np.concatenate(out) if out else np.zeros((0, self.height, self.width, 3), np.float32)


def _cache_writes(enabled: bool):
  """A context in which this thread's compiles are (not) written to the persistent cache
  (`SamplingSettings.persistent_cache`). JAX has no public per-program switch: its thread-local
  minimum compile time for a write, raised past any compile, does it."""
  from jax._src import config as jax_config

  state = getattr(jax_config, "persistent_cache_min_compile_time_secs", None)
  if enabled or state is None:
    return contextlib.nullcontext()
  return state(1e12)


@struct.dataclass
class XLStates:
  """One SDXL branch's UNet conditioning: `prompt_embeds` (B, T, D1 + D2) the
  `encoder_hidden_states`, `text_embeds` (B, P) the pooled embedding and `time_ids` (B, 6), the
  UNet's `added_cond_kwargs` (`conditioning_xl`)."""

  prompt_embeds: jax.Array
  text_embeds: jax.Array
  time_ids: jax.Array


class TextToImageXL(TextToImage):
  """`TextToImage` for a `StableDiffusionXL` pipeline (module docstring); built by
  `TextToImage(sdxl, ...)`. Prompts go to both tokenizers / text encoders (diffusers' `prompt_2`
  and `negative_prompt_2` default to the first ones); the time ids are one row
  `original_size + crops_coords_top_left + target_size` for every sample and branch (diffusers'
  default `negative_original_size` etc.: the same as the prompt's)."""

  sd: StableDiffusionXL
  _extra_components = ("text_encoder_2", "tokenizer_2")

  def _check_settings(self, settings: SamplingSettings) -> None:
    if settings.text_layer != -1:
      raise ValueError(f"text_layer={settings.text_layer}: SDXL sampling conditions on "
                       "diffusers' penultimate states of both text encoders (text_layer=-1); "
                       "clip_skip is not supported")
    if settings.guard.safree is not None:
      raise ValueError("the SAFREE guard is not supported for SDXL: its filter works on one "
                       "CLIP text encoder's token states and pooled output (use negative "
                       "prompting, TraSCE or SLD)")
    if not self.sd.text_encoder_2.with_projection:
      raise ValueError("SDXL's text_encoder_2 must be a CLIPTextModelWithProjection (its "
                       "projected pooled output is the UNet's text_embeds)")

  def _setup_text(self) -> None:
    sd = self.sd
    self.max_length = sd.text_encoder.config.max_position_embeddings
    self.max_length_2 = sd.text_encoder_2.config.max_position_embeddings
    self._uncond_ids = self._ids([""])
    s = self.settings
    size = (self.height, self.width)
    self.time_ids = conditioning_xl.add_time_ids(
        s.original_size or size, s.crops_coords_top_left, s.target_size or size)
    conditioning_xl.check_add_time_ids(sd.unet.config, self.time_ids.shape[1],
                                       sd.text_encoder_2.config.projection_dim)

  def _text_params(self) -> Any:
    return (self.sd.text_encoder_params, self.sd.text_encoder_2_params)

  def _text_shapes(self) -> Any:
    return (layers.abstract_params(self.sd.text_encoder),
            layers.abstract_params(self.sd.text_encoder_2))

  def _ids(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    prompts = list(prompts)
    return (tokenizer_lib.tokenize(self.sd.tokenizer, prompts, self.max_length),
            tokenizer_lib.tokenize(self.sd.tokenizer_2, prompts, self.max_length_2))

  def _conditioning(self, text_params, prompt_ids, negative_ids, guidance_scales, guard
                    ) -> guards.Conditioning:
    sd = self.sd

    def encode(ids):
      embeds = conditioning_xl.encode_prompt(sd.text_encoder, text_params[0], sd.text_encoder_2,
                                             text_params[1], *ids)
      time_ids = jnp.broadcast_to(jnp.asarray(self.time_ids),
                                  (embeds.prompt_embeds.shape[0], self.time_ids.shape[1]))
      return XLStates(prompt_embeds=embeds.prompt_embeds,
                      text_embeds=embeds.pooled_prompt_embeds, time_ids=time_ids)

    prompt = encode(prompt_ids)
    if sd.force_zeros_for_empty_prompt:  # diffusers: zeros for "no negative prompt"
      uncond = prompt.replace(prompt_embeds=jnp.zeros_like(prompt.prompt_embeds),
                              text_embeds=jnp.zeros_like(prompt.text_embeds))
    else:
      uncond = jax.tree.map(lambda u, p: jnp.broadcast_to(u, p.shape),
                            encode(tuple(jnp.asarray(i) for i in self._uncond_ids)), prompt)
    negative = encode(negative_ids) if guard.needs_negative else None
    cond = guards.Conditioning(prompt=prompt, unconditional=uncond,
                               guidance_scale=guidance_scales, negative=negative)

    def no_pooled(ids):
      raise AssertionError("SAFREE is rejected for SDXL in _check_settings")

    return guards.add_guard_states(  # SLD's safety concept (one more encoded branch)
        cond, guard, prompt_ids=prompt_ids, encode_states=encode, encode_pooled=no_pooled,
        tokenize=self._ids, eos_token_id=sd.tokenizer.eos_token_id)

  def _model(self, unet_params) -> guards.ConditionalModel:
    sd = self.sd

    def model(x, t, states: XLStates, skip_transform=None):
      return sd.unet.apply({"params": unet_params}, x, t, states.prompt_embeds,
                           conditioning_xl.added_cond_kwargs(states.text_embeds,
                                                             states.time_ids),
                           skip_transform=skip_transform)

    return model


def _place(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array from a value every process holds in full (works multi-process too)."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _to_host(x: jax.Array) -> np.ndarray:
  """The full (global) array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
