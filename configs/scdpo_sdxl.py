"""SC-DPO and Diffusion-DPO on Stable Diffusion XL: the Diffusion-DPO SDXL recipe, full or LoRA.

  # 1. cache the pairs at 1024 px with the recipe's VAE and time ids (README: Data)
  python -m scdpo_jax.data.cache --input /path/to/image_pairs --output /path/to/pairs_sdxl \
      --pretrained /path/to/stable-diffusion-xl-base-1.0 --vae /path/to/sdxl-vae-fp16-fix \
      --time_ids resolution --dtype bfloat16
  # 2. train (variant after the colon: scdpo (default) | diffusion_dpo | lora | scdpo_lora)
  python main.py --config configs/scdpo_sdxl.py:scdpo --workdir runs/scdpo_sdxl \
      --config.model.pretrained=/path/to/stable-diffusion-xl-base-1.0 \
      --config.data.name=/path/to/pairs_sdxl

The trainer takes SDXL from the folder's model_index.json (StableDiffusionXLPipeline): the step
conditions policy and reference, winner and loser, on both encoders' penultimate states plus
added_cond_kwargs (pooled text_embeds, time ids). Expected runtime (estimate, not measured): the
Salesforce README quotes ~30 h per 200 steps on 16 A100s for the full recipe (2000 steps x
2048 pairs); the LoRA variants are 2000 x 16 pairs.

Full fine-tune, variants "scdpo" and "diffusion_dpo" (SalesforceAIResearch/DiffusionDPO
`launchers/sdxl.sh` + `train.py --sdxl`; ../shared/docs/method.md 1.4, anchors.md 1.2): base
stable-diffusion-xl-base-1.0, VAE madebyollin/sdxl-vae-fp16-fix (used when caching: `--vae`),
resolution 1024 (train.py's SDXL default; Resize + CenterCrop), beta_dpo 5000 in the convention
z = -0.5*beta*((m_w - m_l) - (r_w - r_l)) (ours), 20 % empty captions
(`--proportion_empty_prompts` 0.2: "" is encoded, so the states *and* the pooled embedding become
the empty prompt's, time ids unchanged), lr 1e-8 x 2048 (`--scale_lr`: batch 1 x 128
accumulation x 16 GPUs) = 2.048e-5, constant_with_warmup 200 steps, 2000 steps, Adafactor forced
by `--sdxl` (`transformers.Adafactor(lr, weight_decay=1e-2, clip_threshold=1.0,
scale_parameter=False, relative_step=False)`; `train.optim` reproduces it step for step), the
gradient-norm clip 1.0 kept (the launcher passes `--sdxl`, not `--use_adafactor`, which alone
would skip it), gradient checkpointing forced by `--sdxl` (our `model.remat_policy="block"`),
random h-flip, time ids (1024, 1024, 0, 0, 1024, 1024) for every image (train.py's SDXL-base
`add_time_ids`: cache with `--time_ids resolution`). Precision as configs/diffusion_dpo_sd15.py:
the released run is fp16 (reference in fp16, fp32 master under autocast with a loss scaler);
here the reference is stored in fp16 and both UNets compute in bf16 (no loss scaler).
"scdpo" adds the SC-DPO terms of configs/scdpo_sd15.py (cost margin lambda 1.0, Dynamic Focusing
gamma 1.0, bf16-stored reference); "diffusion_dpo" is the plain recipe.

LoRA, variants "lora" (plain Diffusion-DPO) and "scdpo_lora" (+ the SC-DPO terms): the diffusers
port's README SDXL command (examples/research_projects/diffusion_dpo, train_diffusion_dpo_sdxl.py):
rank 8 = lora_alpha, gaussian init, to_k/to_q/to_v/to_out.0, lr 1e-5, constant, 0 warmup, 2000
steps, train_batch_size 8 x gradient_accumulation_steps 2 = 16 pairs, gradient checkpointing,
AdamW (0.9, 0.999, wd 1e-2, eps 1e-8; the port's 8-bit Adam is not reproduced), grad clip 1.0,
beta_dpo 5000 (the SDXL port writes -0.5 * beta_dpo, our convention), no empty captions,
resolution 1024, time ids per image (original size, centre-crop corner, 1024 x 1024: cache with
`--time_ids crop`, the default). Exports export/lora/pytorch_lora_weights.safetensors and
export/unet (the base with the LoRA fused).

Not reproduced (README: deviations): latents are cached (one posterior mean per image instead of
a fresh sample each step), the flip is applied to cached latents, and images are resized with
bicubic (torchvision's Resize there is bilinear).
"""

from configs import default

VARIANTS = ("scdpo", "diffusion_dpo", "lora", "scdpo_lora")


def get_config(variant: str = "scdpo"):
  variant = variant or "scdpo"
  if variant not in VARIANTS:
    raise ValueError(f"configs/scdpo_sdxl.py:{variant}: unknown variant; use one of {VARIANTS}")
  lora = variant in ("lora", "scdpo_lora")
  config = default.get_config()
  config.model.pretrained = ""  # required: a diffusers-format stable-diffusion-xl-base-1.0
  config.model.tiny = None  # no fallback to a random model: pretrained must be given
  config.model.dtype = "bfloat16"
  config.model.ref_param_dtype = "float32" if lora else "float16"  # LoRA: the base itself
  config.model.ref_dtype = ""  # = model.dtype
  config.model.attention_impl = "xla"
  config.model.remat_policy = "block"  # gradient checkpointing (forced by --sdxl)

  config.data.source = "tfds"
  config.data.name = ""  # required: SDXL pair dataset with cached latents (1024 px)
  config.data.hflip = True

  config.train.update(dict(loss_type="dpo", beta=5000.0, safety_mode="none", lam=0.0, gamma=0.0))
  if lora:
    config.lora.update(dict(enabled=True, rank=8, alpha=8.0, init="gaussian",
                            targets=("attention",)))
    config.train.update(dict(caption_dropout=0.0, pairs_per_step=16, grad_accum=8,
                             num_steps=2000))
    config.optimizer.update(dict(
        name="adamw", lr=1e-5, scale_lr=False, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
        warmup_steps=0, schedule="constant", max_grad_norm=1.0))
  else:
    # 2 pairs per micro-batch on one device; on N devices use grad_accum = 1024 / N or less
    config.train.update(dict(caption_dropout=0.2, pairs_per_step=2048, grad_accum=1024,
                             num_steps=2000))
    config.optimizer.update(dict(
        name="adafactor", lr=1e-8, scale_lr=True,  # 1e-8 x 2048 pairs = 2.048e-5
        weight_decay=1e-2, warmup_steps=200, schedule="constant", max_grad_norm=1.0))
  if variant.startswith("scdpo"):
    config.train.update(dict(safety_mode="margin", lam=1.0, gamma=1.0))
    if not lora:
      config.model.ref_param_dtype = "bfloat16"  # as configs/scdpo_sd15.py

  config.checkpoint.every_steps = 200
  config.log.every_steps = 10
  return config
