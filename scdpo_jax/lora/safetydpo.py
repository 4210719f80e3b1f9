"""The `safetydpo` job: SafetyDPO (AlignGuard, arXiv 2412.10493) safety experts and their merge.

  python main.py --config configs/safetydpo_tiny.py --workdir runs/safetydpo_tiny

One LoRA "safety expert" per harm category of the pair data's `category` field, each trained
by the unchanged LoRA trainer (`train.loop.run` with `config.expert`, a LoRA train config, on
the pairs of its category only), then merged into one model and exported. Sources:
../shared/docs/method.md 3 and methods-wave2.md 2. Released [C]: each expert is Diffusion-DPO
(beta 5000) with LoRA rank 4 = alpha, gaussian init, on to_q/to_k/to_v/to_out.0. Unreleased:
Co-Merge; ours is the documented [I] reconstruction of `lora/merge.py` (per weight entry, the
expert with the highest mean |dW x| over calibration inputs from all categories).

Work, in order (every stage resumable):

1. Pairs and their categories. `expert.data.source="tfds"`: the dataset's `category` field
   (cached in `<workdir>/data_categories.json`, keyed by the dataset's identity);
   `"memory_random"` (tiny runs): the random pairs of `train.loop.random_pairs`, pair i in
   category `safetydpo.categories[i % K]`. `safetydpo.categories`: which categories get an
   expert, spelled as in the data (() = every non-empty category, sorted); pairs of other
   categories (and uncategorised ones, "") are not used.
2. Experts. `safetydpo.experts="per_category"`: expert k trains on category k's pairs in
   `<workdir>/experts/<k>_<category>/` (a train-job workdir: checkpoints, train_result.json,
   export/); a rerun resumes each where it stopped, and a finished expert is not trained again
   (the train job restores it and returns). `"all_single"`: the baseline, one LoRA on the pairs
   of all selected categories (`<workdir>/experts/all_single/`), exported as it is (no merge).
3. Merge (per_category). Calibration: `merge.calibration_pairs_per_category` pairs of every
   category (a seeded draw), winner and loser latents each noised at a uniform random timestep
   (seeded), with their prompt's text states; the base UNet runs on them and `merge.
   input_abs_means_batches` records mean |x| per input channel of every adapted layer.
   `merge.method="co_merge"` (the reconstruction) or `"average"` (plain averaging of the
   experts' dW). `merge.output="svd"`: the merged dW re-factorised by truncated SVD to a rank-R
   LoRA with scale 1 (R = `merge.rank`, 0 = experts x expert rank, the smallest rank that keeps
   averaging exact); `"dense"`: the dense dW (full rank) is fused and no LoRA file is written.
   The merge is recomputed on every run (it takes seconds), so merge options can change without
   retraining the experts. `<workdir>/merge.json` records what was merged: experts, their pair
   counts, each expert's share of the selected entries, and the SVD's relative error.
4. Export (process 0): `<workdir>/export/lora/pytorch_lora_weights.safetensors` (svd or
   all_single; diffusers' `load_lora_weights`) and `<workdir>/export/unet` (the base with the
   merged delta fused, diffusers format; for svd, the base + the exported LoRA).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from scdpo_jax import files, parallel
from scdpo_jax.errors import ConfigError, check_choice
from scdpo_jax.lora import adapters, io as lora_io, merge as merge_lib, train as lora_train

EXPERT_MODES = ("per_category", "all_single")
METHODS = ("co_merge", "average")
OUTPUTS = ("dense", "svd")
CATEGORIES_FILE = "data_categories.json"


# ------------------------------------------------------------------------------ config

def check_config(config: ml_collections.ConfigDict) -> None:
  """What can be checked before loading anything."""
  for key in ("expert", "safetydpo", "merge"):
    if key not in config:
      raise ConfigError(f"a safetydpo config needs config.{key} (see configs/safetydpo_tiny.py)")
  if not adapters.enabled(config.expert):
    raise ConfigError("safetydpo: config.expert must be a LoRA train config "
                      "(config.expert.lora.enabled = True)")
  if adapters.spec_from_config(config.expert.lora).adapts_text_encoder:
    raise ConfigError("safetydpo merges UNet experts only: config.expert.lora."
                      "text_encoder_targets must stay empty")
  s, m = config.safetydpo, config.merge
  check_choice("safetydpo.experts", s.experts, EXPERT_MODES)
  check_choice("merge.method", m.method, METHODS)
  check_choice("merge.output", m.output, OUTPUTS)
  if int(m.rank) < 0:
    raise ConfigError(f"merge.rank must be >= 0 (0 = experts x expert rank), got {m.rank}")
  if int(m.calibration_pairs_per_category) < 1 or int(m.calibration_batch) < 1:
    raise ConfigError("merge.calibration_pairs_per_category and merge.calibration_batch must "
                      "be >= 1")
  cats = list(_categories(s))
  if len(set(cats)) != len(cats) or any(not c for c in cats):
    raise ConfigError(f"safetydpo.categories has duplicates or empty names: {cats}")
  if config.expert.data.source == "memory_random" and len(cats) < 1:
    raise ConfigError("safetydpo with expert.data.source='memory_random' needs "
                      "safetydpo.categories (the categories cycled over the random pairs)")


def _categories(s) -> tuple[str, ...]:
  cats = s.categories
  if isinstance(cats, str):
    cats = [c.strip() for c in cats.split(",") if c.strip()]
  return tuple(str(c) for c in cats)


def expert_config(config: ml_collections.ConfigDict, base_folder: Path
                  ) -> ml_collections.ConfigDict:
  """`config.expert` as each expert's train config: the base folder resolved (the tiny pipeline
  is written once, in the job's workdir) and the expert's own export on."""
  cfg = ml_collections.ConfigDict(config.expert.to_dict())
  cfg.job = "train"
  cfg.model.pretrained = str(base_folder)
  cfg.train.export_at_end = True
  return cfg


def _dir_name(index: int, category: str) -> str:
  return f"{index}_" + (re.sub(r"[^A-Za-z0-9.-]+", "_", category).strip("_") or "category")


# ------------------------------------------------------------------------------ data

def pair_data(cfg: ml_collections.ConfigDict, categories: tuple[str, ...], workdir: Path):
  """(pair source over the whole data, the category of each of its pairs)."""
  from scdpo_jax.train import loop

  if cfg.data.source == "memory_random":
    from scdpo_jax.data.memory import InMemoryPairs
    from scdpo_jax.models import pipeline
    sd = pipeline.load_stable_diffusion(cfg.model.pretrained, ("unet", "text_encoder", "tokenizer"))
    src = loop.random_pairs(cfg, sd)
    cats = [categories[i % len(categories)] for i in range(src.num_pairs)]
    src = InMemoryPairs(src.arrays, seed=src.seed, shuffle=src.shuffle, hflip=src.hflip,
                        categories=cats)
    return src, src.record_categories()
  from scdpo_jax.data import loader as tfds_loader
  src = tfds_loader.open_pair_source(cfg.data)
  identity = src.identity()
  cache = workdir / CATEGORIES_FILE
  if cache.is_file():
    saved = json.loads(cache.read_text())
    if saved.get("identity") == identity and len(saved["categories"]) == src.num_pairs:
      return src, np.asarray(saved["categories"], dtype=object)
  logging.info("reading the category of the %d pairs of %s", src.num_pairs, identity["path"])
  cats = src.record_categories()
  if jax.process_index() == 0:
    files.write_json(cache, {"identity": identity, "categories": [str(c) for c in cats]})
  return src, cats


def select_categories(found: np.ndarray, wanted: tuple[str, ...]) -> tuple[str, ...]:
  present = sorted({str(c) for c in found if str(c)})
  if not wanted:
    if not present:
      raise ConfigError("safetydpo: the pair data has no categorised pair (its `category` "
                        "field is empty everywhere)")
    return tuple(present)
  missing = [c for c in wanted if c not in present]
  if missing:
    raise ConfigError(f"safetydpo.categories {missing} not in the pair data; its categories "
                      f"(spelled as in the data): {present}")
  return tuple(wanted)


# ------------------------------------------------------------------------------ experts

def _gather(tree: Any) -> Any:
  from jax.experimental import multihost_utils
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(tree))


def train_experts(cfg, source, cats: np.ndarray, categories: tuple[str, ...], mode: str,
                  workdir: Path) -> tuple[list[dict], list[Any], bool]:
  """Train (or resume / restore) the experts; ([summary per expert], [host LoRA trees],
  preempted)."""
  from scdpo_jax.train import loop

  if mode == "all_single":
    plan = [("all_single", "all_single", np.flatnonzero(np.isin(cats, categories)))]
  else:
    plan = [(_dir_name(i, c), c, np.flatnonzero(cats == c)) for i, c in enumerate(categories)]
  summaries, trees = [], []
  for name, category, idx in plan:
    expert_dir = workdir / "experts" / name
    logging.info("expert %s: %d pairs (%s) in %s", name, idx.size, category, expert_dir)
    result = loop.run(cfg, expert_dir, pair_source=source.subset(idx, label=category))
    state = result.pop("state")
    summaries.append({"name": name, "category": category, "pairs": int(idx.size),
                      "workdir": str(expert_dir), "start_step": result.get("start_step"),
                      "end_step": result.get("end_step"),
                      "already_finished": bool(result.get("already_finished", False))})
    if result.get("preempted"):
      return summaries, trees, True
    trees.append(_gather(state.params))
    del state
  return summaries, trees, False


# ------------------------------------------------------------------------------ merge

def calibration_batches(source, cats: np.ndarray, categories: tuple[str, ...], schedule,
                        m) -> tuple[list[tuple], dict]:
  """UNet inputs (x_t, t, text states) for the merge's calibration (module docstring, 3)."""
  n = int(m.calibration_pairs_per_category)
  picked = []
  for k, c in enumerate(categories):
    idx = np.flatnonzero(cats == c)
    rng = np.random.default_rng([int(m.seed), k])
    picked.append(np.sort(rng.permutation(idx)[:n]))
  idx = np.concatenate(picked)
  rows = source.records_batch(idx)
  x0 = np.concatenate([rows["latents_w"], rows["latents_l"]]).astype(np.float32)
  states = np.concatenate([rows["text_states"], rows["text_states"]]).astype(np.float32)
  rng = np.random.default_rng([int(m.seed), len(categories), 1])
  t = rng.integers(0, schedule.num_train_timesteps, x0.shape[0]).astype(np.int32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  from scdpo_jax.models import schedule as schedule_lib
  x_t = np.asarray(schedule_lib.add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise),
                                          jnp.asarray(t)))
  b = int(m.calibration_batch)
  batches = [(x_t[i:i + b], t[i:i + b], states[i:i + b]) for i in range(0, x_t.shape[0], b)]
  info = {"pairs": int(idx.size), "rows": int(x_t.shape[0]),
          "pairs_per_category": {c: int(p.size) for c, p in zip(categories, picked)},
          "pair_positions_sha1": hashlib.sha1(idx.astype(np.int64).tobytes()).hexdigest()}
  return batches, info


def merge_experts(trees: list[Any], spec: adapters.LoraSpec, input_means: dict, m
                  ) -> tuple[Any, dict]:
  """(dense deltas {module: dW} or a rank-R LoRA tree with scale 1, report)."""
  scales = [spec.scale] * len(trees)
  if m.method == "co_merge":
    dense, shares = merge_lib.co_merge(trees, scales, input_means, mode="dense")
  else:
    dense, shares = merge_lib.average(trees, scales, mode="dense"), None
  report: dict = {"method": m.method, "output": m.output, "experts": len(trees)}
  if shares is not None:
    sizes = {k: dense[k].size for k in dense}
    total = sum(sizes.values())
    report["expert_share_of_entries"] = [
        float(sum(shares[k][e] * sizes[k] for k in dense) / total) for e in range(len(trees))]
    report["expert_share_per_module"] = {
        "/".join(k): [float(x) for x in v] for k, v in sorted(shares.items())}
  if m.output == "dense":
    return dense, report
  rank = int(m.rank) or spec.rank * len(trees)
  tree = merge_lib.refactorise(dense, rank)
  back = merge_lib._deltas(tree, 1.0)
  err = {"/".join(k): float(np.linalg.norm(back[k] - d) / max(np.linalg.norm(d), 1e-30))
         for k, d in sorted(dense.items())}
  num = sum(np.linalg.norm(back[k] - d) ** 2 for k, d in dense.items())
  den = sum(np.linalg.norm(d) ** 2 for d in dense.values())
  report.update(rank=rank, svd_relative_error=float(np.sqrt(num / max(den, 1e-30))),
                svd_relative_error_per_module=err)
  return tree, report


# ------------------------------------------------------------------------------ the job

def run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  from scdpo_jax.models import pipeline, unet_io
  from scdpo_jax.train import loop

  workdir = Path(workdir)
  check_config(config)
  parallel.initialize_distributed(config.expert.get("distributed"))
  s, m = config.safetydpo, config.merge
  spec = adapters.spec_from_config(config.expert.lora)
  spec.validate()
  try:
    loop.check_config(config.expert, parallel.mesh_from_config(config.expert.mesh))
  except ConfigError as e:  # the experts' train config: its keys are under config.expert
    raise ConfigError(f"config.expert (the experts' train config; override its keys as "
                      f"--config.expert.<key>): {e}") from None
  folder = loop.base_model_folder(config.expert, workdir)
  cfg = expert_config(config, folder)

  source, cats = pair_data(cfg, _categories(s), workdir)
  categories = select_categories(cats, _categories(s))
  counts = {c: int(np.sum(cats == c)) for c in categories}
  logging.info("safetydpo (%s): categories %s", s.experts, counts)

  summaries, trees, preempted = train_experts(cfg, source, cats, categories, s.experts, workdir)
  result: dict = {"experts": summaries, "categories": counts, "preempted": preempted}
  if preempted:
    logging.warning("interrupted while training expert %s; rerun to resume",
                    summaries[-1]["name"])
    return result

  export = workdir / "export"
  unet_module, base = unet_io.load_unet(folder / "unet")
  if s.experts == "all_single":
    if jax.process_index() == 0:
      _clear(export)
      lora_train.export(export, folder, unet_module.config, trees[0], spec)
    report = {"method": "all_single", "experts": 1}
  else:
    sd = pipeline.load_stable_diffusion(folder, ("scheduler",))
    batches, calib = calibration_batches(source, cats, categories, sd.schedule, m)
    modules = sorted({p[:-1] for p in traverse_util.flatten_dict(trees[0])})
    means = merge_lib.input_abs_means_batches(unet_module, jax.device_put(base), modules,
                                              batches)
    merged, report = merge_experts(trees, spec, means, m)
    report["calibration"] = calib
    if jax.process_index() == 0:
      export_merge(export, unet_module.config, base, merged, m.output, report.get("rank"),
                   spec.init)
  report["experts_detail"] = summaries
  if jax.process_index() == 0:
    files.write_json(workdir / "merge.json", report)
    files.write_json(workdir / "safetydpo_result.json", {**result, "merge": {
        k: v for k, v in report.items() if not k.endswith("per_module")}})
  logging.info("safetydpo: exported %s to %s", report.get("method"), export)
  result.update(merge=report, export=str(export), experts_params=trees)
  return result


def export_merge(export: Path, unet_config, base: Any, merged: Any, output: str,
                 rank: int | None, init: str = "gaussian") -> dict[str, Path]:
  """Write the merge: "dense" deltas -> `export/unet` (base + dW); "svd" (a rank-`rank` LoRA
  tree, scale 1) -> `export/lora` (alpha = rank) and `export/unet` (base + A @ B). A previous
  export in `export` is removed first."""
  from scdpo_jax.models import unet_io

  _clear(export)
  out = {}
  if output == "dense":
    fused = merge_lib.apply_deltas(base, merged)
  else:
    out["lora"] = lora_io.save_lora(export / "lora", merged, rank=int(rank), alpha=float(rank),
                                    init=init)
    fused = adapters.fuse(base, merged, 1.0)
  out["unet"] = unet_io.save_unet(export / "unet", unet_config, fused)
  return out


def _clear(export: Path) -> None:
  """Remove the previous run's merged export (merge options may have changed)."""
  for sub in ("lora", "unet"):
    if (export / sub).exists():
      shutil.rmtree(export / sub)
