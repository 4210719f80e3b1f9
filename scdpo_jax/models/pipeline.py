"""A diffusers-format Stable Diffusion folder as our Flax components, and back.

Folder layout (that of `stable-diffusion-v1-5`): model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/. Only `.safetensors` weights are read, torch is never imported. The
components go through the per-model loaders and savers (`unet_io`, `vae_io`, `clip_io`), so the
same contract holds: parameters come back as host NumPy trees in `param_dtype`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from scdpo_jax.models import clip, clip_config, clip_io, io, layers, schedule, tokenizer
from scdpo_jax.models import unet, unet_io, vae, vae_io
# Aliased: `random_stable_diffusion` takes arguments named `unet_config` / `vae_config`.
from scdpo_jax.models import unet_config as unet_config_lib, vae_config as vae_config_lib

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclasses.dataclass
class StableDiffusion:
  """Loaded components; any may be None when not requested. Params are host NumPy trees."""

  folder: Path | None = None
  unet: unet.UNet2DConditionModel | None = None
  unet_params: Any = None
  vae: vae.AutoencoderKL | None = None
  vae_params: Any = None
  text_encoder: clip.CLIPTextModel | None = None
  text_encoder_params: Any = None
  tokenizer: Any = None
  schedule: schedule.NoiseSchedule | None = None
  scheduler_config: dict | None = None


def check_pipeline_folder(folder, components: Iterable[str] = COMPONENTS, *,
                          known: tuple[str, ...] = COMPONENTS,
                          what: str = "Stable Diffusion") -> Path:
  """Fail early, naming the path, if `folder` is not a usable diffusers SD folder (`known`,
  `what`: the component names and the pipeline's name, e.g. those of SDXL)."""
  folder = io.require_dir(folder, f"{what} pipeline")
  index = folder / "model_index.json"
  if not index.is_file():
    raise io.CheckpointNotFoundError(
        f"{folder} is not a diffusers-format {what} folder: expected {index} next to "
        f"the component folders {', '.join(known)}")
  listed = io.read_json(index, "model_index.json")
  for name in components:
    if name not in known:
      raise ValueError(f"unknown component {name!r}; known: {known}")
    if not (folder / name).is_dir():
      listed_note = "listed" if listed.get(name) else "not listed"
      raise io.CheckpointNotFoundError(
          f"component {name!r} missing: expected the folder {folder / name} "
          f"({listed_note} in {index})")
  return folder


def load_stable_diffusion(folder, components: Iterable[str] = COMPONENTS, *,
                          dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                          variant: str | None = None, attention_impl: str = "xla",
                          remat_policy: str = "none") -> StableDiffusion:
  """Load the requested components of a diffusers SD 1.x/2.x folder."""
  components = tuple(components)
  folder = check_pipeline_folder(folder, components)
  sd = StableDiffusion(folder=folder)
  kw = dict(dtype=dtype, param_dtype=param_dtype, variant=variant, attention_impl=attention_impl)
  if "unet" in components:
    sd.unet, sd.unet_params = unet_io.load_unet(folder / "unet", remat_policy=remat_policy,
                                                **kw)
  if "vae" in components:
    sd.vae, sd.vae_params = vae_io.load_vae(folder / "vae", **kw)
  if "text_encoder" in components:
    sd.text_encoder, sd.text_encoder_params = clip_io.load_clip_text(folder / "text_encoder",
                                                                     **kw)
  if "tokenizer" in components:
    max_len = sd.text_encoder.config.max_position_embeddings if sd.text_encoder else None
    sd.tokenizer = tokenizer.load_tokenizer(folder / "tokenizer", max_length=max_len)
  if "scheduler" in components:
    sd.scheduler_config = io.read_json(folder / "scheduler" / "scheduler_config.json",
                                       "scheduler config")
    sd.schedule = schedule.schedule_from_config(sd.scheduler_config)
  return sd


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def save_stable_diffusion(folder, sd: StableDiffusion, *, tokenizer_folder=None,
                          param_dtype: Any = None) -> Path:
  """Write every component of `sd` as a diffusers-format pipeline folder.

  The result loads with PyTorch `StableDiffusionPipeline.from_pretrained(folder)` (and with
  `load_stable_diffusion`). `param_dtype` optionally casts the UNet and VAE weights (e.g. numpy
  float16); the text encoder is written as it is.
  """
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  index = dict(MODEL_INDEX)
  if sd.unet is not None:
    unet_io.save_unet(folder / "unet", sd.unet.config, sd.unet_params, param_dtype=param_dtype)
  if sd.vae is not None:
    vae_io.save_vae(folder / "vae", sd.vae.config, sd.vae_params, param_dtype=param_dtype)
  if sd.text_encoder is not None:
    clip_io.save_clip_text(folder / "text_encoder", sd.text_encoder.config,
                           sd.text_encoder_params)
    if getattr(sd.text_encoder, "with_projection", False):
      index["text_encoder"] = ["transformers", "CLIPTextModelWithProjection"]
  if sd.tokenizer is not None or tokenizer_folder is not None:
    if tokenizer_folder is not None:
      shutil.copytree(tokenizer_folder, folder / "tokenizer", dirs_exist_ok=True)
    else:
      sd.tokenizer.save_pretrained(str(folder / "tokenizer"))
  if sd.scheduler_config is not None:
    cfg = dict(sd.scheduler_config)
    index["scheduler"] = ["diffusers", cfg.get("_class_name", "DDIMScheduler")]
    cfg.setdefault("_class_name", index["scheduler"][1])
    io.write_json(folder / "scheduler" / "scheduler_config.json", cfg)
  for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
    if not (folder / name).is_dir():
      index.pop(name)
  io.write_json(folder / "model_index.json", index)
  return folder


def random_stable_diffusion(unet_config: dict, vae_config: dict, text_config: dict,
                            scheduler_config: dict, tokenizer_folder, *, seed: int = 0,
                            dtype: Any = jnp.float32) -> StableDiffusion:
  """A freshly initialised pipeline of our own model classes (tiny configs for tests/demos);
  params are host NumPy trees, as `load_stable_diffusion` returns them."""
  keys = jax.random.split(jax.random.key(seed), 3)
  sd = StableDiffusion()
  sd.unet = unet.UNet2DConditionModel(unet_config_lib.UNetConfig.from_dict(unet_config),
                                      dtype=dtype)
  sd.vae = vae.AutoencoderKL(vae_config_lib.VAEConfig.from_dict(vae_config), dtype=dtype)
  sd.text_encoder = clip.CLIPTextModel(clip_config.CLIPTextConfig.from_dict(text_config),
                                       dtype=dtype)
  sd.unet_params, sd.vae_params, sd.text_encoder_params = (
      jax.device_get(layers.init_params(m, k))
      for m, k in zip((sd.unet, sd.vae, sd.text_encoder), keys))
  sd.tokenizer = tokenizer.load_tokenizer(tokenizer_folder,
                                          sd.text_encoder.config.max_position_embeddings)
  sd.scheduler_config = dict(scheduler_config)
  sd.schedule = schedule.schedule_from_config(sd.scheduler_config)
  return sd
