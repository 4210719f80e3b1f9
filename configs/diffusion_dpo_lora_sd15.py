"""Diffusion-DPO with LoRA on Stable Diffusion 1.5: the diffusers LoRA port's recipe.

  python main.py --config configs/diffusion_dpo_lora_sd15.py --workdir runs/dpo_lora_sd15 \
      --config.model.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.data.name=/path/to/cached_pairs   # a pair dataset cached to latents (README: Data)

Expected runtime (estimate, not measured): 10000 steps x 32 pairs = 320k pair-steps, about 2 h on
one H100 at the ~45 pairs/s of today's PyTorch peers (LoRA trains fewer weights, the forward
passes are the same).

Writes export/lora/pytorch_lora_weights.safetensors (`pipe.load_lora_weights(folder)` in
diffusers) and export/unet (the base with the LoRA fused).

Recipe (diffusers examples/research_projects/diffusion_dpo, train_diffusion_dpo.py;
../shared/docs/method.md 1.3-1.4): plain Diffusion-DPO (no safety terms), LoRA on
to_q/to_k/to_v/to_out.0 of every transformer block, rank 8 = alpha (peft `lora_alpha=rank`,
`init_lora_weights="gaussian"`), lr 1e-5, AdamW (0.9, 0.999, wd 1e-2, eps 1e-8), grad-norm clip
1.0, no empty captions (the port has no `proportion_empty_prompts`), random h-flip. beta: the
port's beta_dpo = 2500 in its convention -logsigmoid(beta * (d_ref - d_theta)) is beta = 5000 in
ours (z = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))). Batch, steps and schedule of the port's
README SD command: train_batch_size 16 x gradient_accumulation_steps 2 = 32 pairs per step (here
4 micro-batches of 8: the same step, randomness is drawn for the whole batch), constant lr, 0
warmup, 10000 steps. Deviations: the port uses bitsandbytes 8-bit AdamW, fp16 (base in fp16, LoRA
in fp32, autocast) and runs the LoRA branch beside the frozen kernel; here plain AdamW, bf16
compute on the merged kernel (a delta below bf16's resolution of the base weight is rounded
away), base in fp32. SafetyDPO's experts (configs/safetydpo_sd15.py) derive from this config
with their own launcher's values (rank 4, 16 pairs, 2000 steps, 500 warmup, scale_lr).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.pretrained = ""  # required: a diffusers-format SD1.5 folder
  config.model.tiny = None  # no fallback to a random model: pretrained must be given
  config.model.dtype = "bfloat16"
  config.model.ref_param_dtype = "float32"  # the base: also the policy's frozen weights
  config.model.attention_impl = "xla"
  config.model.remat_policy = "none"

  config.data.source = "tfds"
  config.data.name = ""  # required: pair dataset (folder or tfds name) with cached latents
  config.data.hflip = True

  config.lora.enabled = True
  config.lora.rank = 8
  config.lora.alpha = 8.0
  config.lora.init = "gaussian"
  config.lora.targets = ("attention",)

  config.train.loss_type = "dpo"
  config.train.beta = 5000.0  # = the port's beta_dpo 2500
  config.train.safety_mode = "none"
  config.train.gamma = 0.0
  config.train.caption_dropout = 0.0
  config.train.pairs_per_step = 32
  config.train.grad_accum = 4  # 8 pairs per micro-batch
  config.train.num_steps = 10000

  config.optimizer.name = "adamw"
  config.optimizer.update(dict(
      lr=1e-5, scale_lr=False, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, warmup_steps=0,
      schedule="constant", max_grad_norm=1.0))

  config.checkpoint.every_steps = 200
  config.log.every_steps = 10
  return config
