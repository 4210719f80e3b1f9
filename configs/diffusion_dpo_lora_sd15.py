"""Diffusion-DPO with LoRA on Stable Diffusion 1.5: the diffusers LoRA port's recipe.

  python main.py --config configs/diffusion_dpo_lora_sd15.py --workdir runs/dpo_lora_sd15 \
      --config.model.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.data.name=/path/to/cached_pairs   # a pair dataset cached to latents (README: Data)

Writes export/lora/pytorch_lora_weights.safetensors (`pipe.load_lora_weights(folder)` in
diffusers) and export/unet (the base with the LoRA fused).

Recipe (diffusers examples/research_projects/diffusion_dpo, train_diffusion_dpo.py;
../shared/docs/method.md 1.3-1.4): plain Diffusion-DPO (no safety terms), LoRA on
to_q/to_k/to_v/to_out.0 of every transformer block, rank 8 = alpha (peft `lora_alpha=rank`,
`init_lora_weights="gaussian"`), lr 1e-5, AdamW. beta: the port's beta_dpo = 2500 in its
convention -logsigmoid(beta * (d_ref - d_theta)) is beta = 5000 in ours
(z = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))). The port's own batch and step counts are not
restated here; the batch (16 pairs: 8 per micro-batch x 2) and the 2000 steps / 500-step
warmup follow SafetyDPO's SD1.5 LoRA launcher (bs 4 x grad-acc 4, 2000 steps, 500 warmup,
../shared/docs/methods-wave2.md 2), which is the same script family. SafetyDPO itself uses rank 4:
`--config.lora.rank=4 --config.lora.alpha=4`.
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
  config.train.pairs_per_step = 16
  config.train.grad_accum = 2
  config.train.num_steps = 2000

  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-5
  config.optimizer.scale_lr = False
  config.optimizer.warmup_steps = 500
  config.optimizer.schedule = "constant"
  config.optimizer.max_grad_norm = 1.0

  config.checkpoint.every_steps = 200
  config.log.every_steps = 10
  return config
