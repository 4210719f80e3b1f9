"""An exclusive lock on a job's workdir, so two runs never write into one folder.

`fcntl.flock` on `<workdir>/.lock`: the kernel drops the lock when its process dies (kill -9
included), so a lock left by a killed run never blocks a rerun; the file only records who holds
it (pid, host, start time) for the error message. Multi-host runs lock once, on process 0; the
other processes wait for its verdict.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

import jax

from scdpo_jax.errors import UserError

LOCK_NAME = ".lock"


class WorkdirLockedError(UserError, RuntimeError):
  """Another live process holds the workdir."""


class WorkdirLock:
  """`with WorkdirLock(workdir): ...`; raises `WorkdirLockedError` naming the holder."""

  def __init__(self, workdir):
    self.path = Path(workdir) / LOCK_NAME
    self._fd: int | None = None

  def acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._read_holder(fd)
      os.close(fd)
      raise WorkdirLockedError(
          f"workdir {self.path.parent} is in use by another run ({holder}); wait for it to "
          f"finish or stop it, or use another --workdir") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    self._fd = fd

  @staticmethod
  def _read_holder(fd: int) -> str:
    try:
      info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
      return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, OSError):
      return "holder unknown"

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


class ProcessZeroLock:
  """The workdir lock for multi-host runs: process 0 takes it, every process learns the result."""

  def __init__(self, workdir):
    self._lock = WorkdirLock(workdir) if jax.process_index() == 0 else None

  def __enter__(self) -> "ProcessZeroLock":
    error = ""
    if self._lock is not None:
      try:
        self._lock.acquire()
      except WorkdirLockedError as e:
        error = str(e)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      import numpy as np
      failed = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
      if int(failed) and not error:
        error = "workdir is in use by another run (see process 0's log)"
    if error:
      raise WorkdirLockedError(error)
    return self

  def __exit__(self, *exc) -> None:
    if self._lock is not None:
      self._lock.release()
