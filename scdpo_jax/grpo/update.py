"""The jitted SafeDiffusion-R1 update: one optimizer step on a minibatch of stored trajectories.

A minibatch holds S trajectories (their latents x_0..x_N in sampler order, the log-probs the
rollout stored, one advantage each) and, per trajectory, the K transition indices it trains on
(`steps` (S, K): a per-sample shuffle of the first `num_steps - 1` transitions, of which the
first K = int((num_steps - 1) * timestep_fraction) are kept: 49 of 50, shuffled, as released).
The objective is the mean over the S x K (trajectory, transition) terms of `losses.ppo_clip_loss`
(+ kl_coef * `losses.gaussian_kl` to the frozen reference when kl_coef > 0). This is the released
update: it backpropagates each timestep's batch-mean loss with accelerate's accumulation over
`gradient_accumulation_steps * num_train_timesteps` (each backward divided by that count) and
DDP averages over GPUs, i.e. one optimizer step on the mean over samples and timesteps. The
log-probabilities under the current weights are recomputed with guidance (train.cfg = True
released) at the stored x_k, evaluated at the stored x_{k+1} (`rollout.transition_log_prob`).

The S x K terms are accumulated in a `lax.scan` over (micro-batch, timestep) units
(`grad_accum` micro-batches of S / grad_accum rows, rows i, i + grad_accum, ... as in
`train.step`), so memory holds one UNet forward/backward of S / grad_accum samples (x2 with
guidance); `scan_unroll` > 1 unrolls that loop (on XLA:CPU a gradient inside a loop runs about
14x slower than unrolled). `fold_timesteps` computes a micro-batch's K timestep units as one
batch of S / grad_accum * K transitions instead (the same sum; memory K times one unit's): one
UNet forward/backward in the program rather than K unrolled ones, which XLA:CPU compiles and
loads from its cache in seconds instead of about a minute. A step whose loss or gradients are
not finite leaves the state unchanged and counts in `state.skipped` (as the DPO trainer's step
does).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from scdpo_jax.grpo import losses, rollout
from scdpo_jax.sampling.samplers import SamplerPlan
from scdpo_jax.train.step import TrainState

BATCH_KEYS = ("latents", "log_probs", "advantages", "steps", "states")

# (trainable params, base/ref params, x, t, states) -> model output
PolicyApply = Callable[[Any, Any, jax.Array, jax.Array, jax.Array], jax.Array]
# (ref params, x, t, states) -> model output
RefApply = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  clip_range: float = 1e-4
  guidance_scale: float = 5.0  # used in the update when train.cfg (released: True, w = 5.0)
  kl_coef: float = 0.0
  grad_accum: int = 1
  scan_unroll: int = 1  # units per scan iteration (CPU: all of them; see the configs)
  fold_timesteps: bool = False  # a micro-batch's K timesteps as one batch (module docstring)


def _tree_norm(tree) -> jax.Array:
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def make_update_step(*, policy_apply: PolicyApply, ref_apply: RefApply | None, optimizer,
                     plan: SamplerPlan, cfg: UpdateConfig):
  """`update(state, ref_params, batch, uncond) -> (state, metrics)` (not jitted). `ref_params`:
  the frozen base (LoRA: the policy is base + adapters) or reference copy (KL penalty), passed to
  `policy_apply` as its second argument and to `ref_apply`; `batch` has `BATCH_KEYS`: latents
  (S, N + 1, H, W, C), log_probs (S, N), advantages (S,), steps (S, K) int32, states (S, T, D);
  `uncond` (1, T, D) the empty prompt's states."""
  if cfg.kl_coef > 0 and ref_apply is None:
    raise ValueError("kl_coef > 0 needs the reference model (ref_apply)")

  def update(state: TrainState, ref_params, batch, uncond):
    s, k = batch["steps"].shape
    accum = cfg.grad_accum
    micro = jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape((s // accum, accum) + x.shape[1:]), 1, 0), batch)
    apply = lambda p, x, t, c: policy_apply(p, ref_params, x, t, c)

    def unit_terms(params, mb, rows, idx):
      """The terms of transitions idx[i] of trajectories rows[i] of micro-batch `mb`."""
      x, x_next = mb["latents"][rows, idx], mb["latents"][rows, idx + 1]
      old = mb["log_probs"][rows, idx]
      log_p, mean, std = rollout.transition_log_prob(apply, params, plan, x, x_next, idx,
                                                     mb["states"][rows], uncond,
                                                     cfg.guidance_scale)
      loss, info = losses.ppo_clip_loss(log_p, old, mb["advantages"][rows], cfg.clip_range)
      sums = {"ppo_loss": jnp.sum(jax.lax.stop_gradient(loss)),
              "clipfrac": jnp.sum(info["clipped"]), "approx_kl": jnp.sum(info["approx_kl"]),
              "ratio_mean": jnp.sum(info["ratio"]),
              "ratio_dev_max": jnp.max(jnp.abs(info["ratio"] - 1.0))}
      if cfg.kl_coef > 0:
        ref_mean, _ = rollout.transition(ref_apply, ref_params, plan, x, idx, mb["states"],
                                         uncond, cfg.guidance_scale)
        kl = losses.gaussian_kl(mean, jax.lax.stop_gradient(ref_mean), std)
        loss = loss + cfg.kl_coef * kl
        sums["kl"] = jnp.sum(jax.lax.stop_gradient(kl))
      return jnp.sum(loss), sums

    grad_fn = jax.grad(unit_terms, has_aux=True)

    rows_mb = jnp.arange(s // accum, dtype=jnp.int32)

    def body(carry, unit):
      grads_acc, sums_acc = carry
      a, j = unit
      mb = jax.tree.map(lambda v: v[a], micro)
      if cfg.fold_timesteps:  # every timestep unit of the micro-batch at once
        rows, idx = jnp.tile(rows_mb, k), mb["steps"].T.reshape(-1)
      else:
        rows, idx = rows_mb, mb["steps"][:, j]
      grads, sums = grad_fn(state.params, mb, rows, idx)
      new_sums = {key: (jnp.maximum(sums_acc[key], v) if key == "ratio_dev_max"
                        else sums_acc[key] + v) for key, v in sums.items()}
      return (jax.tree.map(jnp.add, grads_acc, grads), new_sums), None

    keys = ["ppo_loss", "clipfrac", "approx_kl", "ratio_mean", "ratio_dev_max"]
    keys += ["kl"] if cfg.kl_coef > 0 else []
    init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
            {key: jnp.zeros((), jnp.float32) for key in keys})
    if cfg.fold_timesteps:  # one unit per micro-batch (j unused)
      units = (jnp.arange(accum, dtype=jnp.int32), jnp.zeros((accum,), jnp.int32))
    else:
      units = (jnp.repeat(jnp.arange(accum, dtype=jnp.int32), k),
               jnp.tile(jnp.arange(k, dtype=jnp.int32), accum))
    # 0 = every unit unrolled, no loop (a scan of length 1 with unroll 1 is still a while loop)
    unroll = 0 if cfg.scan_unroll >= len(units[0]) else max(1, cfg.scan_unroll)
    (grads, sums), _ = jax.lax.scan(body, init, units, unroll=unroll)

    count = jnp.asarray(s * k, jnp.float32)
    grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, state.params)
    metrics = {key: (v if key == "ratio_dev_max" else v / count) for key, v in sums.items()}
    loss = metrics["ppo_loss"] + (cfg.kl_coef * metrics["kl"] if cfg.kl_coef > 0 else 0.0)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    grad_norm = _tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    metrics.update({"loss": loss, "grad_norm": grad_norm, "param_norm": _tree_norm(state.params),
                    "update_norm": _tree_norm(updates), "finite": finite.astype(jnp.float32),
                    "skipped_total": skipped})
    new_state = state.replace(step=state.step + 1, params=keep(new_params, state.params),
                              opt_state=keep(new_opt_state, state.opt_state), skipped=skipped)
    return new_state, metrics

  return update


def make_logprob_fn(*, policy_apply: PolicyApply, plan: SamplerPlan, guidance_scale: float):
  """`logprobs(params, ref_params, latents (S, N + 1, ...), states, uncond) -> (S, N)`: every
  stored transition's log-probability under `params` (no gradient), for the fp32 recomputation
  of the old log-probabilities (train.recompute_old_logprobs) and the numerics measurement."""

  def logprobs(params, ref_params, latents, states, uncond):
    apply = lambda p, x, t, c: policy_apply(p, ref_params, x, t, c)
    b = latents.shape[0]

    def body(_, i):
      idx = jnp.full((b,), i, jnp.int32)
      lp, _, _ = rollout.transition_log_prob(apply, params, plan, latents[:, i],
                                             latents[:, i + 1], idx, states, uncond,
                                             guidance_scale)
      return None, lp

    _, lps = jax.lax.scan(body, None, jnp.arange(plan.num_steps, dtype=jnp.int32))
    return jnp.moveaxis(lps, 0, 1)

  return logprobs
