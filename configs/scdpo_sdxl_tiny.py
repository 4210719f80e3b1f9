"""SC-DPO on a tiny random SDXL pipeline and random in-memory pairs: the SDXL trainer on a CPU.

  python main.py --config configs/scdpo_sdxl_tiny.py --workdir runs/scdpo_sdxl_tiny   # ~30 s, CPU

The base is written once into the workdir (`models/tiny.py`: a `text_encoder_2` entry makes it a
StableDiffusionXLPipeline folder, which the trainer detects from its model_index.json): an SDXL-
layout UNet ("text_time" added embedding, linear projections) at toy width, two text encoders
(the second with a projection) whose penultimate states concatenate to the UNet's 48-wide
cross-attention, SDXL's VAE scaling factor and Euler scheduler. The step conditions winner,
loser and reference on both encoders' states plus added_cond_kwargs (pooled text_embeds, time
ids). Everything else is configs/scdpo_tiny.py; the recipe values of the real run are
configs/scdpo_sdxl.py's (Adafactor, its lr and warmup, remat), kept here where they are cheap.
The numbers it prints mean nothing: the base and the pairs are random.
"""

import ml_collections

from configs import scdpo_tiny

TIME_EMBED_DIM, NUM_TIME_IDS, PROJECTION_DIM = 8, 6, 16


def tiny_sdxl_pipeline_config() -> ml_collections.ConfigDict:
  """Tiny SDXL components (diffusers config.json keys; `tiny.py` builds them)."""
  base = scdpo_tiny.get_config().model.tiny
  c = ml_collections.ConfigDict()
  c.text_encoder = ml_collections.ConfigDict(dict(
      vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu",
      bos_token_id=512, eos_token_id=513, pad_token_id=513))
  c.text_encoder_2 = ml_collections.ConfigDict(dict(
      vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
      projection_dim=PROJECTION_DIM, bos_token_id=512, eos_token_id=513, pad_token_id=0))
  c.unet = ml_collections.ConfigDict(dict(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,),
      layers_per_block=1, cross_attention_dim=16 + 32, attention_head_dim=(4,),
      transformer_layers_per_block=(1,), use_linear_projection=True,
      addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
      projection_class_embeddings_input_dim=PROJECTION_DIM + NUM_TIME_IDS * TIME_EMBED_DIM,
      down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)))
  c.vae = ml_collections.ConfigDict(dict(base.vae.to_dict(), scaling_factor=0.13025,
                                         force_upcast=True))
  c.scheduler = ml_collections.ConfigDict(dict(  # SDXL base's scheduler_config.json
      _class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085,
      beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
      timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
      use_karras_sigmas=False))
  return c


def get_config():
  config = scdpo_tiny.get_config()
  config.model.tiny = tiny_sdxl_pipeline_config()
  config.model.remat_policy = "block"  # the SDXL recipe's gradient checkpointing
  config.data.num_pairs = 32
  config.train.update(dict(pairs_per_step=8, grad_accum=2, num_steps=10))
  config.optimizer.update(dict(name="adafactor", lr=1e-6, scale_lr=True, warmup_steps=2))
  config.checkpoint.every_steps = 10
  config.log.every_steps = 5
  return config
