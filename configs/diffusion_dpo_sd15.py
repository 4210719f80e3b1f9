"""Plain Diffusion-DPO on Stable Diffusion 1.5, as the Salesforce code runs it.

  python main.py --config configs/diffusion_dpo_sd15.py --workdir runs/diffusion_dpo_sd15 \
      --config.model.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.data.name=/path/to/cached_pairs   # a pair dataset cached to latents (README: Data)

Expected runtime: as configs/scdpo_sd15.py (2000 steps x 2048 pairs = 4.1M pair-steps; the
Salesforce README quotes ~24 h on 16 A100s; about 25 h on one H100 at the ~45 pairs/s of today's
PyTorch peers, proportionally less on a pod).

Recipe (SalesforceAIResearch/DiffusionDPO@5233e75 `launchers/sd15.sh` + `train.py` defaults):
plain DPO (no safety terms, no focusing), beta_dpo 5000 in its convention
z = -0.5*beta*((m_w - m_l) - (r_w - r_l)) (ours), 20 % empty captions
(`--proportion_empty_prompts` default 0.2, our `train.caption_dropout`), AdamW (0.9, 0.999,
wd 1e-2, eps 1e-8), lr 1e-8 x 2048 (`--scale_lr`: effective batch 1 x 128 accumulation x 16
GPUs = 2048 pairs) = 2.048e-5, constant_with_warmup 500 steps, 2000 steps, grad-norm clip 1.0,
random h-flip (`--no_hflip` unset).

Precision: the released run (`--mixed_precision` default fp16) keeps the reference UNet in fp16
and trains fp32 master weights under fp16 autocast with a dynamic loss scaler. Here the reference
is stored in fp16 as released (`model.ref_param_dtype`) and both UNets compute in bf16
(`model.dtype`; `model.ref_dtype` "" = the same): our trainer has no loss scaling, which fp16
gradients need (`--config.model.dtype=float16` runs fp16 compute without it, at your own risk of
underflow), and policy and reference should compute in one dtype (scripts/precision_logit.py:
mixing them moves the logit at beta 5000 even where policy == reference). Not reproduced (README: deviations): latents are cached (one
posterior mean per image instead of a fresh `latent_dist.sample()` each step), and the flip is
applied to cached latents rather than to pixels before the VAE.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.pretrained = ""  # required: a diffusers-format SD1.5 folder
  config.model.tiny = None  # no fallback to a random model: pretrained must be given
  config.model.dtype = "bfloat16"  # policy compute (released: fp16 autocast + loss scaler)
  config.model.ref_param_dtype = "float16"  # as released (weight_dtype = fp16)
  config.model.ref_dtype = ""  # = model.dtype
  config.model.attention_impl = "xla"
  config.model.remat_policy = "none"

  config.data.source = "tfds"
  config.data.name = ""  # required: pair dataset (folder or tfds name) with cached latents
  config.data.hflip = True

  config.train.update(dict(
      loss_type="dpo", beta=5000.0, safety_mode="none", lam=0.0, gamma=0.0,
      caption_dropout=0.2,
      pairs_per_step=2048, grad_accum=256,  # 8 pairs per micro-batch on one device
      num_steps=2000))

  config.optimizer.update(dict(
      name="adamw", lr=1e-8,
      scale_lr=True,  # 1e-8 x 2048 pairs = 2.048e-5
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
      warmup_steps=500, schedule="constant", max_grad_norm=1.0))

  config.checkpoint.every_steps = 100
  config.log.every_steps = 10
  return config
