"""Metrics to a JSONL file and TensorBoard event files (tensorboardX, no TensorFlow), plus a
human progress line with throughput and ETA. Only process 0 writes.

A run that starts at step S (0 for a fresh run, the restored step on resume) first drops every
row after S from `metrics.jsonl` and tells TensorBoard to purge events after S, so after any
interruption both hold exactly what an uninterrupted run writes.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path

import jax
from absl import logging

from scdpo_jax import files


def truncate_metrics(path: Path, last_step: int) -> int:
  """Keep the rows of a metrics JSONL file with step <= last_step (atomic rewrite); returns how
  many rows were dropped (a torn last line counts as dropped)."""
  if not path.is_file():
    return 0
  kept, dropped = [], 0
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      dropped += 1
      continue
    if row.get("step", 0) <= last_step:
      kept.append(line)
    else:
      dropped += 1
  if dropped:
    files.write_text(path, "".join(line + "\n" for line in kept))
  return dropped


class MetricsWriter:
  def __init__(self, workdir, total_steps: int, tensorboard: bool = True, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.path = Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      dropped = truncate_metrics(self.path, start_step)
      if dropped:
        logging.info("dropped %d metrics rows after step %d (written after the checkpoint that "
                     "this run resumes from)", dropped, start_step)
      self._file = open(self.path, "a")
      if tensorboard:
        from tensorboardX import SummaryWriter
        # purge_step: events at steps >= purge_step left by an interrupted run are discarded.
        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"),
                                 purge_step=start_step + 1 if start_step else None)

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
