"""The command line: `python main.py`, `python -m scdpo_jax` and the `scdpo-jax` entry point.

    scdpo-jax --config configs/<name>.py --workdir runs/<name> [--config.a.b=value ...]

Any config key can be overridden on the command line (`--config.model.dtype=bfloat16`); unknown
keys are rejected. The config's `job` field picks what runs (`scdpo_jax.jobs`). Config files may
import their siblings (`from configs import default`): the folder holding `configs/` is put on
`sys.path` first, so the command works from any folder.

Compiled programs are kept in a persistent JAX compilation cache, `~/.cache/scdpo-jax/jax`
(the test suite's), so a rerun or the next job with the same shapes skips XLA compilation:
`JAX_COMPILATION_CACHE_DIR` chooses another folder, `SCDPO_COMPILATION_CACHE=0` turns it off.
"""

from __future__ import annotations

import logging
import os
import re
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


def _overrides(argv: list[str]) -> list[str]:
  return [a for a in argv[1:] if a.startswith("--config.")]


def _one_line_config_error(exc: BaseException, argv: list[str]) -> str:
  text = str(exc.args[0] if exc.args else exc).replace("\\n", " ").replace("\n", " ")
  text = " ".join(text.replace("\\'", "'").split()).strip("'\" ")
  key = re.match(r"'?([\w.]+)'?\s*(.*)", text)
  if key and key.group(2).startswith("Did you mean"):
    text = f"unknown key {key.group(1)!r}. {key.group(2)}"
  given = " ".join(_overrides(argv)) or "(none)"
  return f"error: a config override was rejected: {text} (overrides: {given})"


def default_compilation_cache() -> Path:
  return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scdpo-jax" / "jax"


def enable_compilation_cache() -> None:
  """The persistent compilation cache (module docstring); JAX's own env variables win."""
  if os.environ.get("SCDPO_COMPILATION_CACHE", "1") == "0":
    return
  import jax

  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(default_compilation_cache()))


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  enable_compilation_cache()
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  from absl import logging as absl_logging
  from scdpo_jax import jobs

  absl_logging.info("config %s, workdir %s, overrides: %s", _config_path(sys.argv),
                    FLAGS.workdir, " ".join(_overrides(sys.argv)) or "(none)")
  from scdpo_jax.errors import ConfigError, UserError
  try:
    result = jobs.run(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    absl_logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ConfigError) else 1)
  if isinstance(result, dict) and result.get("preempted"):
    absl_logging.warning("interrupted; the state is saved: rerun the same command to resume "
                         "(exit status %d)", jobs.EXIT_INTERRUPTED)
    sys.exit(jobs.EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  _add_config_root_to_path(argv)
  try:  # parse here so that a bad flag or override is one line, not a traceback
    FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    print(_one_line_config_error(e, argv), file=sys.stderr)
    sys.exit(2)
  app.run(_main, argv=argv[:1])  # flags are parsed: absl sets up logging and runs the job
