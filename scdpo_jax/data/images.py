"""Host-side image helpers: encoded bytes <-> uint8 arrays, resizing, value ranges.

Conventions: decoded images are uint8 (H, W, 3) RGB, channels-last. Model images are float32
(..., H, W, 3) in [-1, 1] (`x = u8 / 127.5 - 1`), the VAE's input range. `to_model_range` and
`to_uint8` are the package's one pair of conversions between the two (the samplers, the metrics,
the grids and ShapeWorld all use them); `to_uint8` rounds half to even and is bit-identical to
diffusers' `numpy_to_pil((x / 2 + 0.5).clamp(0, 1))`, and uint8 -> float -> uint8 is exact.
Resizing follows the Stable Diffusion training recipes (torchvision `Resize(size)` +
`CenterCrop(size)`): scale the shorter side to `size` with bicubic interpolation, then crop the
centre square. This is also what `CLIPImageProcessor` does before normalising.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


class UnreadableImageError(ValueError):
  """The bytes are not an image Pillow can decode (truncated, wrong format, empty)."""


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes (PNG, JPEG, WebP, ... anything Pillow reads) -> uint8 (H, W, 3) RGB."""
  if not data:
    raise UnreadableImageError("empty image bytes")
  try:
    with Image.open(io.BytesIO(bytes(data))) as img:
      img.load()  # decode fully: truncated files fail here, not later
      return np.asarray(img.convert("RGB"), np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise UnreadableImageError(f"cannot decode image ({len(data)} bytes): {e}") from e


def encode_png(image: np.ndarray) -> bytes:
  """uint8 (H, W, 3) -> PNG bytes."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"encode_png expects uint8 (H, W, 3), got {image.dtype} {image.shape}")
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def center_crop_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
  """(new_h, new_w, top, left) of `resize_center_crop` on an h x w image: the shorter side
  scaled to `size`, then the crop's top-left corner in the resized image (SDXL's
  `crops_coords_top_left`)."""
  if (h, w) == (size, size):
    return size, size, 0, 0
  scale = size / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  return new_h, new_w, (new_h - size) // 2, (new_w - size) // 2


def image_size(data: bytes) -> tuple[int, int]:
  """(height, width) of encoded image bytes (reads the header only)."""
  try:
    with Image.open(io.BytesIO(bytes(data))) as img:
      return img.height, img.width
  except (OSError, SyntaxError, ValueError) as e:
    raise UnreadableImageError(f"cannot read the image size ({len(data)} bytes): {e}") from e


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8 (size, size, 3): bicubic resize of the shorter side, centre crop."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  new_h, new_w, top, left = center_crop_box(h, w, size)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
  return resized[top:top + size, left:left + size]


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (any leading shape)."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255]: round((x + 1) * 127.5) half to even, clipped (any leading
  shape)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def load_model_images(encoded: list[bytes], size: int) -> np.ndarray:
  """Decode, resize/centre-crop to `size` and map to [-1, 1]: float32 (B, size, size, 3)."""
  out = np.empty((len(encoded), size, size, 3), np.float32)
  for i, data in enumerate(encoded):
    out[i] = to_model_range(resize_center_crop(decode_image(data), size))
  return out
