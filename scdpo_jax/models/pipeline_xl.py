"""A diffusers-format Stable Diffusion XL folder as our Flax components, and back.

Folder layout (that of `stable-diffusion-xl-base-1.0`): model_index.json, unet/, vae/,
text_encoder/ (CLIP ViT-L text model), text_encoder_2/ (OpenCLIP-bigG text model with
projection), tokenizer/, tokenizer_2/, scheduler/. Only `.safetensors` weights are read, torch is
never imported; the components go through the per-model loaders (`unet_io`, `vae_io`, `clip_io`)
and `pipeline.load_stable_diffusion` for the ones SD 1.x/2.x share, so parameters come back as
host NumPy trees in `param_dtype`.

The VAE can come from another folder (`vae_folder=`, e.g. madebyollin/sdxl-vae-fp16-fix, whose
config says `force_upcast: false`). As in diffusers, a VAE whose config says `force_upcast` is
computed in float32 when the pipeline's compute dtype is float16 (SDXL's own VAE overflows in
fp16); bfloat16 and float32 are kept. Prompt conditioning: `conditioning_xl.py`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from scdpo_jax.models import clip, clip_config, clip_io, io, layers, pipeline, tokenizer, vae_io
from scdpo_jax.models.vae_io import load_vae_config

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
              "scheduler")
WHAT = "Stable Diffusion XL"


@dataclasses.dataclass
class StableDiffusionXL(pipeline.StableDiffusion):
  """`pipeline.StableDiffusion`'s components plus the second text encoder and tokenizer;
  `force_zeros_for_empty_prompt` as in the folder's model_index.json (diffusers' default True:
  the unconditional CFG inputs are zeros when there is no negative prompt)."""

  text_encoder_2: clip.CLIPTextModel | None = None
  text_encoder_2_params: Any = None
  tokenizer_2: Any = None
  force_zeros_for_empty_prompt: bool = True


def vae_compute_dtype(dtype: Any, force_upcast: bool) -> Any:
  """The VAE's compute dtype in a pipeline computing in `dtype` (diffusers' `force_upcast`)."""
  return jnp.float32 if force_upcast and jnp.dtype(dtype) == jnp.float16 else dtype


def load_stable_diffusion_xl(folder, components: Iterable[str] = COMPONENTS, *,
                             vae_folder=None, dtype: Any = jnp.float32,
                             param_dtype: Any = jnp.float32, variant: str | None = None,
                             vae_variant: str | None = None, attention_impl: str = "xla",
                             remat_policy: str = "none") -> StableDiffusionXL:
  """Load the requested components of a diffusers SDXL folder.

  `vae_folder`: take the VAE from this diffusers `vae/`-style folder (config.json + weights)
  instead of `<folder>/vae`, read with `vae_variant` (default: none; the folder's own VAE is read
  with `variant`)."""
  components = tuple(components)
  own_vae = "vae" in components and vae_folder is None
  required = tuple(c for c in components if c != "vae" or own_vae)
  folder = pipeline.check_pipeline_folder(folder, required, known=COMPONENTS, what=WHAT)
  shared = tuple(c for c in required if c in pipeline.COMPONENTS and c != "vae")
  sd = pipeline.load_stable_diffusion(folder, shared, dtype=dtype, param_dtype=param_dtype,
                                      variant=variant, attention_impl=attention_impl,
                                      remat_policy=remat_policy)
  xl = StableDiffusionXL(**{f.name: getattr(sd, f.name)
                            for f in dataclasses.fields(pipeline.StableDiffusion)})
  index = io.read_json(folder / "model_index.json", "model_index.json")
  xl.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))
  if "vae" in components:
    vae_dir = folder / "vae" if own_vae else io.require_dir(vae_folder, "VAE")
    vae_dtype = vae_compute_dtype(dtype, load_vae_config(vae_dir).force_upcast)
    xl.vae, xl.vae_params = vae_io.load_vae(
        vae_dir, dtype=vae_dtype, param_dtype=param_dtype,
        variant=variant if own_vae else vae_variant, attention_impl=attention_impl)
  if "text_encoder_2" in components:
    xl.text_encoder_2, xl.text_encoder_2_params = clip_io.load_clip_text(
        folder / "text_encoder_2", dtype=dtype, param_dtype=param_dtype,
        attention_impl=attention_impl, variant=variant)
  if "tokenizer_2" in components:
    max_len = (xl.text_encoder_2.config.max_position_embeddings if xl.text_encoder_2
               else None)
    xl.tokenizer_2 = tokenizer.load_tokenizer(folder / "tokenizer_2", max_length=max_len)
  return xl


MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def save_stable_diffusion_xl(folder, xl: StableDiffusionXL, *, param_dtype: Any = None
                             ) -> Path:
  """Write every component of `xl` as a diffusers-format SDXL folder, which PyTorch
  `StableDiffusionXLPipeline.from_pretrained(folder)` (and `load_stable_diffusion_xl`) loads.
  `param_dtype` optionally casts the UNet and VAE weights; the text encoders are written as they
  are (as `pipeline.save_stable_diffusion` does)."""
  folder = pipeline.save_stable_diffusion(folder, xl, param_dtype=param_dtype)
  sd_index = io.read_json(folder / "model_index.json", "model_index.json")
  index = dict(MODEL_INDEX)
  index["force_zeros_for_empty_prompt"] = bool(xl.force_zeros_for_empty_prompt)
  if "scheduler" in sd_index:
    index["scheduler"] = sd_index["scheduler"]
  if sd_index.get("text_encoder"):
    index["text_encoder"] = sd_index["text_encoder"]
  if xl.text_encoder_2 is not None:
    clip_io.save_clip_text(folder / "text_encoder_2", xl.text_encoder_2.config,
                           xl.text_encoder_2_params)
    if not xl.text_encoder_2.with_projection:
      index["text_encoder_2"] = ["transformers", "CLIPTextModel"]
  if xl.tokenizer_2 is not None:
    xl.tokenizer_2.save_pretrained(str(folder / "tokenizer_2"))
  for name in COMPONENTS:
    if not (folder / name).is_dir():
      index.pop(name)
  io.write_json(folder / "model_index.json", index)
  return folder


def random_stable_diffusion_xl(unet_config: dict, vae_config: dict, text_config: dict,
                               text_config_2: dict, scheduler_config: dict, tokenizer_folder,
                               tokenizer_2_folder, *, seed: int = 0, dtype: Any = jnp.float32
                               ) -> StableDiffusionXL:
  """A freshly initialised SDXL pipeline of our own model classes (tiny configs for tests and
  CPU runs): `pipeline.random_stable_diffusion` plus `text_encoder_2` (with projection, built
  from `text_config_2`) and `tokenizer_2`; params are host NumPy trees."""
  sd = pipeline.random_stable_diffusion(unet_config, vae_config, text_config, scheduler_config,
                                        tokenizer_folder, seed=seed, dtype=dtype)
  xl = StableDiffusionXL(**{f.name: getattr(sd, f.name)
                            for f in dataclasses.fields(pipeline.StableDiffusion)})
  xl.text_encoder_2 = clip.CLIPTextModel(clip_config.CLIPTextConfig.from_dict(text_config_2),
                                         with_projection=True, dtype=dtype)
  xl.text_encoder_2_params = jax.device_get(
      layers.init_params(xl.text_encoder_2, jax.random.fold_in(jax.random.key(seed), 2)))
  xl.tokenizer_2 = tokenizer.load_tokenizer(tokenizer_2_folder,
                                            xl.text_encoder_2.config.max_position_embeddings)
  return xl


def is_sdxl_folder(folder) -> bool:
  """True when the diffusers folder's model_index.json names an SDXL pipeline class
  (`StableDiffusionXLPipeline`, `...Img2ImgPipeline`, ...)."""
  index = io.read_json(Path(folder) / "model_index.json", "model_index.json")
  return str(index.get("_class_name", "")).startswith("StableDiffusionXL")
