"""Safety cost model C(x) = adapter(e(x)): a frozen CLIP image tower e and a small trainable MLP.

* e(x): our Flax `CLIPVisionModel` (weights from a local HF CLIP folder via `load_clip_vision`).
  The embedding is `image_embeds` (the projected CLIP embedding) when the tower has a visual
  projection, else `pooler_output` (post-LayerNorm CLS state). Shape (B, D).
* adapter: optional L2 normalisation of e (CLIP embeddings are compared by cosine), then
  Dense(hidden) -> GELU -> Dense(1): a scalar cost per image, shape (B,). Only the adapter is
  trained; the tower is never differentiated through (embeddings are computed once).
* Input images are NHWC float in [-1, 1] (the VAE/diffusion range). `clip_preprocess` maps them
  to CLIP's input: resize the shorter side to `image_size` (bicubic, antialiased, as
  `CLIPImageProcessor`'s PIL bicubic resize), centre crop, clamp to [0, 1], then
  (x - CLIP_MEAN) / CLIP_STD per channel. It follows CLIPImageProcessor's steps; values differ
  from it only by resampling details (JAX vs PIL kernels, no uint8 rounding).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: jax.Array, image_size: int) -> jax.Array:
  """NHWC images in [-1, 1] -> CLIP pixel_values (B, image_size, image_size, 3) (see module doc)."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected NHWC RGB images (B, H, W, 3), got {images.shape}")
  b, h, w, _ = images.shape
  x = (images.astype(jnp.float32) + 1.0) * 0.5
  scale = image_size / min(h, w)
  new_h, new_w = max(image_size, round(h * scale)), max(image_size, round(w * scale))
  if (new_h, new_w) != (h, w):
    x = jax.image.resize(x, (b, new_h, new_w, 3), method="bicubic", antialias=True)
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  x = jnp.clip(x[:, top:top + image_size, left:left + image_size], 0.0, 1.0)
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def tower_embedding(vision_module, params: Any, images: jax.Array) -> jax.Array:
  """Frozen CLIP embedding (B, D) of [-1, 1] NHWC images (projection if the tower has one)."""
  pixel_values = clip_preprocess(images, vision_module.config.image_size)
  out = vision_module.apply({"params": params}, pixel_values)
  emb = out.image_embeds if out.image_embeds is not None else out.pooler_output
  return jax.lax.stop_gradient(emb.astype(jnp.float32))


class CostAdapter(nn.Module):
  """(B, D) CLIP embeddings -> (B,) costs: [L2-normalise] -> Dense(hidden) -> GELU -> Dense(1)."""

  hidden_dim: int = 256
  normalize_input: bool = True

  @nn.compact
  def __call__(self, embeds: jax.Array) -> jax.Array:
    if embeds.ndim != 2:
      raise ValueError(f"CostAdapter expects (B, D) embeddings, got {embeds.shape}")
    x = embeds.astype(jnp.float32)
    if self.normalize_input:
      x = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
    x = nn.gelu(nn.Dense(self.hidden_dim, name="hidden")(x))
    return nn.Dense(1, name="out")(x)[:, 0]


def make_embedder(vision_module, vision_params: Any, *, batch_size: int = 64, mesh=None,
                  rules=None) -> Callable[[np.ndarray], np.ndarray]:
  """A host function: float (N, H, W, 3) in [-1, 1] -> float32 (N, D) embeddings.

  Runs one jitted function per input resolution on batches of `batch_size` (rounded up to the
  mesh's batch divisor; the last batch padded), inputs sharded over the mesh axes of the rules'
  `batch` entry, the tower's weights placed by their logical axis names and the tower traced
  under `rules` (default `parallel.DEFAULT_RULES`), so its activation constraints apply. The
  default mesh is this process's devices.
  """
  from scdpo_jax import parallel
  from scdpo_jax.models import layers

  rules = parallel.rules_from_config(parallel.DEFAULT_RULES if rules is None else rules)
  mesh = mesh if mesh is not None else parallel.make_mesh(devices=jax.local_devices())
  divisor = parallel.batch_divisor(mesh, rules)
  batch_size = -(-int(batch_size) // divisor) * divisor
  shardings = parallel.logical_shardings(layers.abstract_params(vision_module), mesh, rules)
  params = jax.device_put(vision_params, shardings)
  fn = jax.jit(parallel.with_logical_rules(
      lambda p, x: tower_embedding(vision_module, p, x), mesh, rules),
      in_shardings=(shardings, parallel.batch_sharding(mesh, 4, rules)),
      out_shardings=parallel.batch_sharding(mesh, 2, rules))

  def embed(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images (N, H, W, 3) in [-1, 1], got {images.shape}")
    outs = []
    for lo in range(0, len(images), batch_size):
      part = images[lo:lo + batch_size]
      m = len(part)
      if m < batch_size:
        part = np.concatenate([part, np.repeat(part[-1:], batch_size - m, axis=0)])
      outs.append(np.asarray(fn(params, part))[:m])
    if not outs:
      raise ValueError("no images to embed")
    return np.concatenate(outs)

  return embed


def random_vision_tower(config: dict, seed: int = 0):
  """A randomly initialised CLIP vision tower (tests and demos only: it knows nothing about
  images). `config` holds `CLIPVisionConfig` fields. Returns (module, params)."""
  from flax.core import meta

  from scdpo_jax.models import clip, clip_config

  cfg = clip_config.CLIPVisionConfig.from_dict(dict(config))
  module = clip.CLIPVisionModel(cfg, with_projection=True)
  dummy = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
  params = jax.jit(module.init)(jax.random.key(seed), dummy)["params"]
  return module, meta.unbox(params)
