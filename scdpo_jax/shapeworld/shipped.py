"""What the study ships: folders in this package made by the study's own stages, so that a
default run spends its time on the methods, not on its pretrained components.

  weights/base/        the base model (pretrain stage, pretrain.py); record `pretrain.json`
  weights/world_clip/  the world CLIP (world_clip stage, world_clip.py); record
                       `world_clip.json`

Each record holds the recipe (the config values that determine the folder) and the sha256 of
every weight file. A stage whose `source` key is "shipped" copies its folder into the workdir
(`copy`) only when the recorded recipe equals the config's (else it names the keys that
differ) and the weights match the recorded hashes; "train" makes it here with the stage's own
code. On the machine that made them the study's results are the same either way (the world
CLIP's training gave the same weights in each of the seven runs compared; README, ShapeWorld);
elsewhere a training here may differ in the last bits, which is why a switch of `source` makes
a rerun refuse the workdir's outputs (inputs.py records it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from absl import logging

from scdpo_jax.utils import flat_dict

WEIGHTS = Path(__file__).resolve().parent / "weights"
SOURCES = ("shipped", "train")


def check_source(source: str, key: str) -> str:
  """`source` ("shipped" | "train") of the config key `key`, or ValueError naming both."""
  source = str(source)
  if source not in SOURCES:
    raise ValueError(f"config.{key}={source!r}; supported: {SOURCES}")
  return source


def weights_sha256(folder: Path) -> dict[str, str]:
  """sha256 of every .safetensors file of a folder, by relative path."""
  folder = Path(folder)
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*.safetensors"))}


def copy(shipped: Path, record_file: str, recipe: dict, folder: Path, what: str,
         train_flag: str) -> dict:
  """Copy the shipped folder `shipped` (its record `record_file`) to `folder` after checking
  that it was made by `recipe` and that its weights are the recorded ones; its record.
  `what` names it in errors and `train_flag` is the override that makes it here instead."""
  record_path = Path(shipped) / record_file
  if not record_path.is_file():
    raise FileNotFoundError(f"{record_path} missing: the shipped {what} is not in this "
                            f"checkout; use {train_flag}")
  record = json.loads(record_path.read_text())
  made_by = record.get("recipe", {})
  wanted = json.loads(json.dumps(recipe))  # as a record holds it (tuples as lists)
  if made_by != wanted:
    old, new = flat_dict(made_by), flat_dict(wanted)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise ValueError(f"the shipped {what} ({shipped}) was made by another recipe (differs in "
                     f"{', '.join(diff[:8])}); use {train_flag} to make this one")
  if weights_sha256(shipped) != record.get("weights_sha256"):
    raise ValueError(f"the shipped {what}'s weights ({shipped}) do not match the hashes in "
                     f"its {record_file}")
  folder = Path(folder)
  if folder.exists():
    shutil.rmtree(folder)
  shutil.copytree(shipped, folder)
  logging.info("shapeworld: copied the shipped %s (%s) to %s", what, shipped, folder)
  return record
