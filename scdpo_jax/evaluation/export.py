"""Export a trained UNet as a complete diffusers Stable Diffusion folder.

The result is the base pipeline folder with its `unet/` replaced: our UNet parameters (e.g. the
SC-DPO policy) next to the base's VAE, text encoder, tokenizer and scheduler config. It loads
with PyTorch `StableDiffusionPipeline.from_pretrained(out_folder)` and with
`scdpo_jax.models.pipeline.load_stable_diffusion(out_folder)`; `unet/config.json` is the base's
(the fine-tune keeps the architecture).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.core import meta

from scdpo_jax.models import io, layers, pipeline, unet as unet_lib, unet_config

PIPELINE_COMPONENTS_BUT_UNET = ("vae", "text_encoder", "tokenizer", "scheduler")


def _tree_paths(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): (tuple(np.shape(leaf)), leaf) for path, leaf in flat}


def check_unet_params(model: unet_lib.UNet2DConditionModel, params: Any, source: str) -> None:
  """Raise naming the first mismatching entries if `params` is not `model`'s parameter tree."""
  expected = {k: shape for k, (shape, _) in _tree_paths(meta.unbox(
      layers.abstract_params(model))).items()}
  got = {k: shape for k, (shape, _) in _tree_paths(params).items()}
  missing = sorted(set(expected) - set(got))
  extra = sorted(set(got) - set(expected))
  wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
  if missing or extra or wrong:
    lines = ([f"missing {k} {expected[k]}" for k in missing[:5]]
             + [f"unexpected {k} {got[k]}" for k in extra[:5]]
             + [f"shape {k}: expected {expected[k]}, got {got[k]}" for k in wrong[:5]])
    raise ValueError(f"UNet parameters from {source} do not fit the base UNet config "
                     f"({len(missing)} missing, {len(extra)} unexpected, {len(wrong)} wrong "
                     "shape): " + "; ".join(lines))


def export_pipeline(base_folder: str | os.PathLike, unet_params: Any,
                    out_folder: str | os.PathLike, *, dtype: Any = None,
                    source: str = "unet_params") -> Path:
  """Write `out_folder` = `base_folder` with its UNet weights replaced by `unet_params`.

  `unet_params`: the UNet's `params` tree (what `unet_io.load_unet` returns and the trainer
  optimises); flax `LogicallyPartitioned` boxes and device arrays (also sharded ones on a single
  process) are accepted. A `{"params": ...}` wrapper is unwrapped. `dtype` optionally casts the
  written UNet and VAE weights (e.g. `np.float16`); the text encoder is written in float32. The
  base's safety checker / feature extractor, if any, are not carried over (the export's
  `model_index.json` sets `requires_safety_checker: false`). Returns the folder.
  """
  base = pipeline.check_pipeline_folder(base_folder)
  out = Path(out_folder)
  if out.resolve() == base.resolve():
    raise ValueError(f"export would overwrite the base pipeline {base}; choose another folder")
  params = meta.unbox(unet_params)
  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
  config = unet_config.UNetConfig.from_dict(io.read_json(base / "unet" / "config.json",
                                                         "UNet config"))
  model = unet_lib.UNet2DConditionModel(config)
  check_unet_params(model, params, source)
  sd = pipeline.load_stable_diffusion(base, PIPELINE_COMPONENTS_BUT_UNET)
  sd.unet, sd.unet_params = model, params
  sd.tokenizer = None  # copied verbatim below, so the tokenizer files stay byte-identical
  return pipeline.save_stable_diffusion(out, sd, tokenizer_folder=base / "tokenizer",
                                        param_dtype=dtype)
