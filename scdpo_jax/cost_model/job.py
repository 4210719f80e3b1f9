"""The `cost_model` job: train the safety cost model, evaluate it on a held-out split.

Writes to the workdir: `cost_model.json` (what `CostModelScorer.from_workdir` needs),
`checkpoints/` (Orbax), `cost_model_eval.json` (held-out AUROC, accuracy at the anchor threshold,
ECE, per-class mean cost, pair ranking accuracy) and, without `clip_folder`, `random_clip_vision/`
(the random tower, saved as a HF folder) and `synthetic_images/` (the demo data).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from scdpo_jax import files
from scdpo_jax.cost_model import train
from scdpo_jax.cost_model.model import CostAdapter, make_embedder, random_vision_tower

RANDOM_TOWER_DIR = "random_clip_vision"
SYNTHETIC_DIR = "synthetic_images"


def _clip_folder(config: ml_collections.ConfigDict, workdir: Path) -> Path:
  from scdpo_jax.models import clip_io

  if config.clip_folder:
    return Path(config.clip_folder).resolve()
  folder = workdir / RANDOM_TOWER_DIR
  if not (folder / "config.json").is_file():
    logging.warning("cost model: no clip_folder given: using a tiny RANDOM CLIP vision tower "
                    "(tests/demos only; its costs mean nothing for real images)")
    module, params = random_vision_tower(config.tiny_clip.to_dict(), seed=config.seed)
    clip_io.save_clip_vision(folder, module.config, params)
  return folder.resolve()


def _items(config: ml_collections.ConfigDict, workdir: Path, image_size: int):
  from scdpo_jax.data import shapes

  d = config.data
  if d.pairs_dir:
    return train.items_from_pairs(d.pairs_dir, d.pairs_split), f"pairs:{d.pairs_dir}"
  if d.images_csv:
    return train.items_from_csv(d.images_csv, d.images_dir or None), f"csv:{d.images_csv}"
  folder = workdir / SYNTHETIC_DIR
  csv_path = folder / "labels.csv"
  if not csv_path.is_file():
    logging.warning("cost model: no data given: using %d synthetic images (red disc = harmful)",
                    d.synthetic_images)
    shapes.write_labelled_folder(folder, d.synthetic_images, size=image_size, seed=config.seed)
  return train.items_from_csv(csv_path), f"synthetic:{csv_path}"


def run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  from scdpo_jax import parallel
  from scdpo_jax.models import clip_io

  workdir = Path(workdir)
  folder = _clip_folder(config, workdir)
  vision_module, vision_params = clip_io.load_clip_vision(folder,
                                                          dtype=jnp.dtype(config.clip_dtype))
  vcfg = vision_module.config
  dim = vcfg.projection_dim if vision_module.with_projection else vcfg.hidden_size
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                            devices=jax.local_devices())
  embed = make_embedder(vision_module, vision_params, batch_size=config.data.embed_batch_size,
                        mesh=mesh, rules=parallel.rules_from_config(config.sharding_rules))
  items, data_desc = _items(config, workdir, vcfg.image_size)
  loss_kw = dict(tau=config.loss.tau, mu=config.loss.mu, anchor=config.loss.anchor,
                 anchor_harmful=config.loss.anchor_harmful, anchor_safe=config.loss.anchor_safe)
  meta = {"clip_folder": str(folder), "clip_dtype": config.clip_dtype,
          "random_tower": not config.clip_folder, "embedding_dim": int(dim),
          "embedding": "image_embeds" if vision_module.with_projection else "pooler_output",
          "adapter": config.model.to_dict(), "loss": loss_kw, "data": data_desc,
          "eval_fraction": config.data.eval_fraction, "seed": config.seed}
  files.write_json(workdir / train.META_NAME, meta)

  data = train.embed_items(items, embed, vcfg.image_size, config.data.eval_fraction,
                           config.data.embed_batch_size)
  logging.info("cost model data (%s): %d images (%d harmful), %d matched pairs, %d held out",
               data_desc, len(data.labels), int(data.labels.sum()), len(data.pairs),
               int(data.is_eval.sum()))
  _, history = train.train_adapter(
      data, workdir, adapter=CostAdapter(**config.model.to_dict()), loss_kw=loss_kw,
      steps=config.train.num_steps, batch_size=config.train.batch_size,
      learning_rate=config.optimizer.lr, weight_decay=config.optimizer.weight_decay,
      seed=config.seed, checkpoint_every=config.checkpoint.every_steps,
      eval_every=config.eval.every_steps, max_to_keep=config.checkpoint.keep,
      log_every=config.log.every_steps)
  report = {"data": data_desc, "random_tower": meta["random_tower"],
            "num_images": int(len(data.labels)), "num_train": int((~data.is_eval).sum()),
            "num_eval": int(data.is_eval.sum()), "num_pairs": int(len(data.pairs)),
            "final": history[-1] if history else None, "history": history}
  files.write_json(workdir / train.EVAL_NAME, report)
  print(json.dumps({"cost_model_eval": report["final"], "data": data_desc,
                    "random_tower": meta["random_tower"]}, indent=2))
  return report
