"""Shared builders for the data and cost-model tests: synthetic images and tiny models."""

from __future__ import annotations

import numpy as np

from scdpo_jax.data.images import encode_png

TINY_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=32, sample_size=16, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_TEXT = dict(
    vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=32, hidden_act="quick_gelu",
    bos_token_id=512, eos_token_id=513, pad_token_id=513)


def solid(colour: tuple[int, int, int], h: int = 12, w: int = 12) -> np.ndarray:
  return np.broadcast_to(np.asarray(colour, np.uint8), (h, w, 3)).copy()


def gradient_image(seed: int, h: int = 20, w: int = 24) -> np.ndarray:
  """A smooth random image (so that resizing and VAE encoding see structure)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  base = rng.uniform(0, 1, (3, 3))
  img = np.stack([base[c, 0] + base[c, 1] * xx + base[c, 2] * yy for c in range(3)], -1)
  return np.clip(img / img.max() * 255, 0, 255).astype(np.uint8)


def png(image: np.ndarray) -> bytes:
  return encode_png(image)


def tiny_sd_folder(folder, seed: int = 0):
  """Save a VAE + text encoder + byte-level tokenizer (no UNet) as a diffusers folder."""
  import jax
  import jax.numpy as jnp
  from flax.core import meta

  from scdpo_jax.models import clip, clip_config, pipeline, tokenizer, vae, vae_config

  k1, k2 = jax.random.split(jax.random.key(seed))
  sd = pipeline.StableDiffusion()
  sd.vae = vae.AutoencoderKL(vae_config.VAEConfig.from_dict(TINY_VAE))
  sd.vae_params = meta.unbox(jax.jit(sd.vae.init)(k1, jnp.zeros((1, 16, 16, 3)))["params"])
  sd.text_encoder = clip.CLIPTextModel(clip_config.CLIPTextConfig.from_dict(TINY_TEXT))
  sd.text_encoder_params = meta.unbox(
      jax.jit(sd.text_encoder.init)(k2, jnp.zeros((1, 32), jnp.int32))["params"])
  tok_dir = tokenizer.write_byte_level_tokenizer(folder / "_tok", 32)
  sd.tokenizer = tokenizer.load_tokenizer(tok_dir, 32)
  pipeline.save_stable_diffusion(folder / "sd", sd, tokenizer_folder=tok_dir)
  return folder / "sd"
