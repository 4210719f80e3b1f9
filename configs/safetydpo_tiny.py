"""SafetyDPO on the tiny random pipeline: per-category LoRA experts -> Co-Merge -> export (CPU).

  python main.py --config configs/safetydpo_tiny.py --workdir runs/safetydpo_tiny   # ~2.5 min, 2-core CPU

Three LoRA safety experts (one per category, cycled over random in-memory pairs), each the LoRA
train job of configs/lora_tiny.py with SafetyDPO's released settings (plain Diffusion-DPO, beta
5000, rank 4 = alpha, gaussian init, to_q/to_k/to_v/to_out.0), in runs/.../experts/<k>_<name>/;
then Co-Merge (our [I] reconstruction, scdpo_jax/lora/merge.py) re-factorised by truncated SVD to
one rank-12 LoRA, written as export/lora/pytorch_lora_weights.safetensors (diffusers'
load_lora_weights) and export/unet (the base with it fused). Baselines:
--config.safetydpo.experts=all_single (one LoRA on all categories) and
--config.merge.method=average; --config.merge.output=dense keeps the full-rank merge (export/unet
only). The numbers mean nothing: the base model and the pairs are random.
"""

import ml_collections

from configs import lora_tiny


def get_config():
  config = ml_collections.ConfigDict()
  config.job = "safetydpo"

  expert = lora_tiny.get_config()
  expert.train.update(dict(loss_type="dpo", beta=5000.0, safety_mode="none", gamma=0.0,
                           caption_dropout=0.0, pairs_per_step=8, grad_accum=1, num_steps=10))
  expert.data.num_pairs = 48  # 16 per category
  expert.checkpoint.every_steps = 5
  expert.log.every_steps = 5
  config.expert = expert  # the train config of every expert (a LoRA train config)

  config.safetydpo = ml_collections.ConfigDict()
  config.safetydpo.experts = "per_category"  # | "all_single": one LoRA on all categories
  # categories that get an expert, spelled as in the data (() = all non-empty ones); with
  # expert.data.source = "memory_random" they are cycled over the random pairs
  config.safetydpo.categories = ("Hate", "sexual", "Violence")

  config.merge = ml_collections.ConfigDict()
  config.merge.method = "co_merge"  # | "average" (plain averaging baseline)
  config.merge.output = "svd"  # | "dense" (full-rank merged delta, fused; no LoRA file)
  config.merge.rank = 0  # svd rank; 0 = experts x expert rank
  config.merge.calibration_pairs_per_category = 4
  config.merge.calibration_batch = 8  # images per UNet call
  config.merge.seed = 0
  return config
