"""Helpers for building tiny PyTorch reference models (test-only: needs torch, diffusers, transformers)."""

import numpy as np


def to_numpy(t):
  return t.detach().cpu().float().numpy()


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 3, 1, 2))


def tiny_torch_pipeline(folder, tokenizer_folder, unet_overrides=None):
  """The tiny random diffusers StableDiffusionPipeline of `configs.default.tiny_pipeline_config`
  (weights perturbed so every parameter matters; `unet_overrides` replace UNet config keys),
  saved to `folder`. Returns the pipeline."""
  import diffusers
  import torch
  import transformers

  from configs.default import tiny_pipeline_config
  from scdpo_jax.models import tokenizer

  tiny = tiny_pipeline_config()
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**{**tiny.unet.to_dict(), **(unet_overrides or {})})
  vae = diffusers.AutoencoderKL(**tiny.vae.to_dict())
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**tiny.text_encoder.to_dict()))
  with torch.no_grad():
    for m in (unet, vae, text):
      for p in m.parameters():
        p.add_(0.05 * torch.randn_like(p))
  tok_dir = tokenizer.write_byte_level_tokenizer(tokenizer_folder,
                                                 tiny.text_encoder.max_position_embeddings)
  sched = diffusers.DDIMScheduler(**{k: v for k, v in tiny.scheduler.to_dict().items()
                                     if not k.startswith("_")})
  pipe = diffusers.StableDiffusionPipeline(
      unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(str(tok_dir)), scheduler=sched,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(folder)
  return pipe
