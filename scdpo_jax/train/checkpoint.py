"""Orbax checkpoints of the train state, the data position and the config.

Layout: `<workdir>/checkpoints/<step>/{state,meta,config}`. `meta` holds the step, the data
position (pairs consumed) and the skipped-step count; `config` the run's config as JSON. Saves are
asynchronous; the last `keep` are kept. Restoring takes the abstract state *with the current
run's shardings*, so a checkpoint written on 8 devices restores on 1 (and vice versa).

`restore_latest` tries the newest checkpoint first; one that cannot be read (damaged files, a
stray folder with a step number as its name) is reported with the reason and the next older one
is tried; the unreadable ones are moved to `<workdir>/checkpoints_unreadable/` (never deleted) so
that the resumed run can save those steps again. A save that fails for lack of disk space raises one line that
names the folder (`CheckpointDiskFullError`).
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from scdpo_jax.errors import UserError


class CheckpointDiskFullError(UserError, OSError):
  """No space left on the device holding the checkpoints."""


class NoReadableCheckpointError(UserError, RuntimeError):
  """Checkpoints exist but none can be read."""


def _disk_full(exc: BaseException) -> bool:
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(exc):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def _one_line(exc: BaseException) -> str:
  text = f"{type(exc).__name__}: {exc}".strip().splitlines()
  return text[0][:300] if text else type(exc).__name__


class Checkpointer:
  def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _disk_full_error(self, exc: BaseException) -> CheckpointDiskFullError:
    return CheckpointDiskFullError(
        errno.ENOSPC, f"no space left on the device while writing checkpoints to "
        f"{self.directory}; free space there (older checkpoints are kept as they are) and rerun "
        "the same command to resume")

  def save(self, step: int, state: Any, meta: dict, config_json: dict, *,
           force: bool = False) -> bool:
    try:
      return self.manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta),
                                  config=ocp.args.JsonSave(config_json)),
          force=force)
    except Exception as e:
      if _disk_full(e):
        raise self._disk_full_error(e) from None
      raise

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """`abstract_state`: a tree of jax.ShapeDtypeStruct with `.sharding` set."""
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, list[str]] | None:
    """(state, meta, fallbacks) from the newest readable checkpoint, or None if there is none.

    `fallbacks` lists a line per newer checkpoint that could not be read, with the reason.
    """
    steps = self.all_steps()
    if not steps:
      return None
    fallbacks = []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:  # damaged or foreign folder: report, try the next older one
        line = f"checkpoint {self.directory / str(step)} cannot be read ({_one_line(e)})"
        logging.warning("%s; trying an older checkpoint (nothing is deleted)", line)
        fallbacks.append(line)
        continue
      if fallbacks:
        logging.warning("resuming from the older checkpoint %s", self.directory / str(step))
        fallbacks += self._set_aside([s for s in steps if s > step])
      return state, meta, fallbacks
    raise NoReadableCheckpointError(
        f"none of the checkpoints in {self.directory} can be read:\n  " + "\n  ".join(fallbacks)
        + "\nMove the folder away to start afresh, or use another --workdir")

  def _set_aside(self, steps: list[int]) -> list[str]:
    """Move unreadable checkpoints newer than the restored one out of the manager's folder (to
    `<checkpoints>_unreadable/`), so new saves of those steps can happen; nothing is deleted."""
    aside = self.directory.with_name(self.directory.name + "_unreadable")
    lines = []
    if jax.process_index() == 0:
      aside.mkdir(exist_ok=True)
      for step in steps:
        target = aside / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
        (self.directory / str(step)).rename(target)
        lines.append(f"moved the unreadable {self.directory / str(step)} to {target}")
        logging.warning("%s", lines[-1])
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("unreadable_checkpoints_set_aside")
    self.manager.reload()
    return lines

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      if _disk_full(e):
        raise self._disk_full_error(e) from None
      raise

  def close(self) -> None:
    self.wait()
    self.manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
