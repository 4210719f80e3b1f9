"""Shared helpers for trainer tests: a fast tiny config and a subprocess worker entry point.

Run as a script (`python -m tests.train_utils SPEC.json`) it trains with the spec's config
overrides and writes the result (losses, final params as .npz) where the spec says; tests launch
it with XLA_FLAGS for simulated devices or as jax.distributed processes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ml_collections

ROOT = Path(__file__).resolve().parent.parent


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a subprocess with `devices` simulated CPU devices: this process's flags with
  the device count replaced."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])


def tiny_train_config(**overrides) -> ml_collections.ConfigDict:
  """configs/scdpo_tiny.py (one-block UNet, fast to compile), fp32, a few steps."""
  sys.path.insert(0, str(ROOT))
  from configs import scdpo_tiny

  config = scdpo_tiny.get_config()
  config.train.update(dict(gamma=0.0, grad_accum=1, pairs_per_step=8, num_steps=3,
                           export_at_end=False))
  config.data.num_pairs = 16
  config.checkpoint.update(dict(every_steps=10, async_save=False))
  config.optimizer.warmup_steps = 1
  # Equality tests (sharded vs single device, accumulated vs one batch, resumed vs not) compare
  # parameters to 1e-5. Adam divides by sqrt(v): for biases whose gradient is ~0 it turns fp32
  # summation-order noise into O(lr) differences. A larger eps keeps such updates linear in the
  # gradient, and a small beta keeps the DPO logit from amplifying the noise, so the tests check
  # the math rather than the conditioning of a random tiny model.
  config.optimizer.update(dict(lr=1e-3, eps=1e-3))
  config.train.beta = 50.0
  config.log.update(dict(every_steps=1, tensorboard=False))
  apply_overrides(config, overrides)
  return config


def build_tiny_base(folder: Path) -> Path:
  """Write the tiny base pipeline of `tiny_train_config()` once; runs then use it as
  `model.pretrained`, which skips a random init + export per run."""
  from scdpo_jax.train import loop

  folder = Path(folder)
  config = tiny_train_config()
  if not (folder / "base_pipeline" / "model_index.json").is_file():
    loop.base_model_folder(config, folder)
  return folder / "base_pipeline"


def assert_same_run(a: dict, b: dict, atol: float, rtol: float = 0.0,
                    opt_state: bool = False) -> None:
  """Two train results (`loop.run`) took the same trajectory: losses to (atol, rtol), final
  params (and optimizer state) to atol."""
  import jax
  import numpy as np

  np.testing.assert_allclose(a["losses"], b["losses"], atol=atol, rtol=rtol)
  fields = ("params", "opt_state") if opt_state else ("params",)
  for field in fields:
    leaves_a = jax.tree.leaves(getattr(a["state"], field))
    leaves_b = jax.tree.leaves(getattr(b["state"], field))
    assert leaves_a and len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    if isinstance(value, list):
      value = tuple(value)
    node[leaf] = value


def _worker(spec_path: str) -> None:
  import jax
  import numpy as np
  from flax import traverse_util

  spec = json.loads(Path(spec_path).read_text())
  from scdpo_jax import jobs

  results = {}
  for name, overrides in spec["runs"].items():
    config = tiny_train_config(**overrides)
    try:
      # through jobs.run, as main.py does: the workdir lock (process 0 locks, the others learn
      # its verdict) is part of every multi-process run
      result = jobs.run(config, str(Path(spec["workdir"]) / name))
    except Exception as e:  # reported to the test, which asserts on it
      results[name] = {"error": f"{type(e).__name__}: {e}"}
      continue
    results[name] = {"losses": result["losses"]}
    if spec.get("save_params"):
      from jax.experimental import multihost_utils
      params = multihost_utils.process_allgather(result["state"].params, tiled=True)
      if jax.process_index() == 0:
        flat = {"/".join(k): np.asarray(v) for k, v in
                traverse_util.flatten_dict(params).items()}
        np.savez(Path(spec["workdir"]) / f"{name}_params.npz", **flat)
  if jax.process_index() == 0:
    Path(spec["result"]).write_text(json.dumps(results))


if __name__ == "__main__":
  _worker(sys.argv[1])
