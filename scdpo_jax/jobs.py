"""Jobs that `main.py` runs, selected by `config.job`; each lives in its own module.

Every job runs with an exclusive lock on its workdir (`scdpo_jax.lock`). A job interrupted by
SIGTERM or Ctrl-C that saved its state returns `{"preempted": True, ...}`; the command line then
exits with `EXIT_INTERRUPTED` (75, EX_TEMPFAIL: "rerun the same command to resume"), which a
scheduler can tell from success (0) and from a crash (1).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import ml_collections

from scdpo_jax import lock, parallel
from scdpo_jax.errors import ConfigError

EXIT_INTERRUPTED = 75

# job name -> "module:function"; imported lazily so a job pays only for what it uses.
JOBS = {
    "inspect": "scdpo_jax.inspect_job:run",
    "train": "scdpo_jax.train.loop:run",
    "eval": "scdpo_jax.evaluation.job:run",
    "cost_model": "scdpo_jax.cost_model.job:run",
    "shapeworld": "scdpo_jax.shapeworld.study:run",
    "safediffusion_r1": "scdpo_jax.grpo.job:run",
    "safetydpo": "scdpo_jax.lora.safetydpo:run",
}


def run(config: ml_collections.ConfigDict, workdir: str):
  if config.job not in JOBS:
    raise ConfigError(f"config.job={config.job!r} is not a known job; known: {sorted(JOBS)}")
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  parallel.initialize_distributed(config.get("distributed"))  # before the first JAX call
  module, func = JOBS[config.job].split(":")
  job = getattr(importlib.import_module(module), func)
  with lock.ProcessZeroLock(workdir):
    return job(config, workdir)
