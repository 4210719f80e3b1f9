"""Reading and writing model folders (diffusers / Hugging Face layout) without torch.

Every error names the path and what was expected there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from scdpo_jax.errors import UserError


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """A model folder, component or weight file is missing or unusable."""


BIN_CONVERT_HINT = (
    "only PyTorch pickle weights ({found}) were found; scdpo-jax reads .safetensors without torch. "
    "Convert once where torch is installed, e.g.\n"
    "  python -c \"import torch, safetensors.torch as st; "
    "st.save_file(torch.load('{bin}', map_location='cpu'), '{target}')\"\n"
    "or load the model with diffusers/transformers and call save_pretrained(..., "
    "safe_serialization=True).")


def require_dir(path: str | os.PathLike, what: str) -> Path:
  path = Path(path)
  if not path.exists():
    raise CheckpointNotFoundError(f"{what} folder not found: {path}")
  if not path.is_dir():
    raise CheckpointNotFoundError(f"{what} must be a folder, got a file: {path}")
  return path


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
  path = Path(path)
  if not path.is_file():
    raise CheckpointNotFoundError(f"{what} not found: expected the JSON file {path}")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} at {path} is not valid JSON: {e}") from e


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    json.dump(dict(data), f, indent=2, sort_keys=True)
    f.write("\n")


class CheckpointReadError(UserError, ValueError):
  """A weights file exists but cannot be read."""


def read_safetensors_file(path: Path, what: str) -> dict[str, np.ndarray]:
  """One `.safetensors` file as NumPy arrays; a damaged file is an error that names it."""
  from safetensors.numpy import load_file

  try:
    return dict(load_file(str(path)))
  except Exception as e:  # safetensors raises SafetensorError / OSError with no file name
    size = path.stat().st_size
    raise CheckpointReadError(
        f"{what}: cannot read {path} ({size} bytes): {e}. Expected a complete .safetensors "
        "file (an 8-byte header length, a JSON header, then the tensor data); the file is "
        "probably truncated or was still being written: copy it again") from None


def load_safetensors(folder: str | os.PathLike, stem: str, what: str,
                     variant: str | None = None) -> dict[str, np.ndarray]:
  """Load `<stem>[.<variant>].safetensors` (or its sharded `.safetensors.index.json`) from folder.

  `stem` is "diffusion_pytorch_model" for diffusers components and "model" for transformers ones.
  """
  folder = require_dir(folder, what)
  name = f"{stem}.{variant}" if variant else stem
  single = folder / f"{name}.safetensors"
  index = folder / f"{name}.safetensors.index.json"
  if single.is_file():
    return read_safetensors_file(single, what)
  if index.is_file():
    weight_map = read_json(index, f"{what} shard index")["weight_map"]
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = folder / shard
      if not shard_path.is_file():
        raise CheckpointNotFoundError(
            f"{what}: shard {shard_path} listed in {index} is missing")
      out.update(read_safetensors_file(shard_path, what))
    return out
  bins = sorted(p.name for p in folder.glob("*.bin"))
  if bins:
    raise CheckpointNotFoundError(
        f"{what} in {folder}: expected {single.name}; " + BIN_CONVERT_HINT.format(
            found=", ".join(bins), bin=folder / bins[0], target=single))
  present = sorted(p.name for p in folder.iterdir())
  raise CheckpointNotFoundError(
      f"{what} weights not found: expected {single} (or {index.name}); the folder holds "
      f"{present or 'nothing'}")


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
  from safetensors.numpy import save_file

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # (reshape: np.ascontiguousarray makes 0-d arrays, e.g. CLIPModel's logit_scale, 1-d)
  save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in state_dict.items()},
            str(path),
            metadata=dict(metadata or {"format": "pt"}))
