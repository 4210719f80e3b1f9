"""SafetyDPO on Stable Diffusion 1.5 and CoProV2: 7 LoRA safety experts -> Co-Merge -> export.

  python main.py --config configs/safetydpo_sd15.py --workdir runs/safetydpo_sd15 \
      --config.expert.model.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.expert.data.name=/path/to/coprov2_latents

Expected runtime: 7 experts x 2000 steps x 16 pairs; not measured here. Estimate: about 1 h per
expert on one H100 at ~10 pairs/s, so ~7 h in all (plus a minute for the merge and export).
Rerun the same command to resume: each expert resumes in runs/.../experts/<k>_<category>/ and a
finished expert is not trained again.

Data (README: Data): convert the released CoProV2 CSV + images (winner = the safe prompt's image,
loser = the unsafe prompt's, conditioned on the unsafe prompt, `category` kept), then cache the
latents with the same SD1.5 folder:
  python -m scdpo_jax.data.convert coprov2 --csv CoProv2_train.csv --images DIR --output data/coprov2
  python -m scdpo_jax.data.cache --input data/coprov2 --output data/coprov2_latents \
      --pretrained /path/to/stable-diffusion-v1-5

Recipe (Visualignment/SafetyDPO train.py + launchers/train_lora_sd15.sh, ../shared/docs/
methods-wave2.md 2) [C]: each expert is Diffusion-DPO, beta_dpo 5000 (our beta 5000, the same
convention), LoRA rank 4, lora_alpha 4, init gaussian, on to_q/to_k/to_v/to_out.0; batch 4 x
grad-acc 4 = 16 pairs, lr 1e-5 with --scale_lr (x 16 pairs on one GPU: 1.6e-4), constant with 500
warmup steps, 2000 steps, fp16 (here bf16 compute). One expert per CoProV2 category, spelled as
in its CSV (including "Harrasment"); a per-category expert is the released script on a
category-filtered subset [I]. Co-Merge is unreleased: our [I] reconstruction (per weight entry,
the expert with the highest mean |dW x| over calibration inputs from all categories), merged
delta re-factorised by truncated SVD to one rank-28 LoRA (7 x 4; merge.output="dense" keeps it
full rank: export/unet only). Unknown in the release, our choices: empty-caption fraction 0,
random h-flip on, AdamW weight decay 1e-2 (diffusers' default), grad-norm clip 1.0.
"""

import ml_collections

from configs import diffusion_dpo_lora_sd15

COPROV2_CATEGORIES = ("Hate", "sexual", "Violence", "Shocking", "Illegal Activity", "Harrasment",
                      "self-harm")


def get_config():
  config = ml_collections.ConfigDict()
  config.job = "safetydpo"

  expert = diffusion_dpo_lora_sd15.get_config()  # model.pretrained, data.name: required
  expert.lora.update(dict(rank=4, alpha=4.0, init="gaussian", targets=("attention",)))
  expert.train.update(dict(loss_type="dpo", beta=5000.0, safety_mode="none", gamma=0.0,
                           caption_dropout=0.0, pairs_per_step=16, grad_accum=2,
                           num_steps=2000))
  expert.optimizer.update(dict(name="adamw", lr=1e-5, scale_lr=True, warmup_steps=500,
                               schedule="constant", max_grad_norm=1.0))
  expert.checkpoint.every_steps = 200
  config.expert = expert

  config.safetydpo = ml_collections.ConfigDict()
  config.safetydpo.experts = "per_category"  # | "all_single" (the paper's All-single baseline)
  config.safetydpo.categories = COPROV2_CATEGORIES

  config.merge = ml_collections.ConfigDict()
  config.merge.method = "co_merge"  # | "average"
  config.merge.output = "svd"  # | "dense"
  config.merge.rank = 0  # 0 = 7 experts x rank 4 = 28
  config.merge.calibration_pairs_per_category = 8
  config.merge.calibration_batch = 8
  config.merge.seed = 0
  return config
