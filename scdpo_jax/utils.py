"""Small shared helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def flat_dict(node: Any, prefix: str = "") -> dict[str, Any]:
  """A nested mapping (dict or ConfigDict) as {"a.b.c": leaf}; lists and tuples are leaves."""
  if hasattr(node, "items"):
    out: dict[str, Any] = {}
    for k, v in node.items():
      out.update(flat_dict(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: node}


def save_image_grid(images: np.ndarray, path, columns: int | None = None) -> Path:
  """Save (B, H, W, C) images as one PNG grid (`columns` per row, default all; white padding).

  uint8 images are written as they are; float images are taken to be in [-1, 1] and converted
  with `data.images.to_uint8` (rounded, as every image the package writes)."""
  from PIL import Image

  from scdpo_jax.data.images import to_uint8

  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  b, h, w, c = images.shape
  columns = columns or b
  rows = -(-b // columns)
  grid = np.full((rows * h, columns * w, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(path)
  return path


def in_fixed_batches(fn, params, inputs: np.ndarray, batch_size: int) -> np.ndarray:
  """`fn(params, chunk)` over `inputs` in chunks of exactly `batch_size` rows (the last one padded
  by repeating its final row, the padding dropped from the output), so a jitted `fn` compiles
  once; outputs concatenated as float32."""
  out = []
  for start in range(0, len(inputs), batch_size):
    chunk = inputs[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(params, chunk), np.float32)[:batch_size - pad])
  return np.concatenate(out)
