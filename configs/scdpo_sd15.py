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
random h-flip: configs/diffusion_dpo_sd15.py, which this config extends (with a bf16-stored
reference, as before that recipe file existed). SC-DPO additions ([I] reconstructions, ../shared/docs/method.md 2.2-2.4): cost
margin lambda*(C_l - C_w) inside the sigmoid (train.safety_mode="margin", lambda 1.0; costs come
from the cost model when the pairs are built) and Dynamic Focusing with gamma 1.0.
"""

from configs import diffusion_dpo_sd15


def get_config():
  config = diffusion_dpo_sd15.get_config()
  config.model.ref_param_dtype = "bfloat16"
  config.train.update(dict(safety_mode="margin", lam=1.0, gamma=1.0))
  return config
