"""The tiny random Stable Diffusion pipeline (tests, demos, CPU smoke runs) as a diffusers folder.

Jobs that run without `model.pretrained` (train, eval, inspect) all get their model from
`tiny_pipeline_folder(config.model.tiny, <workdir>/<name>, seed)`: random weights of our own
model classes with the component configs of `tiny` (`configs/default.py:tiny_pipeline_config`:
diffusers config.json keys for `unet`, `vae`, `text_encoder`, `scheduler`; with a
`text_encoder_2` entry as well, an SDXL pipeline, `pipeline_xl.random_stable_diffusion_xl`) and
the download-free byte-level tokenizer(s), written once per folder and loaded back through the
ordinary loaders, so a tiny run exercises exactly the code path of a real checkpoint.

Multi-process: process 0 builds and writes the folder (into a temporary sibling, renamed when
complete, so a crash never leaves a half-written pipeline that a rerun would take as finished);
every process then waits at a barrier, so the folder exists everywhere when the function returns
(the workdir must be on a shared filesystem). An existing folder (its `model_index.json`) is
reused as it is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax

from scdpo_jax.models import pipeline, pipeline_xl, tokenizer

MARKER = "model_index.json"


def _as_dict(config: Any) -> dict:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def tiny_pipeline_folder(tiny: Mapping[str, Any], folder: str | os.PathLike, seed: int = 0
                         ) -> Path:
  """The folder of the tiny random pipeline described by `tiny` (module docstring); built by
  process 0 if it does not exist yet, then every process waits for it. Returns `folder`."""
  folder = Path(folder)
  if not (folder / MARKER).is_file():
    if jax.process_index() == 0:
      _write(tiny, folder, seed)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("scdpo_jax.models.tiny:pipeline_written")
  return folder


def _write(tiny: Mapping[str, Any], folder: Path, seed: int) -> None:
  text = _as_dict(tiny["text_encoder"])
  staging = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  with tempfile.TemporaryDirectory() as tmp:
    tok = tokenizer.write_byte_level_tokenizer(Path(tmp) / "tokenizer",
                                               text["max_position_embeddings"])
    if "text_encoder_2" in tiny:  # SDXL: a second text encoder (with projection), tokenizer_2
      text_2 = _as_dict(tiny["text_encoder_2"])
      tok_2 = tokenizer.write_byte_level_tokenizer(
          Path(tmp) / "tokenizer_2", text_2["max_position_embeddings"], pad_token="!")
      xl = pipeline_xl.random_stable_diffusion_xl(
          _as_dict(tiny["unet"]), _as_dict(tiny["vae"]), text, text_2,
          _as_dict(tiny["scheduler"]), tok, tok_2, seed=seed)
      pipeline_xl.save_stable_diffusion_xl(staging, xl)
    else:
      sd = pipeline.random_stable_diffusion(_as_dict(tiny["unet"]), _as_dict(tiny["vae"]), text,
                                            _as_dict(tiny["scheduler"]), tok, seed=seed)
      pipeline.save_stable_diffusion(staging, sd)
  if folder.exists():  # an incomplete folder (no model_index.json) from an older run
    shutil.rmtree(folder)
  os.replace(staging, folder)
