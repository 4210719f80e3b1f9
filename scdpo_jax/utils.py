"""Small shared helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_image_grid(images: np.ndarray, path, columns: int | None = None) -> Path:
  """Save (B, H, W, 3) images in [-1, 1] as one PNG grid (`columns` per row, default all)."""
  from PIL import Image

  images = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
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
