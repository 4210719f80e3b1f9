"""Test-wide setup: quiet reference libraries, fp32 matmuls, a persistent JAX compile cache."""

import os
from pathlib import Path

# Before jax is imported anywhere.
# A user-level cache (shared by checkouts on the same machine); set JAX_COMPILATION_CACHE_DIR to
# override it.
_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scdpo-jax" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# fp32 matmuls, here and in every subprocess a test starts (they inherit os.environ): the same
# setting gives the same program, so a subprocess's compile is a cache hit where this process or
# an earlier test compiled that program already.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# One OpenMP / MKL thread for the PyTorch references (and NumPy's BLAS), here and in
# subprocesses. The suite runs as two pytest-xdist workers on two cores, each also compiling
# with XLA: torch's spinning OpenMP team competing with the other worker made the same reference
# 2x (and up to 10-50x, tests/test_train_reference.py) slower in CPU time. Inputs are tiny.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _test_xla_flags(flags: str) -> str:
  """XLA_FLAGS for the suite: `--xla_force_host_platform_device_count=1` (one CPU device, XLA's
  default anyway) unless XLA_FLAGS names a count. JAX's compile cache key includes XLA_FLAGS,
  and the one-device subprocesses get this flag (`tests.train_utils.xla_flags(1)`), so with it
  here too they hit the programs this process compiled (and the other way round)."""
  kept = flags.split()
  if not any(f.startswith("--xla_force_host_platform_device_count") for f in kept):
    kept.append("--xla_force_host_platform_device_count=1")
  return " ".join(kept)


os.environ["XLA_FLAGS"] = _test_xla_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_train_base(tmp_path_factory) -> str:
  """The tiny base pipeline of `tests.train_utils.tiny_train_config()`, written once per session
  and used as `model.pretrained` by the trainer tests (runs must not write into it)."""
  from tests.train_utils import build_tiny_base

  return str(build_tiny_base(tmp_path_factory.mktemp("tiny_train_base")))
