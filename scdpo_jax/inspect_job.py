"""The `inspect` job: check a Stable Diffusion folder end to end with our Flax models."""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from scdpo_jax import files
from scdpo_jax.utils import save_image_grid


def _count(params) -> int:
  import jax
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  """Load (or build tiny random) SD components, run text -> UNet -> VAE once, report.

  With `config.model.pretrained` set, this checks a user's diffusers folder end to end before a
  long run. Without it, the tiny random pipeline of `config.model.tiny` (`models/tiny.py`) is
  exported in diffusers format to `<workdir>/tiny_pipeline` (once) and loaded back through the
  same loader.
  """
  import jax
  import jax.numpy as jnp

  from scdpo_jax.models import pipeline, schedule, tiny, tokenizer, vae

  mc = config.model
  dtype = jnp.dtype(mc.dtype)
  t0 = time.time()
  if mc.pretrained:
    folder = Path(mc.pretrained)
  else:
    folder = tiny.tiny_pipeline_folder(mc.tiny, workdir / "tiny_pipeline", config.seed)
    logging.info("tiny random pipeline in %s (%.1fs)", folder, time.time() - t0)
  t0 = time.time()
  sd = pipeline.load_stable_diffusion(folder, dtype=dtype, attention_impl=mc.attention_impl)
  load_s = time.time() - t0

  prompts = list(config.prompts)
  ids = tokenizer.tokenize(sd.tokenizer, prompts)
  rng = jax.random.key(config.seed)

  @jax.jit
  def denoise_once(unet_p, vae_p, text_p, ids, rng):
    states = sd.text_encoder.apply({"params": text_p}, ids).last_hidden_state
    h, w = sd.unet.config.sample_hw
    x_t = jax.random.normal(rng, (ids.shape[0], h, w, sd.unet.config.in_channels), dtype)
    t = jnp.full((ids.shape[0],), sd.schedule.num_train_timesteps - 1)
    out = sd.unet.apply({"params": unet_p}, x_t, t, states)
    x0, _ = schedule.predict_x0_and_eps(sd.schedule, out.astype(jnp.float32), x_t, t)
    image = sd.vae.apply({"params": vae_p}, vae.unscale_latents(x0, sd.vae.config),
                         method="decode")
    return out, image

  t0 = time.time()
  out, image = jax.block_until_ready(
      denoise_once(sd.unet_params, sd.vae_params, sd.text_encoder_params, ids, rng))
  first_s = time.time() - t0
  t0 = time.time()
  jax.block_until_ready(denoise_once(sd.unet_params, sd.vae_params, sd.text_encoder_params, ids,
                                     rng))
  step_s = time.time() - t0
  report = {
      "folder": str(folder),
      "backend": jax.default_backend(),
      "params": {"unet": _count(sd.unet_params), "vae": _count(sd.vae_params),
                 "text_encoder": _count(sd.text_encoder_params)},
      "prediction_type": sd.schedule.prediction_type,
      "unet_output_shape": list(out.shape),
      "image_shape": list(image.shape),
      "finite": bool(jnp.isfinite(out).all() and jnp.isfinite(image).all()),
      "load_s": round(load_s, 2),
      "compile_and_first_run_s": round(first_s, 2),
      "run_s": round(step_s, 3),
  }
  save_image_grid(np.asarray(image, np.float32), workdir / "inspect_x0_prediction.png")
  files.write_json(workdir / "inspect.json", report)
  logging.info("inspect report: %s", json.dumps(report))
  print(json.dumps(report, indent=2))
  if not report["finite"]:
    raise FloatingPointError("non-finite outputs: the checkpoint or the dtype is broken")
  return report
