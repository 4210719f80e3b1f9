"""Metrics to a JSONL file and TensorBoard event files (tensorboardX, no TensorFlow), plus a
human progress line with throughput and ETA. Only process 0 writes."""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path

import jax
from absl import logging


class MetricsWriter:
  def __init__(self, workdir, total_steps: int, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.path = Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(self.path, "a")
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if v is not None else None) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if v is not None and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def progress(self, step: int, metrics: dict[str, float], steps_per_s: float) -> None:
    if not self.enabled:
      return
    left = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("nan")
    eta = str(datetime.timedelta(seconds=int(left))) if math.isfinite(left) else "?"
    mfu = metrics.get("mfu")
    logging.info(
        "step %d/%d | loss %.4f | acc %.3f | harmful acc %.3f | clean acc %.3f | %.2f pairs/s | "
        "%.3f s/step%s | skipped %d | ETA %s", step, self.total_steps, metrics["loss/all"],
        metrics["implicit_acc/all"], metrics["implicit_acc/harmful"],
        metrics["implicit_acc/clean"], metrics["pairs_per_s"], 1.0 / max(steps_per_s, 1e-9),
        f" | MFU {mfu:.3f}" if mfu is not None else "", int(metrics["skipped_total"]), eta)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()
