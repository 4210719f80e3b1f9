"""Optimizer and learning-rate schedule from the config (optax).

"adafactor" is `transformers.Adafactor(lr, weight_decay=wd, clip_threshold=1.0,
scale_parameter=False, relative_step=False)`, the optimizer the Salesforce Diffusion-DPO
`train.py --sdxl` forces, step for step (`adafactor_like_transformers`; optax's own `adafactor`
differs in two ways that matter here: its weight decay is not multiplied by the learning rate, so
wd 1e-2 would shrink every weight by 1 % per step, and it factors only the two largest axes of
size >= 128, where transformers factors the last two axes of the PyTorch layout of every tensor
of rank >= 2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
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


class FactoredRmsState(NamedTuple):
  count: jax.Array
  v_row: optax.Updates  # factored leaves: mean of g^2 over axis 1; others: (1,) placeholders
  v_col: optax.Updates  # factored leaves: mean of g^2 over axis 0
  v: optax.Updates  # unfactored (rank < 2) leaves: the full second moment


def scale_by_factored_rms_leading(decay_rate: float = 0.8, eps: float = 1e-30,
                                  clip_threshold: float = 1.0) -> optax.GradientTransformation:
  """transformers.Adafactor's normalised, clipped update u for our parameter layouts.

  beta2_t = 1 - t^(-decay_rate) (t = 1, 2, ...); s = g^2 + eps. A tensor of rank >= 2 keeps
  row / column means of s over its first two axes, R = mean_1(s), C = mean_0(s) (EMAs with
  beta2_t), and u = g / sqrt((R / mean_0(R)) C); a smaller one keeps the full EMA V, u = g /
  sqrt(V). Then u /= max(rms(u) / clip_threshold, 1). Our Dense kernels (in, out) and conv
  kernels (kh, kw, in, out) are PyTorch's (out, in) / (out, in, kh, kw) transposed, and
  transformers factors the last two PyTorch axes: (out, in) (the factored estimate is symmetric)
  and (kh, kw), i.e. our first two axes in both cases."""

  def init(params):
    def leaf(p, kind):
      small = jnp.zeros((1,), p.dtype)
      if p.ndim < 2:
        return jnp.zeros_like(p) if kind == "v" else small
      if kind == "v":
        return small
      return jnp.zeros(p.shape[:1] + p.shape[2:] if kind == "row" else p.shape[1:], p.dtype)
    return FactoredRmsState(count=jnp.zeros([], jnp.int32),
                            v_row=jax.tree.map(lambda p: leaf(p, "row"), params),
                            v_col=jax.tree.map(lambda p: leaf(p, "col"), params),
                            v=jax.tree.map(lambda p: leaf(p, "v"), params))

  def update(grads, state, params=None):
    del params
    t = (state.count + 1).astype(jnp.float32)
    beta2 = 1.0 - t ** (-decay_rate)

    def one(g, row, col, v):
      s = jnp.square(g) + eps
      if g.ndim < 2:
        v = beta2 * v + (1.0 - beta2) * s
        u = g * jax.lax.rsqrt(v)
      else:
        row = beta2 * row + (1.0 - beta2) * jnp.mean(s, axis=1)
        col = beta2 * col + (1.0 - beta2) * jnp.mean(s, axis=0)
        r = jax.lax.rsqrt(row / jnp.mean(row, axis=0, keepdims=True))
        u = g * r[:, None] * jax.lax.rsqrt(col)[None]
      rms = jnp.sqrt(jnp.mean(jnp.square(u)))
      return u / jnp.maximum(rms / clip_threshold, 1.0), row, col, v

    out = jax.tree.map(one, grads, state.v_row, state.v_col, state.v)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)
    return pick(0), FactoredRmsState(count=optax.safe_increment(state.count), v_row=pick(1),
                                     v_col=pick(2), v=pick(3))

  return optax.GradientTransformation(init, update)


def adafactor_like_transformers(lr, weight_decay: float = 0.0, clip_threshold: float = 1.0
                                ) -> optax.GradientTransformation:
  """p <- p - lr_t * (u + weight_decay * p), u from `scale_by_factored_rms_leading`:
  transformers.Adafactor with scale_parameter=False, relative_step=False, beta1=None (no first
  moment), decay_rate -0.8, eps (1e-30, 1e-3) (the second only scales parameters, off here)."""
  chain = [scale_by_factored_rms_leading(clip_threshold=clip_threshold)]
  if weight_decay:
    chain.append(optax.add_decayed_weights(weight_decay))
  chain.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*chain)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int,
                   pairs_per_step: int) -> optax.GradientTransformation:
  lr = learning_rate_schedule(opt, total_steps, pairs_per_step)
  if opt.name == "adamw":
    core = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
  elif opt.name == "adafactor":
    # Diffusion-DPO's SDXL setting: no relative step, no parameter scale, update clipping at 1.0
    # (after the gradient-norm clip: the launcher's `--sdxl` without `--use_adafactor` keeps it).
    core = adafactor_like_transformers(lr, weight_decay=opt.weight_decay, clip_threshold=1.0)
  else:
    raise ValueError(f"optimizer.name={opt.name!r}; supported: 'adamw', 'adafactor'")
  chain = [optax.clip_by_global_norm(opt.max_grad_norm)] if opt.max_grad_norm else []
  return optax.chain(*chain, core)
