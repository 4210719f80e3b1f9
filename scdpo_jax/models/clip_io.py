"""CLIP text / vision towers from and to Hugging Face folders (config.json + model.safetensors),
without torch.

Both towers go through one loader and one saver (`_load_tower` / `_save_tower`), parametrised
by a `_Tower` that names what differs: the transformers key prefix, the projection, the
architectures and model types.

Checkpoints: transformers >= 5 saves a bare `CLIPTextModel` / `CLIPVisionModel` without the
`text_model.` / `vision_model.` key prefix, older versions (and the `text_encoder/` folders of
Stable Diffusion repos) with it; the loaders accept both, plus `*WithProjection` folders and full
`CLIPModel` folders (the other tower and `logit_scale` are skipped). The savers always write the
prefixed layout, which transformers 4 and 5 both load; `save_clip_model` writes both towers as
one `CLIPModel` folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from scdpo_jax.models import clip_config as cc
from scdpo_jax.models import convert, io, layers
from scdpo_jax.models.clip import CLIPTextModel, CLIPVisionModel
from scdpo_jax.models.layers import Dtype

WEIGHTS_STEM = "model"


@dataclasses.dataclass(frozen=True)
class _Tower:
  """What differs between the text and the vision tower's checkpoints."""

  what: str  # for error messages
  module_cls: type
  config_from_hf: Callable[[Mapping[str, Any]], Any]
  model_type: str
  architecture: str
  proj_architecture: str
  prefix: str  # transformers' key prefix of the tower
  bare_roots: tuple[str, ...]  # top-level keys transformers >= 5 writes without the prefix
  projection: str  # the projection's module / key name
  other: tuple[str, ...]  # key prefixes of the other tower in a full CLIPModel folder
  hint: str  # for a folder of the other tower


TEXT = _Tower(
    what="CLIP text encoder", module_cls=CLIPTextModel, config_from_hf=cc.text_config_from_hf,
    model_type=cc.TEXT_MODEL_TYPE, architecture=cc.TEXT_ARCHITECTURE,
    proj_architecture=cc.TEXT_PROJ_ARCHITECTURE, prefix="text_model",
    bare_roots=("embeddings", "encoder", "final_layer_norm"), projection="text_projection",
    other=("vision_model.", "visual_projection."),
    hint="Use load_clip_vision for a CLIP vision tower.")
VISION = _Tower(
    what="CLIP image encoder", module_cls=CLIPVisionModel,
    config_from_hf=cc.vision_config_from_hf, model_type=cc.VISION_MODEL_TYPE,
    architecture=cc.VISION_ARCHITECTURE, proj_architecture=cc.VISION_PROJ_ARCHITECTURE,
    prefix="vision_model",
    bare_roots=("embeddings", "pre_layrnorm", "encoder", "post_layernorm"),
    projection="visual_projection", other=("text_model.", "text_projection."),
    hint="Use load_clip_text for a CLIP text tower.")


def _drop_buffers(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drop non-persistent buffers old transformers versions saved (`*.position_ids`)."""
  return {k: v for k, v in state_dict.items()
          if not (k == "position_ids" or k.endswith(".position_ids"))}


def _add_tower_prefix(state_dict: Mapping[str, np.ndarray], tower: _Tower
                      ) -> dict[str, np.ndarray]:
  """transformers >= 5 saves bare CLIPTextModel / CLIPVisionModel keys without `<prefix>.`."""
  roots = tuple(f"{r}." for r in tower.bare_roots)
  return {(f"{tower.prefix}.{k}" if k.startswith(roots) else k): v
          for k, v in state_dict.items()}


def _load_tower(tower: _Tower, folder: str | os.PathLike, *, dtype: Dtype, param_dtype: Dtype,
                attention_impl: str, with_projection: Optional[bool], variant: Optional[str]):
  path = io.require_dir(folder, tower.what)
  cfg = io.read_json(path / "config.json", f"{tower.what} config")
  state = _drop_buffers(io.load_safetensors(path, WEIGHTS_STEM, tower.what, variant=variant))
  model_type = cfg.get("model_type")
  allowed = (tower.model_type, cc.FULL_MODEL_TYPE)
  if model_type is not None and model_type not in allowed:
    raise ValueError(f"{path}/config.json has model_type={model_type!r}; expected one of "
                     f"{list(allowed)}. {tower.hint}")
  config = tower.config_from_hf(cfg)
  state = _add_tower_prefix(state, tower)
  if with_projection is None:
    archs = cfg.get("architectures") or ()
    with_projection = (f"{tower.projection}.weight" in state
                       or any(a in (tower.proj_architecture, cc.FULL_ARCHITECTURE)
                              for a in archs))
  ignore = [*tower.other, "logit_scale"]
  if not with_projection:
    ignore.append(f"{tower.projection}.")
  module = tower.module_cls(config, with_projection=with_projection, dtype=dtype,
                            param_dtype=param_dtype, attention_impl=attention_impl)
  params = convert.torch_to_flax(state, layers.abstract_params(module), source=str(path),
                                 ignore_prefixes=ignore)
  return module, params


def _tower_state(tower: _Tower, config: Any, params: Any, param_dtype: Optional[Any]
                 ) -> tuple[dict[str, np.ndarray], bool]:
  """(PyTorch-layout state dict with `<prefix>.` keys, with_projection) of checked params."""
  params = convert.host_params(params)
  with_projection = tower.projection in params
  module = tower.module_cls(config, with_projection=with_projection)
  convert.check_params(params, layers.abstract_params(module), f"cannot save {tower.what}")
  return convert.flax_to_torch(params, dtype=param_dtype), with_projection


def _save_tower(tower: _Tower, folder: str | os.PathLike, config: Any, params: Any,
                param_dtype: Optional[Any]) -> Path:
  state, with_projection = _tower_state(tower, config, params, param_dtype)
  path = Path(folder)
  config_dict = config.to_dict()
  config_dict["architectures"] = [tower.proj_architecture if with_projection
                                  else tower.architecture]
  config_dict["dtype"] = str(next(iter(state.values())).dtype)
  io.write_json(path / "config.json", config_dict)
  io.save_safetensors(state, path / f"{WEIGHTS_STEM}.safetensors")
  return path


def load_clip_text(folder: str | os.PathLike, *, dtype: Dtype = jnp.float32,
                   param_dtype: Dtype = jnp.float32, attention_impl: str = "xla",
                   with_projection: Optional[bool] = None, variant: Optional[str] = None
                   ) -> tuple[CLIPTextModel, dict]:
  """(module, params) from a HF folder holding config.json + model[.variant].safetensors.

  The folder may hold a `CLIPTextModel`, a `CLIPTextModelWithProjection` (e.g. SD's
  `text_encoder/` or SDXL's `text_encoder_2/`) or a full `CLIPModel` (the vision tower and
  `logit_scale` are skipped). `with_projection=None` decides from the checkpoint (a
  `text_projection.weight` key or a *WithProjection / CLIPModel architecture); False drops the
  projection even if present. `params` is the unboxed `params` tree of host NumPy arrays in
  `param_dtype`.
  """
  return _load_tower(TEXT, folder, dtype=dtype, param_dtype=param_dtype,
                     attention_impl=attention_impl, with_projection=with_projection,
                     variant=variant)


def load_clip_vision(folder: str | os.PathLike, *, dtype: Dtype = jnp.float32,
                     param_dtype: Dtype = jnp.float32, attention_impl: str = "xla",
                     with_projection: Optional[bool] = None, variant: Optional[str] = None
                     ) -> tuple[CLIPVisionModel, dict]:
  """(module, params) from a HF `CLIPVisionModel[WithProjection]` or full `CLIPModel` folder.

  Same rules as `load_clip_text`, with `visual_projection.weight` deciding `with_projection`.
  """
  return _load_tower(VISION, folder, dtype=dtype, param_dtype=param_dtype,
                     attention_impl=attention_impl, with_projection=with_projection,
                     variant=variant)


def save_clip_text(folder: str | os.PathLike, config: cc.CLIPTextConfig, params: Any, *,
                   param_dtype: Optional[Any] = None) -> Path:
  """Write config.json + model.safetensors that transformers' `CLIPTextModel[WithProjection]
  .from_pretrained` loads (keys prefixed `text_model.`; projection iff `params` has one).

  `params`: the `params` tree (boxed or not, `{"params": ...}`-wrapped or not, host or device
  arrays); it must match `config` (else `convert.CheckpointMismatchError`). `param_dtype`
  optionally casts the written weights (default: keep each array's dtype).
  """
  return _save_tower(TEXT, folder, config, params, param_dtype)


def save_clip_vision(folder: str | os.PathLike, config: cc.CLIPVisionConfig, params: Any, *,
                     param_dtype: Optional[Any] = None) -> Path:
  """Write config.json + model.safetensors for `CLIPVisionModel[WithProjection].from_pretrained`
  (keys prefixed `vision_model.`; projection iff `params` has one). Same rules as
  `save_clip_text`."""
  return _save_tower(VISION, folder, config, params, param_dtype)


def save_clip_model(folder: str | os.PathLike, text_config: cc.CLIPTextConfig, text_params: Any,
                    vision_config: cc.CLIPVisionConfig, vision_params: Any, *,
                    logit_scale: float = math.log(1 / 0.07),
                    param_dtype: Optional[Any] = None) -> Path:
  """Write both towers (each with its projection) as one Hugging Face `CLIPModel` folder:
  config.json (`text_config`, `vision_config`, top-level `projection_dim`) + model.safetensors
  (`text_model.*`, `vision_model.*`, `text_projection.weight`, `visual_projection.weight`,
  `logit_scale` = log of the logit multiplier, as transformers stores it).

  transformers' `CLIPModel.from_pretrained` loads it, and so do `load_clip_text` /
  `load_clip_vision` (tested). Tokenizer files are not written here (add them to the folder,
  e.g. `tokenizer.write_byte_level_tokenizer(folder, ...)`).
  """
  if text_config.projection_dim != vision_config.projection_dim:
    raise ValueError(f"CLIPModel needs one projection_dim: text {text_config.projection_dim}, "
                     f"vision {vision_config.projection_dim}")
  text_state, text_proj = _tower_state(TEXT, text_config, text_params, param_dtype)
  vision_state, vision_proj = _tower_state(VISION, vision_config, vision_params, param_dtype)
  if not (text_proj and vision_proj):
    raise ValueError("save_clip_model: both towers need their projection (build them with "
                     "with_projection=True)")
  dtype = next(iter(text_state.values())).dtype
  state = {**text_state, **vision_state,
           "logit_scale": np.asarray(logit_scale, dtype=dtype)}
  path = Path(folder)
  text_dict, vision_dict = text_config.to_dict(), vision_config.to_dict()
  io.write_json(path / "config.json", {
      "architectures": [cc.FULL_ARCHITECTURE], "model_type": cc.FULL_MODEL_TYPE,
      "projection_dim": text_config.projection_dim,
      "logit_scale_init_value": float(logit_scale), "dtype": str(dtype),
      "text_config": text_dict, "vision_config": vision_dict})
  io.save_safetensors(state, path / f"{WEIGHTS_STEM}.safetensors")
  return path
