"""Tiny random PyTorch SDXL references (test-only: torch, diffusers, transformers).

`tiny_torch_sdxl_pipeline` builds a diffusers `StableDiffusionXLPipeline` with the SDXL layout
at toy width: a first `DownBlock2D` without attention, per-block transformer depth (1, 2, 3) and
heads, linear projections, "text_time" additional embeddings, two text encoders (a CLIP text
model, 16 wide, pooling at eos_token_id; a CLIP text model with projection, 24 wide, legacy
argmax pooling as OpenCLIP-bigG's config has it) whose penultimate states concatenate to the
UNet's 40-wide cross-attention, a second tokenizer padding with "!" (id 0, as SDXL's
tokenizer_2 does), a VAE with SDXL's scaling factor and the Euler scheduler of SDXL.
"""

from __future__ import annotations

import numpy as np

TEXT_1 = dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu",
              bos_token_id=512, eos_token_id=513, pad_token_id=513)
TEXT_2 = dict(vocab_size=514, hidden_size=24, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
              projection_dim=20, bos_token_id=0, eos_token_id=2, pad_token_id=1)
TIME_EMBED_DIM = 8
NUM_TIME_IDS = 6
UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
    layers_per_block=1, cross_attention_dim=TEXT_1["hidden_size"] + TEXT_2["hidden_size"],
    attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 3),
    use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=TEXT_2["projection_dim"]
    + NUM_TIME_IDS * TIME_EMBED_DIM,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=32, sample_size=16, scaling_factor=0.13025,
    force_upcast=True, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2)
SCHEDULER = dict(  # SDXL base's scheduler_config.json
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    interpolation_type="linear", use_karras_sigmas=False)

def perturb(*modules, scale: float = 0.05) -> None:
  """Random (not zero-initialised) weights everywhere, so every parameter matters."""
  import torch

  with torch.no_grad():
    for m in modules:
      for p in m.parameters():
        p.add_(scale * torch.randn_like(p))


def tiny_torch_vae(seed: int, **overrides):
  import diffusers
  import torch

  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(**{**VAE, **overrides})
  perturb(vae)
  return vae.eval()


def tiny_torch_sdxl_pipeline(folder, tokenizer_folder):
  """The tiny random SDXL pipeline of the module docstring, saved to `folder`; returned."""
  import diffusers
  import torch
  import transformers

  from scdpo_jax.models import tokenizer

  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**UNET)
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_1))
  text_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT_2))
  perturb(unet, text, text_2)
  vae = tiny_torch_vae(1)
  max_len = TEXT_1["max_position_embeddings"]
  tok = tokenizer.write_byte_level_tokenizer(tokenizer_folder / "tokenizer", max_len)
  tok_2 = tokenizer.write_byte_level_tokenizer(tokenizer_folder / "tokenizer_2", max_len,
                                               pad_token="!")
  pipe = diffusers.StableDiffusionXLPipeline(
      vae=vae, text_encoder=text.eval(), text_encoder_2=text_2.eval(),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(str(tok)),
      tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(tok_2)), unet=unet.eval(),
      scheduler=diffusers.EulerDiscreteScheduler(**SCHEDULER), add_watermarker=False)
  pipe.save_pretrained(folder)
  return pipe


def time_ids_example(batch: int) -> np.ndarray:
  """Distinct micro-conditioning rows (original h, w, crop top, left, target h, w)."""
  rows = [[16, 16, 0, 0, 16, 16], [1024, 768, 32, 8, 16, 16], [512, 512, 4, 0, 8, 16]]
  return np.asarray(rows[:batch], np.float32)
