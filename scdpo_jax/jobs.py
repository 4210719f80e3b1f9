"""Jobs that `main.py` runs, selected by `config.job`; each lives in its own module."""

from __future__ import annotations

import importlib
from pathlib import Path

import ml_collections

# job name -> "module:function"; imported lazily so a job pays only for what it uses.
JOBS = {
    "inspect": "scdpo_jax.inspect_job:run",
    "train": "scdpo_jax.train.loop:run",
    "eval": "scdpo_jax.evaluation.job:run",
    "cost_model": "scdpo_jax.cost_model.job:run",
    "shapeworld": "scdpo_jax.shapeworld.study:run",
}


def run(config: ml_collections.ConfigDict, workdir: str):
  if config.job not in JOBS:
    raise ValueError(f"config.job={config.job!r} is not a known job; known: {sorted(JOBS)}")
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  module, func = JOBS[config.job].split(":")
  return getattr(importlib.import_module(module), func)(config, workdir)
