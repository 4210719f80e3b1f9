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

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_train_base(tmp_path_factory) -> str:
  """The tiny base pipeline of `tests.train_utils.tiny_train_config()`, written once per session
  and used as `model.pretrained` by the trainer tests (runs must not write into it)."""
  from tests.train_utils import build_tiny_base

  return str(build_tiny_base(tmp_path_factory.mktemp("tiny_train_base")))
