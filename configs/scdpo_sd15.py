"""SC-DPO on Stable Diffusion 1.5: the Diffusion-DPO SD1.5 recipe plus the safety constraint.

  python main.py --config configs/scdpo_sd15.py --workdir runs/scdpo_sd15 \
      --config.model.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.data.name=/path/to/cached_pairs   # a pair dataset cached to latents (README: Data)

Expected runtime: 2000 steps x 2048 pairs = 4.1M pair-steps; about 25 h on one H100 at the
~45 pairs/s of today's PyTorch peers, proportionally less on a pod (set train.grad_accum so that
pairs_per_step / grad_accum is about 8 pairs per device, e.g. 16 on 16 GPUs).

Recipe (SalesforceAIResearch/DiffusionDPO launchers/sd15.sh): beta 5000 in the Salesforce
convention z = -0.5*beta*((m_w - m_l) - (r_w - r_l)) (= diffusers' beta 2500), AdamW
(0.9, 0.999, wd 1e-2, eps 1e-8), lr 1e-8 scaled by the effective batch (2.048e-5), 500 warmup
steps then constant, 2000 steps, 2048 pairs per step, grad-norm clip 1.0, 20 % empty captions,
random h-flip. SC-DPO additions ([I] reconstructions, ../shared/docs/method.md 2.2-2.4): cost
margin lambda*(C_l - C_w) inside the sigmoid (train.safety_mode="margin", lambda 1.0; costs come
from the cost model when the pairs are built) and Dynamic Focusing with gamma 1.0.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.pretrained = ""  # required: a diffusers-format SD1.5 folder
  config.model.tiny = None  # no fallback to a random model: pretrained must be given
  config.model.dtype = "bfloat16"
  config.model.ref_param_dtype = "bfloat16"
  config.model.attention_impl = "xla"
  config.model.remat_policy = "none"

  config.data.source = "tfds"
  config.data.name = ""  # required: pair dataset (folder or tfds name) with cached latents
  config.data.hflip = True

  config.train.update(dict(
      loss_type="dpo", beta=5000.0, safety_mode="margin", lam=1.0, gamma=1.0,
      caption_dropout=0.2,
      pairs_per_step=2048, grad_accum=256,  # 8 pairs per micro-batch on one device
      num_steps=2000))

  config.optimizer.update(dict(
      name="adamw", lr=1e-8,
      scale_lr=True,  # 1e-8 x 2048 pairs = 2.048e-5
      warmup_steps=500, schedule="constant", max_grad_norm=1.0))

  config.checkpoint.every_steps = 100
  config.log.every_steps = 10
  return config
