"""Shared pieces of the benchmarks: SD1.5-sized configs and cheap random weights."""

from __future__ import annotations

import numpy as np

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                   num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                   hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                   pad_token_id=49407)
SD15_SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000,
                      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                      steps_offset=1, timestep_spacing="leading")

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), norm_num_groups=32, sample_size=16,
                scaling_factor=0.18215, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2)
TINY_TEXT = dict(CLIP_L_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4)


def random_params(abstract_tree, seed: int = 0, scale: float = 0.02):
  """Host NumPy weights shaped like `abstract_tree` (ShapeDtypeStructs): N(0, scale^2) for
  matrices, 1 for norm scales, 0 for biases. Seconds for SD1.5, where a jitted random `init`
  spends minutes compiling on a GPU; speed does not depend on the values."""
  import jax
  from flax import traverse_util
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(abstract_tree)
  out = {}
  for path, leaf in flat.items():
    if path[-1] == "scale":
      out[path] = np.ones(leaf.shape, np.float32)
    elif path[-1] == "bias":
      out[path] = np.zeros(leaf.shape, np.float32)
    else:
      out[path] = (rng.standard_normal(leaf.shape, np.float32) * scale)
  return traverse_util.unflatten_dict(out)
