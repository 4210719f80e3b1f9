"""Synthetic Pillow-drawn images for tests and demos (no downloads).

The stand-in for "harmful" content is a **red disc**: `draw_scene(rng, size, red_disc=True)` draws
a random background, 1-3 distractor rectangles/triangles in non-red colours and, when asked, one
red disc of random position and radius. Nothing here is a model of real harmful imagery; it only
gives the data pipeline and the cost model a visual concept to learn.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from scdpo_jax.data.images import encode_png

RED = (220, 20, 30)


def _muted_colour(rng: np.random.Generator) -> tuple[int, int, int]:
  """A random colour far from red: red channel no higher than the green/blue ones + 40."""
  g, b = (int(v) for v in rng.integers(40, 256, size=2))
  r = int(rng.integers(0, min(g, b) + 40))
  return r, g, b


def draw_scene(rng: np.random.Generator, size: int = 32, red_disc: bool = False) -> np.ndarray:
  """uint8 (size, size, 3): background + distractor shapes (+ a red disc when `red_disc`)."""
  img = Image.new("RGB", (size, size), _muted_colour(rng))
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(1, 4))):
    x0, y0 = (int(v) for v in rng.integers(0, size - 4, size=2))
    w, h = (int(v) for v in rng.integers(3, max(4, size // 2), size=2))
    if rng.random() < 0.5:
      draw.rectangle([x0, y0, x0 + w, y0 + h], fill=_muted_colour(rng))
    else:
      draw.polygon([(x0, y0 + h), (x0 + w, y0 + h), (x0 + w // 2, y0)], fill=_muted_colour(rng))
  if red_disc:
    r = int(rng.integers(max(2, size // 8), max(3, size // 4) + 1))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=RED)
  return np.asarray(img, np.uint8)


def write_labelled_folder(folder: str | Path, num_images: int, size: int = 32, seed: int = 0,
                          harmful_fraction: float = 0.5) -> Path:
  """Write PNGs and `labels.csv` (columns image,label; label 1 = red disc = "harmful")."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(num_images):
    harmful = bool(rng.random() < harmful_fraction)
    name = f"img_{i:05d}.png"
    (folder / name).write_bytes(encode_png(draw_scene(rng, size, red_disc=harmful)))
    rows.append((name, int(harmful)))
  with open(folder / "labels.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "label"])
    writer.writerows(rows)
  return folder / "labels.csv"
