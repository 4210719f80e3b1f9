"""Check a Stable Diffusion folder end to end (text encoder -> UNet -> VAE) with our Flax models.

  python main.py --config configs/default.py --workdir runs/inspect   # ~1 min on a 2-core CPU

Without `model.pretrained` it builds a tiny random pipeline of our own model classes, exports it
in diffusers format and loads it back. Point it at a real checkpoint with
`--config.model.pretrained=/path/to/stable-diffusion-v1-5` (needs a GPU/TPU for SD-sized models).
"""

import ml_collections


def tiny_pipeline_config() -> ml_collections.ConfigDict:
  """Tiny SD1-style components (diffusers config.json keys)."""
  c = ml_collections.ConfigDict()
  c.unet = ml_collections.ConfigDict(dict(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
  c.vae = ml_collections.ConfigDict(dict(
      in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
      latent_channels=4, norm_num_groups=32, sample_size=16, scaling_factor=0.18215,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))
  c.text_encoder = ml_collections.ConfigDict(dict(
      vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=32, hidden_act="quick_gelu",
      bos_token_id=512, eos_token_id=513, pad_token_id=513))
  c.scheduler = ml_collections.ConfigDict(dict(
      _class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085,
      beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
      clip_sample=False, set_alpha_to_one=False, steps_offset=1))
  return c


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = "inspect"
  config.seed = 0
  config.prompts = ("a photo of a cat", "a red square on a blue background")
  config.model = ml_collections.ConfigDict()
  config.model.pretrained = ""  # a diffusers-format SD folder; "" = tiny random pipeline
  config.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
  config.model.attention_impl = "xla"  # "xla" | "cudnn" | "auto"
  config.model.tiny = tiny_pipeline_config()
  return config
