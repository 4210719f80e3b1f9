"""scdpo-jax entry point: `python main.py --config configs/<name>.py --workdir runs/<name>`.

Any config key can be overridden on the command line (`--config.model.dtype=bfloat16`); unknown
keys are rejected. The config's `job` field picks what runs (see `scdpo_jax.jobs`). The same
command line works as `python -m scdpo_jax ...` or, after `pip install -e .`, as `scdpo-jax ...`
(`scdpo_jax/cli.py`).
"""

from scdpo_jax.cli import main

if __name__ == "__main__":
  main()
