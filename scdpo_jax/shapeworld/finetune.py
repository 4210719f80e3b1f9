"""The study's fine-tunes: every trained method's job, run from the base on its data.

Each kind runs its own job with its job's config composed into the study's config:

  dpo        `train.loop.run` with `config.finetune` (configs/default.py keys) plus the base
             model, the method's pair set as a latent pair dataset (tfds ArrayRecord, read by
             the same step-indexed `PairLoader` an SD run uses) and the method's `train`,
             `data` and `optimizer` overrides (methods.py)
  safetydpo  `lora.safetydpo.run` with `config.safetydpo` (configs/safetydpo_tiny.py keys: the
             experts' LoRA train config `expert`, `safetydpo`, `merge`) plus the base, the
             CoProV2-style pair set and the method's `safetydpo` overrides
  grpo       `grpo.job.run` with `config.grpo` (configs/safediffusion_r1_sd15.py keys) plus the
             base, the harmful pair prompts (the release trains on unsafe captions only) and the
             world CLIP of the world_clip stage as the reward model

Every job writes `finetune/<method>/export/unet` (diffusers format), which the evaluation loads;
a method whose export exists is not trained again. In pixel space the "latents" of the pair
datasets are the images in [-1, 1].
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from scdpo_jax.data.images import to_model_range
from scdpo_jax.shapeworld import methods as methods_lib


def method_dir(workdir: Path, method: str) -> Path:
  return Path(workdir) / "finetune" / method


def done(workdir: Path, method: str) -> bool:
  wd = method_dir(workdir, method)
  return (wd / "export" / "unet" / "config.json").is_file() and (wd / "done.json").is_file()


def _override(node: ml_collections.ConfigDict, values: dict, where: str) -> None:
  for key, value in values.items():
    if key not in node:
      raise KeyError(f"{where}.{key}: no such key (methods.py overrides must name existing "
                     f"config keys)")
    node[key] = value


def train_config(config, method: str, base: Path, pairs: Path) -> ml_collections.ConfigDict:
  """The `train` job's config of a dpo method: `config.finetune` with the base model, the pair
  dataset and the method's overrides."""
  m = methods_lib.get(method)
  tc = config.finetune.copy_and_resolve_references()
  tc.model.pretrained = str(base)
  tc.data.source = "tfds"
  tc.data.name = str(pairs)
  _override(tc.train, dict(m.train), "finetune.train")
  _override(tc.data, dict(m.data), "finetune.data")
  _override(tc.optimizer, dict(m.optimizer), "finetune.optimizer")
  return tc


def safetydpo_config(config, method: str, base: Path, pairs: Path
                     ) -> ml_collections.ConfigDict:
  """The `safetydpo` job's config: `config.safetydpo` with the base, the CoProV2-style pairs and
  the method's overrides (experts per category or all_single)."""
  m = methods_lib.get(method)
  sc = config.safetydpo.copy_and_resolve_references()
  sc.expert.model.pretrained = str(base)
  sc.expert.data.source = "tfds"
  sc.expert.data.name = str(pairs)
  _override(sc.safetydpo, dict(m.safetydpo), "safetydpo.safetydpo")
  return sc


def grpo_prompts(config) -> tuple[tuple[str, str], ...]:
  """The GRPO job's training prompts: the harmful pair prompts (plain unsafe phrases, every
  template), tagged with their category."""
  from scdpo_jax.shapeworld import evaluation as ev

  return tuple((p.text, p.category) for p in ev.prompt_sets(config)["pairs_harmful"])


def grpo_config(config, base: Path, clip_folder: Path) -> ml_collections.ConfigDict:
  """The `safediffusion_r1` job's config: `config.grpo` with the base, the harmful pair prompts,
  the world CLIP and, where `config.grpo.reward`'s anchor lists are empty, the world's steering
  anchors (`world_clip.steering_anchors`)."""
  from scdpo_jax.shapeworld import evaluation as ev, world_clip

  gc = config.grpo.copy_and_resolve_references()
  gc.model.pretrained = str(base)
  gc.data.prompts = grpo_prompts(config)
  gc.data.prompts_file = ""
  gc.reward.clip_folder = str(clip_folder)
  if not gc.reward.safe_anchors and not gc.reward.unsafe_anchors:
    gc.reward.safe_anchors, gc.reward.unsafe_anchors = world_clip.steering_anchors(
        ev.categories(config))
  return gc


# rows trained at once (tasks.py) may ask for the same pair set: one writes it, the others wait
_PAIR_DATASET_LOCK = threading.Lock()


def pair_dataset(config, workdir: Path, kind: str, sd) -> Path:
  """pairs/<kind>_dataset: the pair set `pairs/<kind>.npz` as a latent pair dataset, written
  once per pair kind and reused."""
  with _PAIR_DATASET_LOCK:
    return _pair_dataset(config, workdir, kind, sd)


def _pair_dataset(config, workdir: Path, kind: str, sd) -> Path:
  from scdpo_jax.data import tfds_pairs
  from scdpo_jax.train import loop

  out = Path(workdir) / "pairs" / f"{kind}_dataset"
  try:
    tfds_pairs.find_dataset_dir(out)
    return out
  except FileNotFoundError:  # not written yet
    pass
  data = np.load(Path(workdir) / "pairs" / f"{kind}.npz")
  if len(data["idx_w"]) == 0:
    raise ValueError(f"no {kind} pairs were built; see {Path(workdir) / 'pairs/pairs_report.json'}")
  images = to_model_range(np.load(Path(workdir) / "candidates" / "images.npy"))
  prompts = [str(p) for p in data["prompt"]]
  unique = sorted(set(prompts))
  states = loop.encode_prompts(sd, unique, int(config.finetune.model.text_layer))
  lookup = {p: i for i, p in enumerate(unique)}
  examples = [{
      "pair_id": f"{kind}:{i}", "prompt": prompt, "category": str(data["category"][i]),
      "is_harmful": int(data["is_harmful"][i]), "hflip_ok": 1,
      "reward_w": float(data["reward_w"][i]), "reward_l": float(data["reward_l"][i]),
      "cost_w": float(data["cost_w"][i]), "cost_l": float(data["cost_l"][i]),
      "latents_w": images[data["idx_w"][i]].astype(np.float32),
      "latents_l": images[data["idx_l"][i]].astype(np.float32),
      "text_states": states[lookup[prompt]].astype(np.float32),
  } for i, prompt in enumerate(prompts)]
  schema = tfds_pairs.PairSchema(images=False, latent_shape=tuple(images.shape[1:]),
                                 text_states_shape=tuple(states.shape[1:]))
  tfds_pairs.write_pairs(out, {"train": examples}, schema,
                         description=f"ShapeWorld {kind} pairs (pixel space)")
  return out


def run_method(config, workdir: Path, sd, method: str) -> dict:
  """Train `method` (a dpo, safetydpo or grpo method) unless its export exists; its summary,
  or {"preempted": True} when its job was interrupted (then it is not marked done)."""
  from scdpo_jax.files import write_json
  from scdpo_jax.shapeworld import inputs

  m = methods_lib.get(method)
  wd = method_dir(workdir, method)
  base = Path(workdir) / "base_pipeline"
  if done(workdir, method):
    logging.info("shapeworld: finetune %s already done", method)
    return json.loads((wd / "done.json").read_text())
  wd.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  if m.kind == "dpo":
    from scdpo_jax.train import loop

    result = loop.run(train_config(config, method, base, pair_dataset(config, workdir, m.pairs,
                                                                      sd)), wd)
    summary = {"steps": result["end_step"], "skipped": result["skipped"],
               "final_objective": result["losses"][-1] if result["losses"] else None}
  elif m.kind == "safetydpo":
    from scdpo_jax.lora import safetydpo

    result = safetydpo.run(safetydpo_config(config, method, base,
                                            pair_dataset(config, workdir, m.pairs, sd)), wd)
    summary = {"categories": result["categories"],
               "experts": [{k: e[k] for k in ("name", "pairs") if k in e}
                           for e in result["experts"]]}
  elif m.kind == "grpo":
    from scdpo_jax.grpo import job as grpo_job

    result = grpo_job.run(grpo_config(config, base, Path(workdir) / "world_clip"), wd)
    summary = {k: result[k] for k in ("end_epoch", "reward_mean_first", "reward_mean_last")
               if k in result}
  else:
    raise ValueError(f"{method} ({m.kind}) is not a fine-tune")
  if result.get("preempted"):  # SIGTERM / Ctrl-C: its state is saved, it is not done
    logging.warning("shapeworld: finetune %s interrupted; rerun to resume it", method)
    return {"preempted": True}
  summary["seconds"] = time.time() - t0
  inputs.write(config, workdir, "finetune", method)  # what it was made from, before "done"
  write_json(wd / "done.json", summary)
  logging.info("shapeworld: finetune %s took %.0fs", method, summary["seconds"])
  return summary


def unet_params(workdir: Path, method: str) -> Any:
  from scdpo_jax.models import unet_io

  _, params = unet_io.load_unet(method_dir(workdir, method) / "export" / "unet")
  return params
