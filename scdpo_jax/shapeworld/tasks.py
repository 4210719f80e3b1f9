"""The study's work as tasks run a few at a time, each after the tasks it needs.

On 2 CPU cores one XLA:CPU program keeps about 1.35 of them busy (the world UNet's forward and
backward at batch 64: 1.30 per second alone, 1.82 per second as two concurrent streams, the
same as two processes), so the study runs `config.workers` tasks at once: the data stages, each
row's fine-tune and each row's evaluation. A task is the same program on the same inputs
whichever thread runs it and whatever runs beside it (the study's tests compare).

`run_tasks` takes the tasks in priority order; a free worker starts the first one whose
dependencies have finished. The calling thread is one of the workers (signals reach only the
main thread: loop.Interruption). A task that returns {"preempted": True} (its job saved its
state on SIGTERM / Ctrl-C), a `stop()` that turns true, or a task that raises: no new task
starts, the running ones finish, then the error is re-raised.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, Sequence

from absl import logging


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  run: Callable[[], Any]
  after: tuple[str, ...] = ()  # tasks that must finish first (names not in the run: done)


@dataclasses.dataclass
class Outcome:
  results: dict[str, Any]  # name -> what its run returned, for the tasks that finished
  seconds: dict[str, float]  # name -> its run's wall time
  preempted: str | None = None  # the first task that returned {"preempted": True}
  stopped: bool = False  # stop() turned true before every task had started


def _is_preempted(result: Any) -> bool:
  return isinstance(result, dict) and bool(result.get("preempted"))


def run_tasks(tasks: Sequence[Task], workers: int,
              stop: Callable[[], bool] = lambda: False) -> Outcome:
  names = [t.name for t in tasks]
  if len(set(names)) != len(names):
    raise ValueError(f"task names repeat: {names}")
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  present = set(names)
  pending = list(tasks)
  t_start = time.time()
  finished: set[str] = set()
  out = Outcome(results={}, seconds={})
  errors: list[BaseException] = []
  running = 0
  cond = threading.Condition()

  def halted() -> bool:  # under cond
    return bool(errors) or out.preempted is not None or out.stopped

  def next_task() -> Task | None:
    """The first ready task, or None when nothing is left to start; waits while tasks are
    pending but none is ready."""
    nonlocal running
    with cond:
      while True:
        if not halted() and pending and stop():
          out.stopped = True
        if halted() or not pending:
          return None
        for i, t in enumerate(pending):
          if all(d in finished or d not in present for d in t.after):
            running += 1
            return pending.pop(i)
        if running == 0:  # nothing running will ever make one ready
          raise ValueError(f"tasks {[t.name for t in pending]} wait on each other")
        cond.wait(timeout=1.0)  # wakes when a task ends (or to poll stop())

  def work() -> None:
    nonlocal running
    while True:
      try:
        task = next_task()
      except Exception as e:  # a cycle
        with cond:
          errors.append(e)
          cond.notify_all()
        return
      if task is None:
        return
      t0 = time.time()
      try:
        result = task.run()
      except BaseException as e:  # re-raised by the caller after the others end
        logging.error("shapeworld: task %s failed: %r", task.name, e)
        with cond:
          errors.append(e)
          running -= 1
          cond.notify_all()
        if isinstance(e, Exception):
          return
        raise  # a second Ctrl-C (main thread): abort now, the daemon workers die with us
      with cond:
        out.results[task.name] = result
        out.seconds[task.name] = time.time() - t0
        if _is_preempted(result):
          out.preempted = out.preempted or task.name
        else:
          finished.add(task.name)
        running -= 1
        cond.notify_all()
        logging.info("shapeworld: %s done in %.0fs; %d of %d tasks done after %.0fs, %d running",
                     task.name, out.seconds[task.name], len(out.results), len(tasks),
                     time.time() - t_start, running)

  threads = [threading.Thread(target=work, name=f"shapeworld-worker-{i}", daemon=True)
             for i in range(1, min(workers, len(tasks)))]
  for th in threads:
    th.start()
  work()
  for th in threads:
    th.join()
  if errors:
    raise errors[0]
  return out
