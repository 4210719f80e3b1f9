"""50-step classifier-free-guided DDIM at 512 px: ours (JAX) against the PyTorch diffusers pipeline.

  python benchmarks/bench_sampling.py ours --batch 8
  python benchmarks/bench_sampling.py torch --batch 8
  python benchmarks/bench_sampling.py ours --tiny     # CPU check of the script (16 px, 2 steps)

Random SD1.5-sized weights (UNet, VAE, CLIP-L text encoder), guidance 7.5, text encoding and VAE
decode included. Prints one JSON line with images/s (median over timed calls after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _configs(tiny: bool):
  if tiny:
    return common.TINY_UNET, common.TINY_VAE, common.TINY_TEXT, 16
  return common.SD15_UNET, common.SD15_VAE, common.CLIP_L_TEXT, 512


def bench_ours(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax.core import meta

  from scdpo_jax.models import (clip, clip_config, layers, pipeline, schedule, tokenizer, unet,
                                unet_config, vae, vae_config)
  from scdpo_jax.sampling.generate import SamplingSettings, TextToImage

  unet_cfg, vae_cfg, text_cfg, size = _configs(args.tiny)
  dtype = jnp.dtype(args.dtype)
  sd = pipeline.StableDiffusion()
  sd.unet = unet.UNet2DConditionModel(unet_config.UNetConfig.from_dict(unet_cfg), dtype=dtype,
                                      param_dtype=dtype, attention_impl=args.attention)
  sd.vae = vae.AutoencoderKL(vae_config.VAEConfig.from_dict(vae_cfg), dtype=dtype,
                             param_dtype=dtype)
  sd.text_encoder = clip.CLIPTextModel(clip_config.CLIPTextConfig.from_dict(text_cfg),
                                       dtype=dtype, param_dtype=dtype)
  cast = lambda tree: jax.tree.map(lambda x: np.asarray(x).astype(dtype), tree)
  sd.unet_params, sd.vae_params, sd.text_encoder_params = (
      cast(common.random_params(meta.unbox(layers.abstract_params(m))))
      for m in (sd.unet, sd.vae, sd.text_encoder))
  tok_dir = tokenizer.write_byte_level_tokenizer(tempfile.mkdtemp(), 77)
  sd.tokenizer = tokenizer.load_tokenizer(tok_dir, 77)
  sd.scheduler_config = dict(common.SD15_SCHEDULER)
  sd.schedule = schedule.schedule_from_config(sd.scheduler_config)
  settings = SamplingSettings(sampler="ddim", num_steps=args.steps, height=size, width=size)
  gen = TextToImage(sd, settings, batch_size=args.batch)
  n = args.batch
  call = lambda: gen(["a photo of a cat"] * n, list(range(n)), [0] * n, [7.5] * n,
                     [""] * n)
  t0 = time.time()
  images = call()
  first = time.time() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    images = call()
    times.append(time.perf_counter() - t0)
  dt = float(np.median(times))
  stats = jax.devices()[0].memory_stats() or {}
  return dict(impl="scdpo-jax", attention=args.attention, batch=n, steps=args.steps, size=size,
              s_per_batch=round(dt, 3), images_per_s=round(n / dt, 3),
              first_call_s=round(first, 1), finite=bool(np.isfinite(images).all()),
              peak_GiB=round(stats.get("peak_bytes_in_use", 0) / 2**30, 1),
              device=jax.devices()[0].device_kind)


def bench_torch(args) -> dict:
  import numpy as np
  import torch
  import diffusers
  import transformers

  from scdpo_jax.models import tokenizer

  unet_cfg, vae_cfg, text_cfg, size = _configs(args.tiny)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.float16 if dev == "cuda" else torch.float32
  tok = transformers.CLIPTokenizer.from_pretrained(
      str(tokenizer.write_byte_level_tokenizer(tempfile.mkdtemp(), 77)))
  sched = diffusers.DDIMScheduler(**{k: v for k, v in common.SD15_SCHEDULER.items()
                                     if not k.startswith("_")})
  pipe = diffusers.StableDiffusionPipeline(
      unet=diffusers.UNet2DConditionModel(**unet_cfg),
      vae=diffusers.AutoencoderKL(**vae_cfg),
      text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg)),
      tokenizer=tok, scheduler=sched, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False).to(dev, dtype)
  pipe.set_progress_bar_config(disable=True)
  n = args.batch
  call = lambda: pipe(["a photo of a cat"] * n, num_inference_steps=args.steps,
                      guidance_scale=7.5, height=size, width=size, output_type="np").images
  t0 = time.time()
  call()
  first = time.time() - t0
  times = []
  for _ in range(args.repeats):
    if dev == "cuda":
      torch.cuda.synchronize()
    t0 = time.perf_counter()
    images = call()
    if dev == "cuda":
      torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
  dt = float(np.median(times))
  return dict(impl="torch-diffusers", batch=n, steps=args.steps, size=size,
              s_per_batch=round(dt, 3), images_per_s=round(n / dt, 3),
              first_call_s=round(first, 1), finite=bool(np.isfinite(images).all()),
              device=torch.cuda.get_device_name() if dev == "cuda" else "cpu")


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("which", choices=["ours", "torch"])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--attention", default="auto")
  p.add_argument("--tiny", action="store_true")
  args = p.parse_args(argv)
  if args.tiny:
    args.steps, args.repeats, args.batch = min(args.steps, 2), 1, min(args.batch, 2)
  result = bench_ours(args) if args.which == "ours" else bench_torch(args)
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
