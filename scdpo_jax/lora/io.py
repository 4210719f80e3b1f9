"""LoRA files in the diffusers / peft format, in and out, without torch.

Export (`save_lora`): `<folder>/pytorch_lora_weights.safetensors`, the file diffusers'
`StableDiffusionPipeline.save_lora_weights` writes and `load_lora_weights` reads:

* keys `unet.<module>.lora_A.weight` (r, in[, kh, kw]) and `unet.<module>.lora_B.weight`
  (out, r[, 1, 1]), `<module>` the diffusers module name (`down_blocks.0.attentions.0.
  transformer_blocks.0.attn1.to_q`), peft's naming for the default adapter;
* safetensors metadata `lora_adapter_metadata`: the peft `LoraConfig` fields under the `unet.`
  prefix (`unet.r`, `unet.lora_alpha`, `unet.target_modules`, ...), which diffusers uses
  instead of guessing alpha = r, so a LoRA with alpha != rank loads with its scale.

Import (`load_lora`): that file (with or without metadata: without, alpha = rank per module,
diffusers' convention), or a peft `save_pretrained` folder (`adapter_model.safetensors` with
`base_model.model.` keys + `adapter_config.json`). Per-module ranks / alphas (`rank_pattern`,
`alpha_pattern`) are honoured by folding each module's alpha / r into its B, so the imported
tree always goes with `scale = 1.0`, unless every module has the same alpha / r (then B is as
stored and the scale is returned).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util
from flax.core import meta

from scdpo_jax.models import convert

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_KEY = re.compile(r"^(.*)\.lora_([AB])\.weight$")


class LoraFileError(ValueError):
  """A LoRA file that does not fit the model or is not in a format we read."""


def torch_module_name(module_path: tuple[str, ...]) -> str:
  """('down_blocks_0', 'attentions_0', ..., 'to_out_0') -> 'down_blocks.0.attentions.0....to_out.0'."""
  return ".".join(convert._flax_segments_to_torch(module_path))


def to_peft_state_dict(lora_params: Any, prefix: str = "unet.") -> dict[str, np.ndarray]:
  """The LoRA tree as a PyTorch-layout state dict with peft / diffusers keys."""
  flat = traverse_util.flatten_dict(convert.host_params(lora_params))
  out = {}
  for path, value in flat.items():
    name = torch_module_name(path[:-1])
    letter = {"lora_A": "A", "lora_B": "B"}[path[-1]]
    arr = np.asarray(value, np.float32) if value.dtype == np.float64 else np.asarray(value)
    out[f"{prefix}{name}.lora_{letter}.weight"] = np.ascontiguousarray(
        convert.torch_layout("kernel", arr))
  return out


def peft_config_dict(lora_params: Any, rank: int, alpha: float, dropout: float = 0.0,
                     init: str = "gaussian") -> dict:
  """The peft `LoraConfig` fields describing `lora_params` (what diffusers' training scripts
  store as the adapter metadata)."""
  flat = traverse_util.flatten_dict(meta.unbox(lora_params))
  targets = sorted({torch_module_name(p[:-1]) for p in flat})
  return {"r": int(rank), "lora_alpha": float(alpha), "lora_dropout": float(dropout),
          "target_modules": targets, "init_lora_weights": init if init == "gaussian" else True,
          "bias": "none", "use_dora": False, "lora_bias": False, "rank_pattern": {},
          "alpha_pattern": {}, "peft_type": "LORA"}


def save_lora(folder: str | os.PathLike, lora_params: Any, *, rank: int, alpha: float,
              dropout: float = 0.0, init: str = "gaussian", dtype: Any = None) -> Path:
  """Write `<folder>/pytorch_lora_weights.safetensors` (diffusers' UNet LoRA file)."""
  from safetensors.numpy import save_file

  state = to_peft_state_dict(lora_params)
  if dtype is not None:
    state = {k: v.astype(dtype) for k, v in state.items()}
  config = peft_config_dict(lora_params, rank, alpha, dropout, init)
  metadata = {"format": "pt", METADATA_KEY: json.dumps(
      {f"unet.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)}
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / LORA_WEIGHT_NAME
  tmp = path.with_name(path.name + ".tmp")
  save_file(state, str(tmp), metadata=metadata)
  os.replace(tmp, path)
  return path


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  from safetensors import safe_open

  with safe_open(str(path), framework="numpy") as f:
    metadata = f.metadata() or {}
    return {k: f.get_tensor(k) for k in f.keys()}, metadata


def _match_pattern(name: str, patterns: dict) -> Any:
  """peft's rank/alpha_pattern lookup: a key that equals the module name or is a '.'-suffix."""
  for key, value in patterns.items():
    if name == key or name.endswith("." + key) or re.fullmatch(key, name):
      return value
  return None


def load_lora(path: str | os.PathLike, abstract_base: Any) -> tuple[dict, float, dict]:
  """(lora_params, scale, info) from a diffusers LoRA file / folder or a peft adapter folder.

  `abstract_base`: the base model's `abstract_params` (boxed or not); every LoRA module must
  name one of its Dense / Conv kernels with matching in / out sizes (else `LoraFileError`,
  listing the offending keys). `info`: rank / alpha per module and the source format."""
  path = Path(path)
  peft_config = None
  if path.is_dir():
    if (path / LORA_WEIGHT_NAME).is_file():
      path = path / LORA_WEIGHT_NAME
    elif (path / PEFT_WEIGHT_NAME).is_file():
      peft_config = json.loads((path / PEFT_CONFIG_NAME).read_text()) if (
          path / PEFT_CONFIG_NAME).is_file() else None
      path = path / PEFT_WEIGHT_NAME
    else:
      raise LoraFileError(f"{path}: neither {LORA_WEIGHT_NAME} nor {PEFT_WEIGHT_NAME}")
  state, metadata = _read(path)
  prefixes = ("unet.", "base_model.model.")
  config: dict = {}
  if METADATA_KEY in metadata:
    raw = json.loads(metadata[METADATA_KEY])
    config = {k[len("unet."):]: v for k, v in raw.items() if k.startswith("unet.")}
  elif peft_config is not None:
    config = peft_config

  modules: dict[str, dict[str, np.ndarray]] = {}
  unexpected = []
  for key, value in state.items():
    stripped = key
    for p in prefixes:
      if stripped.startswith(p):
        stripped = stripped[len(p):]
        break
    else:
      if key.startswith("text_encoder"):
        unexpected.append(key + " (text-encoder LoRA is not supported)")
        continue
    m = _KEY.match(stripped)
    if not m:
      unexpected.append(key)
      continue
    modules.setdefault(m.group(1), {})[m.group(2)] = np.asarray(value, np.float32)

  flat_base = traverse_util.flatten_dict(meta.unbox(abstract_base))
  by_name = {torch_module_name(p[:-1]): p[:-1] for p, s in flat_base.items()
             if p[-1] == "kernel" and len(s.shape) in (2, 4)}
  rank_pattern = config.get("rank_pattern") or {}
  alpha_pattern = config.get("alpha_pattern") or {}
  out, scales, info_modules, bad = {}, {}, {}, []
  for name, ab in sorted(modules.items()):
    if name not in by_name:
      bad.append(f"{name}: no such Dense / Conv module in the model")
      continue
    if set(ab) != {"A", "B"}:
      bad.append(f"{name}: needs both lora_A and lora_B")
      continue
    module = by_name[name]
    kernel_shape = tuple(flat_base[module + ("kernel",)].shape)
    a = convert.flax_layout("kernel", ab["A"])
    b = convert.flax_layout("kernel", ab["B"])
    rank = a.shape[-1]
    if len(kernel_shape) == 2 and b.ndim == 2:
      ok = a.shape == (kernel_shape[0], rank) and b.shape == (rank, kernel_shape[1])
    else:
      ok = (a.ndim == 4 and b.shape == (1, 1, rank, kernel_shape[3])
            and a.shape == kernel_shape[:3] + (rank,))
    if not ok:
      bad.append(f"{name}: lora_A {ab['A'].shape} / lora_B {ab['B'].shape} do not fit the "
                 f"kernel {kernel_shape}")
      continue
    r = _match_pattern(name, rank_pattern) or config.get("r", rank)
    if int(r) != rank:
      bad.append(f"{name}: rank {rank} in the file, {r} in its config")
      continue
    alpha = _match_pattern(name, alpha_pattern) or config.get("lora_alpha", rank)
    scales[name] = float(alpha) / rank
    info_modules[name] = {"rank": rank, "alpha": float(alpha)}
    out[module + ("lora_A",)] = a
    out[module + ("lora_B",)] = b
  if unexpected or bad:
    items = unexpected + bad
    raise LoraFileError(f"LoRA file {path} does not fit the model: {len(items)} problems: "
                        + "; ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
  if not out:
    raise LoraFileError(f"LoRA file {path} holds no UNet LoRA weights")
  distinct = set(scales.values())
  if len(distinct) == 1:
    scale = distinct.pop()
  else:
    scale = 1.0
    for name, module in ((n, by_name[n]) for n in scales):
      out[module + ("lora_B",)] = out[module + ("lora_B",)] * scales[name]
  info = {"source": str(path), "modules": info_modules}
  return traverse_util.unflatten_dict(out), scale, info
