"""UNet2DConditionModel from and to a diffusers `unet/` folder (config.json +
diffusion_pytorch_model[.variant].safetensors), without torch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import jax.numpy as jnp

from scdpo_jax.models import convert, io, layers
from scdpo_jax.models.layers import Dtype
from scdpo_jax.models.unet import UNet2DConditionModel
from scdpo_jax.models.unet_config import UNetConfig

WEIGHTS_STEM = "diffusion_pytorch_model"


def load_unet(folder: str | os.PathLike, *, dtype: Dtype = jnp.float32,
              param_dtype: Dtype = jnp.float32, variant: Optional[str] = None,
              attention_impl: str = "xla", remat_policy: str = "none"
              ) -> tuple[UNet2DConditionModel, dict]:
  """(module, params) from a diffusers `unet/` folder; `params` is the unboxed `params` tree of
  host NumPy arrays in `param_dtype`. Raises `io.CheckpointNotFoundError` for missing files,
  `ValueError` for an unsupported config and `convert.CheckpointMismatchError` naming the
  missing / unexpected / mis-shaped keys."""
  folder = io.require_dir(folder, "UNet")
  config = UNetConfig.from_dict(io.read_json(folder / "config.json", "UNet config"))
  module = UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype,
                                attention_impl=attention_impl, remat_policy=remat_policy)
  state = io.load_safetensors(folder, WEIGHTS_STEM, "UNet", variant=variant)
  params = convert.torch_to_flax(state, layers.abstract_params(module), source=str(folder))
  return module, params


def save_unet(folder: str | os.PathLike, config: UNetConfig, params: Any, *,
              param_dtype: Optional[Any] = None) -> Path:
  """Write `params` as a diffusers `unet/` folder that `UNet2DConditionModel.from_pretrained`
  loads. `params`: the `params` tree (boxed or not, `{"params": ...}`-wrapped or not, host or
  device arrays); it must match `config` (else `convert.CheckpointMismatchError`).
  `param_dtype` optionally casts the written weights (default: keep each array's dtype)."""
  params = convert.host_params(params)
  convert.check_params(params, layers.abstract_params(UNet2DConditionModel(config)),
                       "cannot save UNet")
  folder = Path(folder)
  io.write_json(folder / "config.json", config.to_dict())
  io.save_safetensors(convert.flax_to_torch(params, dtype=param_dtype),
                      folder / f"{WEIGHTS_STEM}.safetensors")
  return folder
