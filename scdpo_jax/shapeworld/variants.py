"""Runs of the study beside one another, sharing its data stages: what the tuning script
(scripts/shapeworld_tune.py, config variants on the validation split) and the training-seed
script (scripts/shapeworld_seeds.py, the same config retrained with other seeds) have in common.

Each variant is a workdir of its own whose shared stages (base model, candidates, world CLIP,
cost model, pairs) are links to one shared workdir's; the study's input records
(shapeworld/inputs.py) travel with them, so a variant whose config changes a key those stages
read is refused instead of reusing them.
"""

from __future__ import annotations

import json
from pathlib import Path

from scdpo_jax.shapeworld import methods, study

SHARED = ("base_pipeline", "candidates", "world_clip", "cost_model", "cost_model_data", "pairs")
SHARED_STAGES = ",".join(("pretrain",) + study.RECORDED_STAGES)  # a config.only value


def parse_value(value: str):
  """A command-line value: a JSON list (e.g. [0,1,2]) as a tuple, an int, a float, a bool, or
  the string itself."""
  if value.startswith("["):
    return tuple(json.loads(value))
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(value.lower(), value)


def parse_assignments(items) -> list[tuple[str, object]]:
  """["key=value", ...] -> [(key, parsed value), ...]."""
  out = []
  for item in items:
    if "=" not in item:
      raise SystemExit(f"{item!r}: expected key=value")
    key, value = item.split("=", 1)
    out.append((key, parse_value(value)))
  return out


def set_key(config, key: str, value) -> None:
  """config[key] = value for a dotted key that must exist."""
  *path, last = key.split(".")
  node = config
  for p in path:
    node = node[p]
  if last not in node:
    raise KeyError(f"unknown config key {key}")
  node[last] = value


def link_shared(shared: Path, workdir: Path) -> None:
  """Link `shared`'s data stages into `workdir` (made if missing); existing entries stay."""
  workdir.mkdir(parents=True, exist_ok=True)
  for part in SHARED:
    if not (workdir / part).exists() and (shared / part).exists():
      (workdir / part).symlink_to((shared / part).resolve())


def check_not_overridden(method: str, keys) -> None:
  """A key that the method's row overrides (shapeworld/methods.py) would be silently replaced."""
  m = methods.get(method)
  owned = {f"finetune.train.{k}" for k in m.train} | {
      f"finetune.optimizer.{k}" for k in m.optimizer} | {f"finetune.data.{k}" for k in m.data}
  clash = sorted(set(keys) & owned)
  if clash:
    raise SystemExit(f"{', '.join(clash)}: the {method} row sets these itself (methods.py), so "
                     f"the value given here would not be used; change the row instead")
