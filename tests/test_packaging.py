"""Packaging: the project installs with pip, imports from any folder, and `python -m scdpo_jax`
runs the jobs of main.py with config files that import their siblings."""

import os
import subprocess
import sys

from tests.train_utils import ROOT


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(extra)
  return env


def test_pip_install_then_import_and_run_from_another_folder(tmp_path):
  target = tmp_path / "site"
  proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                         "--no-build-isolation", "--target", str(target), str(ROOT)],
                        capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (target / "scdpo_jax" / "train" / "step.py").is_file()
  env = _clean_env(PYTHONPATH=str(target))
  where = subprocess.run([sys.executable, "-c", "import scdpo_jax; print(scdpo_jax.__file__)"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
  assert where.returncode == 0, where.stderr
  assert where.stdout.strip().startswith(str(target))
  # configs/scdpo_tiny.py imports `from configs import default`: works from another folder.
  run = subprocess.run([sys.executable, "-m", "scdpo_jax", "--config",
                        str(ROOT / "configs" / "scdpo_tiny.py"), "--workdir",
                        str(tmp_path / "w"), "--config.job=no_such_job"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
  assert "config.job='no_such_job' is not a known job" in run.stderr, run.stderr[-3000:]


def test_the_command_line_uses_a_persistent_compilation_cache(monkeypatch, tmp_path):
  import jax

  from scdpo_jax import cli

  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert cli.default_compilation_cache() == tmp_path / "scdpo-jax" / "jax"
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("SCDPO_COMPILATION_CACHE", "0")
    cli.enable_compilation_cache()
    assert not jax.config.jax_compilation_cache_dir  # turned off
    monkeypatch.setenv("SCDPO_COMPILATION_CACHE", "1")
    cli.enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "scdpo-jax" / "jax")
    jax.config.update("jax_compilation_cache_dir", "/elsewhere")  # a user's choice wins
    cli.enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == "/elsewhere"
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
