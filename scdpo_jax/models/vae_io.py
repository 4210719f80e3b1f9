"""AutoencoderKL from and to a diffusers `vae/` folder (config.json +
diffusion_pytorch_model[.variant].safetensors), without torch."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import jax.numpy as jnp

from scdpo_jax.models import convert, io, layers
from scdpo_jax.models.layers import Dtype
from scdpo_jax.models.vae import AutoencoderKL
from scdpo_jax.models.vae_config import VAEConfig

WEIGHTS_STEM = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"

_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                               "proj_attn": "to_out.0"}
_DEPRECATED_ATTENTION_KEY = re.compile(
    r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\."
    r"(weight|bias)$")


def rename_deprecated_attention_keys(state_dict: Mapping[str, np.ndarray]
                                     ) -> dict[str, np.ndarray]:
  """Map the pre-0.14 diffusers attention names (query/key/value/proj_attn, still found in e.g.
  the SD 1.x VAE checkpoints) to the current ones, as diffusers does on load."""
  out = {}
  for key, value in state_dict.items():
    m = _DEPRECATED_ATTENTION_KEY.match(key)
    if m:
      key = f"{m.group(1)}.{_DEPRECATED_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}"
    out[key] = value
  return out


def load_vae_config(folder: str | os.PathLike) -> VAEConfig:
  """Read and validate `<folder>/config.json`; errors name the file."""
  path = io.require_dir(folder, "VAE") / CONFIG_NAME
  data = io.read_json(path, "VAE config")
  try:
    return VAEConfig.from_dict(data)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def load_vae(folder: str | os.PathLike, *, dtype: Dtype = jnp.float32,
             param_dtype: Dtype = jnp.float32, variant: Optional[str] = None,
             attention_impl: str = "xla") -> tuple[AutoencoderKL, dict]:
  """(module, params) from a diffusers `vae/` folder; `params` is the unboxed `params` tree of
  host NumPy arrays in `param_dtype`. Checkpoints with the pre-0.14 attention names load too.

  Raises `io.CheckpointNotFoundError` for missing folders/files (with the safetensors conversion
  hint for .bin-only folders), `ValueError` for an unsupported config and
  `convert.CheckpointMismatchError` listing missing / unexpected / mis-shaped keys.
  """
  folder = io.require_dir(folder, "VAE")
  config = load_vae_config(folder)
  module = AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype,
                         attention_impl=attention_impl)
  state_dict = io.load_safetensors(folder, WEIGHTS_STEM, "VAE", variant=variant)
  name = f"{WEIGHTS_STEM}.{variant}" if variant else WEIGHTS_STEM
  params = convert.torch_to_flax(rename_deprecated_attention_keys(state_dict),
                                 layers.abstract_params(module),
                                 source=str(folder / f"{name}.safetensors"))
  return module, params


def save_vae(folder: str | os.PathLike, config: VAEConfig, params: Any, *,
             param_dtype: Optional[Any] = None) -> Path:
  """Write config.json + diffusion_pytorch_model.safetensors that diffusers'
  `AutoencoderKL.from_pretrained(folder)` loads unchanged. `params`: the `params` tree (boxed or
  not, `{"params": ...}`-wrapped or not, host or device arrays); it must match `config` (else
  `convert.CheckpointMismatchError`). `param_dtype` optionally casts the written weights
  (default: keep each array's dtype).
  """
  params = convert.host_params(params)
  convert.check_params(params, layers.abstract_params(AutoencoderKL(config)), "cannot save VAE")
  folder = Path(folder)
  io.save_safetensors(convert.flax_to_torch(params, dtype=param_dtype),
                      folder / f"{WEIGHTS_STEM}.safetensors")
  io.write_json(folder / CONFIG_NAME, config.to_dict())
  return folder
