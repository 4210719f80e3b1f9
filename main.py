"""scdpo-jax entry point: `python main.py --config configs/<name>.py --workdir runs/<name>`.

Any config key can be overridden on the command line (`--config.model.dtype=bfloat16`); unknown
keys are rejected. The config's `job` field picks what runs (see `scdpo_jax.jobs`).
"""

import logging

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  from scdpo_jax import jobs

  jobs.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
