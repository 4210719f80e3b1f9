"""One SC-DPO train step of an SD1.5-sized UNet: ours (JAX) against the PyTorch diffusers peer.

  python benchmarks/bench_dpo_step.py ours --pairs 8 --attention auto --remat none
  python benchmarks/bench_dpo_step.py torch --pairs 8 --compile 1
  bash benchmarks/run_gpu.sh            # everything below in one go, then a table

"ours" times the real trainer step (`scdpo_jax.train.state` + `train.step`: the jitted, state-donating
step with shared t/noise, fp32 master weights with bf16 compute, frozen bf16 reference UNet,
AdamW, grad clipping, focusing and cost margin) on random SD1.5 weights and random 64x64x4
latents / 77x768 text states. "torch" runs `peer_torch_dpo_step.py` (our copy of the peer step).
Each prints one JSON line: pairs/s, step time, peak memory, compile time and MFU, where MFU uses
the peer's FLOP count (PyTorch's flop counter: 52.37 TFLOP per 8 pairs, linear in pairs) over the
device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
TFLOP_PER_PAIR = 52.37 / 8  # PyTorch's flop counter on the peer step
PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _peak(kind: str) -> float | None:
  for k, v in PEAK.items():
    if k in kind:
      return v
  return None


def _log(msg: str, t0=[time.time()]) -> None:
  print(f"[{time.time() - t0[0]:7.1f}s] {msg}", file=sys.stderr, flush=True)


def bench_ours(args) -> dict:
  sys.path.insert(0, str(ROOT))
  import jax
  import numpy as np

  from configs import default
  from scdpo_jax import parallel
  from scdpo_jax.data.batch import PAIR_KEYS
  from scdpo_jax.models import pipeline, schedule, unet as unet_lib, unet_config
  from scdpo_jax.train import optim, state as state_lib, step as step_lib

  config = default.get_config()
  config.model.dtype = args.dtype
  config.model.ref_param_dtype = "bfloat16"
  config.model.attention_impl = args.attention
  config.model.remat_policy = args.remat
  config.train.pairs_per_step = args.pairs
  config.train.grad_accum = 1
  config.train.gamma = 1.0
  config.train.safety_mode = "margin"
  config.train.num_steps = 2000
  config.optimizer.lr = 1e-8
  config.optimizer.scale_lr = True
  config.optimizer.warmup_steps = 500

  unet_cfg = common.TINY_UNET if args.tiny else common.SD15_UNET
  sd = pipeline.StableDiffusion()
  sd.unet = unet_lib.UNet2DConditionModel(unet_config.UNetConfig.from_dict(unet_cfg))
  sd.schedule = schedule.schedule_from_config(dict(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      beta_schedule="scaled_linear", prediction_type="epsilon"))
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  t_setup = time.time()
  policy, reference = state_lib.make_unets(config.model, sd.unet.config)
  optimizer = optim.make_optimizer(config.optimizer, config.train.num_steps,
                                   config.train.pairs_per_step)
  spec = state_lib.train_state_spec(config, mesh, policy, reference, optimizer)
  _log("state spec built; random params")
  params = common.random_params(spec.abstract_state.params)
  ref_params = state_lib.reference_params(spec, params)
  state = state_lib.init_train_state(spec, optimizer, params, config)
  jax.block_until_ready(state)
  _log("params on device")
  del params
  rng = np.random.default_rng(0)
  n = args.pairs
  s, d = unet_cfg["sample_size"], unet_cfg["cross_attention_dim"]
  batch_np = {
      "latents_w": rng.standard_normal((n, s, s, 4), np.float32),
      "latents_l": rng.standard_normal((n, s, s, 4), np.float32),
      "text_states": rng.standard_normal((n, 77, d), np.float32),
      "is_harmful": (np.arange(n) % 2).astype(np.int32),
      "cost_w": rng.random(n).astype(np.float32), "cost_l": rng.random(n).astype(np.float32),
      "reward_w": np.zeros(n, np.float32), "reward_l": np.zeros(n, np.float32),
  }
  empty = rng.standard_normal((1, 77, d), np.float32)
  _log("compiling the train step")
  train_step = step_lib.make_train_step(
      apply_fn=policy.apply, ref_apply_fn=reference.apply, optimizer=optimizer,
      schedule=sd.schedule, cfg=state_lib.step_config(config.train))
  program = state_lib.compile_train_step(mesh, spec, train_step,
                                         {k: batch_np[k] for k in PAIR_KEYS}, empty)
  compile_s = program.compile_s
  _log(f"compiled in {compile_s:.1f}s")
  batch = parallel.global_batch_from_local(batch_np, mesh)
  empty = jax.device_put(empty, parallel.replicated(mesh))
  for _ in range(3):
    state, metrics = program.fn(state, ref_params, batch, empty)
  jax.block_until_ready(state)
  _log("warm-up done")
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = program.fn(state, ref_params, batch, empty)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  dt = float(np.median(times))
  stats = jax.devices()[0].memory_stats() or {}
  kind = jax.devices()[0].device_kind
  peak = _peak(kind)
  flops = TFLOP_PER_PAIR * 1e12 * n
  return dict(
      impl="scdpo-jax", attention=args.attention, remat=args.remat, dtype=args.dtype, pairs=n,
      step_s=round(dt, 4), pairs_per_s=round(n / dt, 2), compile_s=round(compile_s, 1),
      setup_s=round(time.time() - t_setup, 1),
      TFLOPs=round(flops / dt / 1e12, 1), mfu=round(flops / dt / peak, 3) if peak else None,
      xla_flops_T=round(program.flops_per_device / 1e12, 2) if program.flops_per_device else None,
      peak_GiB=round(stats.get("peak_bytes_in_use", 0) / 2**30, 1),
      loss=float(metrics["objective"]), finite=bool(metrics["finite"]), gpu=kind)


def bench_torch(args) -> dict:
  out = subprocess.run(
      [sys.executable, str(Path(__file__).parent / "peer_torch_dpo_step.py"), f"pairs={args.pairs}",
       f"compile={args.compile}", f"steps={args.steps}"], capture_output=True, text=True)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(lines[-1])


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("which", choices=["ours", "torch"])
  p.add_argument("--pairs", type=int, default=8)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--attention", default="auto")
  p.add_argument("--remat", default="none")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--compile", default="0")
  p.add_argument("--tiny", action="store_true", help="tiny UNet: a CPU check of the script")
  args = p.parse_args(argv)
  if args.tiny:
    args.steps = 2
  result = bench_ours(args) if args.which == "ours" else bench_torch(args)
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
