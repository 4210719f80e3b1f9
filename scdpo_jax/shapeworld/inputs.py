"""What each of the study's outputs was made from, so that a rerun reuses it only when unchanged.

A rerun of the study skips every stage (and every fine-tune and evaluation row) whose outputs
exist. Without a record, a rerun after a config change (another lr, another training seed, a
new pair rule) would silently report the old outputs under the new config. So each output
records the config values it was made from, upstream stages' included, in a small JSON file
beside it (`record_path`), and a rerun compares them first (`check`): a difference stops the
study before any work, naming the file, the keys and both values. Changes that leave an output
as it was (another `config.methods` subset, `workers`, the report's grids, a key that
only other stages read) keep it.

Records: candidates/inputs.json, world_clip/inputs.json, cost_model/inputs.json,
pairs/inputs.json, finetune/<method>/study_inputs.json, eval/<split>/<method>.inputs.json.
An output made before records existed is reused with a warning (nothing to compare against).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from absl import logging

from scdpo_jax import files
from scdpo_jax.errors import ConfigError
from scdpo_jax.utils import flat_dict

# Config keys each output is made from (a section name = every key under it), its upstream
# stages' keys added by `stage_inputs`. The base model: its recipe (world, model, pretrain).
_BASE = ("seed", "world", "model", "pretrain.source", "pretrain.train", "pretrain.optimizer")
_SAMPLER = ("sampling.num_steps", "sampling.guidance_scale")
_OWN = {
    "candidates": ("seed", "candidates") + _SAMPLER,
    "world_clip": ("world_clip",),
    "cost_model": ("cost_model", "cost_model_tower"),
    "pairs": ("pairs",),
}
_EVALUATION = ("evaluate.seeds", "evaluate.images_per_prompt") + _SAMPLER
_GUARD = ("sampling.negative_prompt", "sampling.trasce_scan_unroll", "guards")
_JOB_PATHS = {  # paths of this workdir inside a job's config: where, not what
    "dpo": ("model.pretrained", "data.name"),
    "safetydpo": ("expert.model.pretrained", "expert.data.name"),
    "grpo": ("model.pretrained", "reward.clip_folder"),
}


def _pick(config, keys) -> dict[str, Any]:
  flat = flat_dict(config.copy_and_resolve_references())
  out = {}
  for key in keys:
    hits = {k: v for k, v in flat.items() if k == key or k.startswith(key + ".")}
    if not hits:
      raise KeyError(f"config has no key {key!r} (shapeworld/inputs.py)")
    out.update(hits)
  return out


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
  """As the record file holds them (tuples become lists, floats stay exact)."""
  return json.loads(json.dumps(values, sort_keys=True, default=str))


def stage_inputs(config, stage: str) -> dict[str, Any]:
  """The config values a shared stage's outputs are made from, its upstream stages' included."""
  from scdpo_jax.shapeworld import study

  keys = list(_BASE)
  if stage in ("candidates", "cost_model", "pairs"):
    keys += _OWN["candidates"]
  if stage in ("cost_model", "pairs"):
    keys += _OWN["cost_model"]
    if study.cost_model_tower(config) == "world_clip":
      keys += _OWN["world_clip"]
  if stage == "world_clip":
    keys = list(_OWN["world_clip"])
  if stage == "pairs":
    keys += _OWN["pairs"]
  return _jsonable(_pick(config, keys))


def method_inputs(config, method: str) -> dict[str, Any]:
  """The config values a fine-tune's outputs are made from: its job's whole config as the study
  composes it (finetune.py; this workdir's paths left out) and its data's stages."""
  from scdpo_jax.shapeworld import finetune as ft_lib, methods as methods_lib

  m = methods_lib.get(method)
  if m.kind == "dpo":
    job = ft_lib.train_config(config, method, Path("."), Path("."))
    upstream = stage_inputs(config, "pairs")
  elif m.kind == "safetydpo":
    job = ft_lib.safetydpo_config(config, method, Path("."), Path("."))
    upstream = stage_inputs(config, "pairs")
  elif m.kind == "grpo":
    job = ft_lib.grpo_config(config, Path("."), Path("."))
    upstream = {**_pick(config, _BASE), **stage_inputs(config, "world_clip")}
  else:
    raise ValueError(f"{method} ({m.kind}) is not a fine-tune")
  flat = {k: v for k, v in flat_dict(job).items() if k not in _JOB_PATHS[m.kind]}
  return _jsonable({**upstream, **{f"job.{k}": v for k, v in flat.items()}})


def evaluation_inputs(config, method: str) -> dict[str, Any]:
  """The config values a row's evaluation is made from (the split is its folder)."""
  from scdpo_jax.shapeworld import methods as methods_lib

  kind = methods_lib.get(method).kind
  keys = list(_BASE) + list(_EVALUATION) + (list(_GUARD) if kind == "guard" else [])
  values = _pick(config, keys)
  if kind not in ("base", "guard"):
    values.update({f"finetune.{k}": v for k, v in method_inputs(config, method).items()})
  return _jsonable(values)


def record_path(workdir: Path, what: str, method: str = "", split: str = "") -> Path:
  workdir = Path(workdir)
  if what == "finetune":
    return workdir / "finetune" / method / "study_inputs.json"
  if what == "evaluate":
    return workdir / "eval" / split / f"{method}.inputs.json"
  return workdir / what / "inputs.json"


def expected(config, what: str, method: str = "") -> dict[str, Any]:
  if what == "finetune":
    return method_inputs(config, method)
  if what == "evaluate":
    return evaluation_inputs(config, method)
  return stage_inputs(config, what)


def write(config, workdir: Path, what: str, method: str = "", split: str = "") -> None:
  files.write_json(record_path(workdir, what, method, split), expected(config, what, method))


def check(config, workdir: Path, what: str, method: str = "", split: str = "") -> None:
  """Raise ConfigError if the output `what` (a stage, or a method's fine-tune / evaluation)
  in `workdir` was made from other config values than `config`'s."""
  path = record_path(workdir, what, method, split)
  if not path.is_file():
    logging.warning("shapeworld: %s has no record of the config it was made from (made before "
                    "records existed); reusing it unchecked", path.parent if not method else
                    f"{what} {method}")
    return
  old, new = json.loads(path.read_text()), expected(config, what, method)
  if old == new:
    return
  diff = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
  shown = "; ".join(f"{k}: {old.get(k, '<absent>')!r} then, {new.get(k, '<absent>')!r} now"
                    for k in diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
  name = f"{what} of {method}" if method else f"stage {what}"
  raise ConfigError(
      f"{path}: the {name} in this workdir was made with another config ({shown}). A rerun "
      f"reuses finished outputs only for the same config: use a new --workdir, or delete "
      f"{path.with_name(method + '.json') if what == 'evaluate' else path.parent} (and what was "
      f"made from it) to redo it")
