"""LoRA files in the diffusers / peft format, in and out, without torch.

Export (`save_lora`): `<folder>/pytorch_lora_weights.safetensors`, the file diffusers'
`StableDiffusionPipeline.save_lora_weights` writes and `load_lora_weights` reads:

* keys `unet.<module>.lora_A.weight` (r, in[, kh, kw]) and `unet.<module>.lora_B.weight`
  (out, r[, 1, 1]), `<module>` the diffusers module name (`down_blocks.0.attentions.0.
  transformer_blocks.0.attn1.to_q`), peft's naming for the default adapter;
* with a text-encoder LoRA also `text_encoder.<module>.lora_A.weight` / `.lora_B.weight`,
  `<module>` transformers' name with the `text_model.` root (`text_model.encoder.layers.0.
  self_attn.q_proj`): what diffusers wrote with transformers 4; diffusers strips the root for
  transformers >= 5, whose `CLIPTextModel` has none, so the file loads with both;
* safetensors metadata `lora_adapter_metadata`: the peft `LoraConfig` fields under the `unet.`
  (and `text_encoder.`, target names without the root) prefix (`unet.r`, `unet.lora_alpha`,
  `unet.target_modules`, ...), which diffusers uses instead of guessing alpha = r, so a LoRA
  with alpha != rank loads with its scale.

Import (`load_lora`): that file (with or without metadata: without, alpha = rank per module,
diffusers' convention), or a peft `save_pretrained` folder (`adapter_model.safetensors` with
`base_model.model.` keys + `adapter_config.json`). Per-module ranks / alphas (`rank_pattern`,
`alpha_pattern`) are honoured by folding each module's alpha / r into its B, so the imported
tree always goes with `scale = 1.0`, unless every module has the same alpha / r (then B is as
stored and the scale is returned). A file with `text_encoder.` keys (either module naming)
loads when the text encoder's abstract params are given: the result is then the pair
{"unet": ..., "text_encoder": ...} that text-encoder LoRA training holds (`lora/text_encoder.py`).
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

from scdpo_jax.lora.adapters import TEXT_ENCODER, UNET
from scdpo_jax.models import convert

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_KEY = re.compile(r"^(.*)\.lora_([AB])\.weight$")
# Key prefix -> the component it adapts (peft's own folders: the UNet wrapped as base_model.model)
KEY_PREFIXES = {"unet.": UNET, "text_encoder.": TEXT_ENCODER, "base_model.model.": UNET}
PREFIX_OF = {UNET: "unet.", TEXT_ENCODER: "text_encoder."}
TEXT_ROOT = "text_model."  # our (and transformers 4's) CLIPTextModel root module


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
              dropout: float = 0.0, init: str = "gaussian", dtype: Any = None,
              text_encoder_lora: Any = None) -> Path:
  """Write `<folder>/pytorch_lora_weights.safetensors` (diffusers' LoRA file): `lora_params`
  (the UNet's) and, if given, `text_encoder_lora` (the text encoder's, same rank and alpha)."""
  from safetensors.numpy import save_file

  components = {UNET: lora_params}
  if text_encoder_lora is not None:
    components[TEXT_ENCODER] = text_encoder_lora
  state, metadata_fields = {}, {}
  for component, tree in components.items():
    prefix = PREFIX_OF[component]
    state.update(to_peft_state_dict(tree, prefix=prefix))
    config = peft_config_dict(tree, rank, alpha, dropout, init)
    if component == TEXT_ENCODER:  # diffusers strips the root from keys, not from targets; peft
      # matches a target as a '.'-suffix, so rootless names fit transformers 4 and 5 alike
      config["target_modules"] = sorted(t.removeprefix(TEXT_ROOT)
                                        for t in config["target_modules"])
    metadata_fields.update({f"{prefix}{k}": v for k, v in config.items()})
  if dtype is not None:
    state = {k: v.astype(dtype) for k, v in state.items()}
  metadata = {"format": "pt", METADATA_KEY: json.dumps(metadata_fields, indent=2,
                                                       sort_keys=True)}
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


def _resolve_file(path: Path) -> tuple[Path, dict | None]:
  """(the safetensors file, peft's adapter_config.json or None) of a file or folder."""
  if not path.is_dir():
    return path, None
  if (path / LORA_WEIGHT_NAME).is_file():
    return path / LORA_WEIGHT_NAME, None
  if (path / PEFT_WEIGHT_NAME).is_file():
    config_file = path / PEFT_CONFIG_NAME
    return (path / PEFT_WEIGHT_NAME,
            json.loads(config_file.read_text()) if config_file.is_file() else None)
  raise LoraFileError(f"{path}: neither {LORA_WEIGHT_NAME} nor {PEFT_WEIGHT_NAME}")


def _component_configs(metadata: dict, peft_config: dict | None) -> dict[str, dict]:
  """Each component's peft LoraConfig fields (diffusers' metadata per prefix, or peft's
  adapter_config.json for the UNet; {} when the file has none)."""
  if METADATA_KEY in metadata:
    raw = json.loads(metadata[METADATA_KEY])
    return {c: {k[len(p):]: v for k, v in raw.items() if k.startswith(p)}
            for c, p in PREFIX_OF.items()}
  return {UNET: peft_config or {}, TEXT_ENCODER: {}}


def _component_key(key: str) -> tuple[str | None, str]:
  """(component, module key without its prefix) of a state-dict key; (None, key) if unknown."""
  for prefix, component in KEY_PREFIXES.items():
    if key.startswith(prefix):
      name = key[len(prefix):]
      if component == TEXT_ENCODER and not name.startswith(TEXT_ROOT):
        name = TEXT_ROOT + name  # written with transformers >= 5 (no text_model root)
      return component, name
  return None, key


def _fit(modules: dict, abstract: Any, config: dict, label: str):
  """Check a component's (A, B) factors against its base kernels and convert them to Flax
  layouts: (flat tree, scale per module path, info per module name, problems)."""
  flat_base = traverse_util.flatten_dict(meta.unbox(abstract))
  by_name = {torch_module_name(p[:-1]): p[:-1] for p, s in flat_base.items()
             if p[-1] == "kernel" and len(s.shape) in (2, 4)}
  rank_pattern = config.get("rank_pattern") or {}
  alpha_pattern = config.get("alpha_pattern") or {}
  out, scales, info, bad = {}, {}, {}, []
  for name, ab in sorted(modules.items()):
    if name not in by_name:
      bad.append(f"{label}{name}: no such Dense / Conv module in the model")
      continue
    if set(ab) != {"A", "B"}:
      bad.append(f"{label}{name}: needs both lora_A and lora_B")
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
      bad.append(f"{label}{name}: lora_A {ab['A'].shape} / lora_B {ab['B'].shape} do not fit "
                 f"the kernel {kernel_shape}")
      continue
    r = _match_pattern(name, rank_pattern) or config.get("r", rank)
    if int(r) != rank:
      bad.append(f"{label}{name}: rank {rank} in the file, {r} in its config")
      continue
    alpha = _match_pattern(name, alpha_pattern) or config.get("lora_alpha", rank)
    scales[module] = float(alpha) / rank
    info[label + name] = {"rank": rank, "alpha": float(alpha)}
    out[module + ("lora_A",)] = a
    out[module + ("lora_B",)] = b
  return out, scales, info, bad


def load_lora(path: str | os.PathLike, abstract_base: Any,
              abstract_text_encoder: Any = None) -> tuple[dict, float, dict]:
  """(lora_params, scale, info) from a diffusers LoRA file / folder or a peft adapter folder.

  `abstract_base`: the base UNet's `abstract_params` (boxed or not); every LoRA module must
  name one of its Dense / Conv kernels with matching in / out sizes (else `LoraFileError`,
  listing the offending keys). `abstract_text_encoder`: the CLIP text encoder's, needed for a
  file with `text_encoder.` keys; `lora_params` is then {"unet": ..., "text_encoder": ...}
  (else the UNet's tree). `info`: rank / alpha per module (text-encoder modules named with
  their `text_encoder.` prefix) and the source format."""
  path, peft_config = _resolve_file(Path(path))
  state, metadata = _read(path)
  configs = _component_configs(metadata, peft_config)

  modules: dict[str, dict] = {UNET: {}, TEXT_ENCODER: {}}
  unexpected = []
  for key, value in state.items():
    component, stripped = _component_key(key)
    m = _KEY.match(stripped) if component else None
    if not m:
      unexpected.append(key)
      continue
    modules[component].setdefault(m.group(1), {})[m.group(2)] = np.asarray(value, np.float32)
  if modules[TEXT_ENCODER] and abstract_text_encoder is None:
    unexpected.append(f"{len(modules[TEXT_ENCODER])} text-encoder LoRA modules (pass the text "
                      "encoder's abstract params to load them)")
    modules[TEXT_ENCODER] = {}

  bases = {UNET: abstract_base, TEXT_ENCODER: abstract_text_encoder}
  flat_trees, scales, info_modules, bad = {}, {}, {}, []
  for component, found in modules.items():
    if not found:
      flat_trees[component] = {}
      continue
    label = "" if component == UNET else PREFIX_OF[component]
    flat, comp_scales, comp_info, comp_bad = _fit(found, bases[component], configs[component],
                                                  label)
    flat_trees[component] = flat
    scales.update({(component, m): s for m, s in comp_scales.items()})
    info_modules.update(comp_info)
    bad.extend(comp_bad)
  if unexpected or bad:
    items = unexpected + bad
    raise LoraFileError(f"LoRA file {path} does not fit the model: {len(items)} problems: "
                        + "; ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
  if not scales:
    raise LoraFileError(f"LoRA file {path} holds no LoRA weights")
  distinct = set(scales.values())
  if len(distinct) == 1:
    scale = distinct.pop()
  else:  # fold each module's alpha / r into its B: one tree, scale 1
    scale = 1.0
    for (component, module), s in scales.items():
      flat_trees[component][module + ("lora_B",)] = flat_trees[component][module + ("lora_B",)] * s
  info = {"source": str(path), "modules": info_modules}
  trees = {c: traverse_util.unflatten_dict(f) for c, f in flat_trees.items()}
  if modules[TEXT_ENCODER]:
    return trees, scale, info
  return trees[UNET], scale, info
