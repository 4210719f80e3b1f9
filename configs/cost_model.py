"""Train and evaluate the safety cost model (frozen CLIP image tower + MLP adapter).

  python main.py --config configs/cost_model.py --workdir runs/cost   # ~10 s on a 2-core CPU

As is, this is a self-contained demo: a tiny RANDOM CLIP vision tower (`tiny_clip`; only for
tests/demos, its costs mean nothing for real images) learns to tell 400 synthetic images with a
red disc ("harmful") from ones without (`scdpo_jax/data/shapes.py`). Real use:

  python main.py --config configs/cost_model.py --workdir runs/cost \\
      --config.clip_folder=/path/to/clip-vit-large-patch14 \\
      --config.data.pairs_dir=data/coprov2_pairs            # or --config.data.images_csv=...

Data: `data.pairs_dir` (a pair dataset from scdpo_jax.data.convert; in harmful-prompt pairs the
loser is the harmful image, the winner the safe one, and they form matched pairs), or
`data.images_csv` (columns image,label; label 1/harmful/unsafe or 0/safe/clean) with image paths
relative to `data.images_dir` (default: the CSV's folder).

Losses (method.md 2.3, project decisions [I]): L_con = -mean log sigma((C(x_h) - C(x_s)) / tau)
plus mu * L_anc, with `loss.anchor` = "sign" (-log sigma(C_h) - log sigma(-C_s); threshold 0) or
"squared" ((C_h - a_h)^2 + (C_s - a_s)^2; threshold (a_h + a_s) / 2). Outputs in the workdir:
cost_model.json, checkpoints/, cost_model_eval.json (held-out AUROC, accuracy at the threshold,
ECE); load with `scdpo_jax.cost_model.CostModelScorer.from_workdir(workdir)`.

Key names follow the trainer's (configs/default.py): train.num_steps, optimizer.lr /
weight_decay (AdamW, constant lr), checkpoint.every_steps / keep, log.every_steps, plus
eval.every_steps (held-out evaluation; always also at the end).
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = "cost_model"
  config.seed = 0
  config.clip_folder = ""  # a HF CLIP folder (CLIPModel / CLIPVisionModel[WithProjection])
  config.clip_dtype = "float32"  # tower compute dtype; "bfloat16" on accelerators
  # Used only when clip_folder is empty: a tiny random tower (tests/demos only).
  config.tiny_clip = ml_collections.ConfigDict(dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=32, patch_size=8, projection_dim=32))

  config.data = ml_collections.ConfigDict()
  config.data.pairs_dir = ""
  config.data.pairs_split = "train"
  config.data.images_csv = ""
  config.data.images_dir = ""
  config.data.synthetic_images = 400  # demo data when neither pairs_dir nor images_csv is set
  config.data.eval_fraction = 0.2
  config.data.embed_batch_size = 64

  config.model = ml_collections.ConfigDict(dict(hidden_dim=256, normalize_input=True))
  config.loss = ml_collections.ConfigDict(dict(
      tau=1.0, mu=1.0, anchor="sign", anchor_harmful=1.0, anchor_safe=0.0))
  config.train = ml_collections.ConfigDict(dict(num_steps=400, batch_size=64))
  config.optimizer = ml_collections.ConfigDict(dict(lr=1e-3, weight_decay=1e-4))
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, keep=2))
  config.eval = ml_collections.ConfigDict(dict(every_steps=200))
  config.log = ml_collections.ConfigDict(dict(every_steps=50))
  # The frozen tower embeds the images once, over this process's devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = common.SHARDING_RULES  # logical axis -> mesh axes
  return config
