"""What a resumed run must share with the run that wrote its workdir, and the checks on it.

A run writes `<workdir>/run_fingerprint.json` before its first step: every config key except
`RESUMABLE_KEYS`, the identity of the base model (its folder, the UNet config and a hash of each
weights file's size, head and tail), the data source and the train state's layout (tree paths,
shapes, dtypes; mesh-independent). A rerun on the same workdir compares its own fingerprint with
the stored one and stops before compiling, naming every differing key with the old and the new
value. Keys in `RESUMABLE_KEYS` may change on resume (more steps, other logging or checkpoint
intervals, another mesh or attention kernel: the same math). Experts can accept other changes
with `--config.resume.allow_changes=key1,key2` (dotted keys or prefixes ending in '.').
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from scdpo_jax import files
from scdpo_jax.errors import UserError
from scdpo_jax.utils import flat_dict

FINGERPRINT_NAME = "run_fingerprint.json"

# Config keys (dotted; a trailing '.' is a prefix) that may differ between a run and its resume.
RESUMABLE_KEYS = (
    "train.num_steps", "train.export_at_end", "log.", "checkpoint.every_steps",
    "checkpoint.keep", "checkpoint.async_save", "mesh.", "distributed.", "resume.",
    "model.attention_impl", "model.remat_policy", "sharding_rules",
)


class ResumeMismatchError(UserError, ValueError):
  """The workdir was written by a run with other settings."""


def _matches(key: str, patterns) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".")
             for p in patterns)


def model_identity(folder: Path) -> dict[str, str]:
  """The UNet's config and weights files of a diffusers folder, by content identity."""
  unet = Path(folder) / "unet"
  out = {}
  for path in sorted(unet.glob("*")):
    if path.suffix in (".json", ".safetensors"):
      out[f"base_model.unet/{path.name}"] = files.file_identity(path)
  return out


def state_layout(abstract_state: Any) -> str:
  """A hash of the state's tree paths, shapes and dtypes (independent of the mesh)."""
  rows = [f"{jax.tree_util.keystr(p)}:{tuple(x.shape)}:{np.dtype(x.dtype).name}"
          for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)]
  return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def run_fingerprint(config: ml_collections.ConfigDict, base_folder: Path, abstract_state: Any,
                    data_identity: dict[str, Any] | None = None) -> dict[str, Any]:
  config_values = {k: v for k, v in flat_dict(json.loads(config.to_json_best_effort())).items()
                   if not _matches(k, RESUMABLE_KEYS)}
  return {**{f"config.{k}": v for k, v in config_values.items()},
          **model_identity(base_folder),
          **{f"data.{k}": v for k, v in (data_identity or {}).items()},
          "state_layout": state_layout(abstract_state)}


def _short(value: Any) -> str:
  text = json.dumps(value)
  return text if len(text) <= 80 else text[:77] + "..."


def check_resume(workdir: Path, fingerprint: dict[str, Any], allow_changes=()) -> list[str]:
  """Compare with the stored fingerprint (if any); raise naming every difference not allowed.

  Returns the allowed differences (logged by the caller). Writes the fingerprint when the
  workdir has none yet (process 0).
  """
  path = Path(workdir) / FINGERPRINT_NAME
  if not path.is_file():
    if jax.process_index() == 0:
      files.write_json(path, dict(sorted(fingerprint.items())), indent=1)
    return []
  try:
    stored = json.loads(path.read_text())
  except ValueError as e:
    raise ResumeMismatchError(f"{path} is not valid JSON ({e}); it records the settings of "
                              "the run that wrote this workdir. Use a new --workdir") from None
  allowed_patterns = tuple(a.removeprefix("config.") for a in allow_changes)
  differences, allowed = [], []
  for key in sorted(set(stored) | set(fingerprint)):
    old, new = stored.get(key, "<absent>"), fingerprint.get(key, "<absent>")
    if old == new:
      continue
    line = f"{key}: {_short(old)} -> {_short(new)}"
    if _matches(key.removeprefix("config."), allowed_patterns):
      allowed.append(line)
    else:
      differences.append(line)
  if differences:
    raise ResumeMismatchError(
        f"workdir {workdir} holds a run with other settings ({path.name}); refusing to resume. "
        f"Differences (old -> new):\n  " + "\n  ".join(differences) +
        "\nUse a new --workdir, or accept the changes with "
        f"--config.resume.allow_changes={','.join(d.split(':')[0].removeprefix('config.') for d in differences)}")
  return allowed
