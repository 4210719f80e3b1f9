"""The command line: `python main.py`, `python -m scdpo_jax` and the `scdpo-jax` entry point.

    scdpo-jax --config configs/<name>.py --workdir runs/<name> [--config.a.b=value ...]

Any config key can be overridden on the command line (`--config.model.dtype=bfloat16`); unknown
keys are rejected. The config's `job` field picks what runs (`scdpo_jax.jobs`). Config files may
import their siblings (`from configs import default`): the folder holding `configs/` is put on
`sys.path` first, so the command works from any folder.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for outputs (created if missing).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.Filter):
  """Drop INFO chatter of orbax/absl internals from the log; keep warnings and our own lines."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def _config_path(argv: list[str]) -> Path | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return Path(arg.split("=", 1)[1].split(":", 1)[0])
    if arg == "--config" and i + 1 < len(argv):
      return Path(argv[i + 1].split(":", 1)[0])
  return None


def _add_config_root_to_path(argv: list[str]) -> None:
  """Make `from configs import x` inside a config file work wherever the user stands."""
  path = _config_path(argv)
  if path is None:
    return
  folder = path.resolve().parent
  if (folder / "__init__.py").is_file() and str(folder.parent) not in sys.path:
    sys.path.insert(0, str(folder.parent))


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  from scdpo_jax import jobs

  jobs.run(FLAGS.config, FLAGS.workdir)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  _add_config_root_to_path(argv)
  app.run(_main, argv=argv)
