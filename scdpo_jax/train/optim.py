"""Optimizer and learning-rate schedule from the config (optax)."""

from __future__ import annotations

import ml_collections
import optax


def effective_learning_rate(opt: ml_collections.ConfigDict, pairs_per_step: int) -> float:
  """`lr`, or `lr * pairs_per_step` when `scale_lr` (Diffusion-DPO: 1e-8 x 2048 = 2.048e-5)."""
  return opt.lr * pairs_per_step if opt.scale_lr else opt.lr


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int,
                           pairs_per_step: int) -> optax.Schedule:
  peak = effective_learning_rate(opt, pairs_per_step)
  warmup = optax.linear_schedule(0.0, peak, max(opt.warmup_steps, 1))
  if opt.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, max(total_steps - opt.warmup_steps, 1),
                                        alpha=opt.cosine_final_fraction)
  else:
    raise ValueError(f"optimizer.schedule={opt.schedule!r}; supported: 'constant', 'cosine'")
  return optax.join_schedules([warmup, after], [opt.warmup_steps])


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int,
                   pairs_per_step: int) -> optax.GradientTransformation:
  lr = learning_rate_schedule(opt, total_steps, pairs_per_step)
  if opt.name == "adamw":
    core = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
  elif opt.name == "adafactor":
    # Diffusion-DPO's SDXL setting: no relative step, update clipping at 1.0.
    core = optax.adafactor(lr, multiply_by_parameter_scale=False, clipping_threshold=1.0,
                           weight_decay_rate=opt.weight_decay or None)
  else:
    raise ValueError(f"optimizer.name={opt.name!r}; supported: 'adamw', 'adafactor'")
  chain = [optax.clip_by_global_norm(opt.max_grad_norm)] if opt.max_grad_norm else []
  return optax.chain(*chain, core)
