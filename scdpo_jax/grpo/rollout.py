"""Rollouts for SafeDiffusion-R1: a jitted DDIM sampler (eta = 1, classifier-free guidance) that
keeps every step's latent and log-probability, and the same transition math for the update.

Transition k of a run (sampler order, k = 0 .. num_steps - 1, timestep t_k descending):

    eps_hat = eps_u + w (eps_c - eps_u)           one UNet call on [x_k ; x_k] with [uncond ; cond]
    x0_hat  = (x_k - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)   (per prediction_type; clipped
                                                                 as the scheduler config says)
    mu_k    = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_k^2) eps_hat
    x_{k+1} = mu_k + sigma_k z,  z ~ N(0, I),
    sigma_k = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))

with the coefficients of `samplers.ddim_plan` (diffusers' DDIM grid and rules; read, not edited).
The released code (`ddim_with_logprob.py`, from ddpo-pytorch) clamps the previous timestep to
>= 0, so its last step uses abar_0 where diffusers would use `final_alpha_cumprod`; with
`ddpo_final_step=True` (default) we build the plan with `set_alpha_to_one=False`, which is the
same rule (SD1.5's scheduler config already says set_alpha_to_one=False, so both agree there).
log p_k = `losses.ddim_log_prob(x_{k+1}, mu_k, sigma_k)` (mean over C*H*W).

Randomness: every rollout b owns the key fold_in(key(seed_b), index_b) (`samplers.sample_keys`);
its step noise is `samplers.step_noise(key_b, k)`. The initial latent x_T of rollout b is
`samplers.initial_noise` of the key of rollout `init_index_b`: b itself (`noise_sharing="none"`),
the first rollout of its group ("group": the G images of a prompt start from one x_T), or the
first of the batch ("batch": one x_T for all rollouts of an epoch, as the released code draws
`global_input_latents`). With shared x_T the diversity within a group comes only from the eta = 1
noise. Nothing depends on which rollouts share a compiled batch.

Everything here is traceable; `transition` is the single place where (mu, log p) are computed,
used by the rollout and by the update (`job.make_update_step`), so recomputing a stored
transition with the rollout's parameters and dtype gives ratio 1 up to float reassociation.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from scdpo_jax.grpo import losses
from scdpo_jax.models.schedule import NoiseSchedule
from scdpo_jax.sampling import samplers

NOISE_SHARING = ("none", "group", "batch")

# (params, x (B, H, W, C), t (B,) int32, states (B, T, D)) -> model output (B, H, W, C)
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def logprob_plan(schedule: NoiseSchedule, num_steps: int, *, eta: float = 1.0,
                 ddpo_final_step: bool = True, **overrides) -> samplers.SamplerPlan:
  """The DDIM plan of the rollouts (module docstring). `overrides` go to `samplers.ddim_plan`
  (timestep_spacing, steps_offset, clip_sample, ...)."""
  if eta <= 0:
    raise ValueError(f"sample.eta must be > 0 for a stochastic policy with log-probabilities, got "
                     f"{eta} (the released recipe uses 1.0)")
  if ddpo_final_step:
    overrides["set_alpha_to_one"] = False
  return samplers.ddim_plan(schedule, num_steps, eta=eta, **overrides)


def check_plan(plan: samplers.SamplerPlan, trained_steps: int) -> None:
  """Every trained transition (the first `trained_steps`) must have sigma > 0."""
  std = np.asarray(jax.device_get(plan.c_noise))[:trained_steps]
  if np.any(std <= 0):
    bad = np.flatnonzero(std <= 0).tolist()
    raise ValueError(f"DDIM steps {bad} have sigma = 0 (timesteps "
                     f"{np.asarray(plan.timesteps)[bad].tolist()}): their log-probability is "
                     "undefined; raise steps_offset or train on fewer steps")


def _coeff(a: jax.Array, idx: jax.Array, ndim: int) -> jax.Array:
  return a[idx].reshape((-1,) + (1,) * (ndim - 1))


def guided_output(apply_fn: ApplyFn, params: Any, x: jax.Array, t: jax.Array,
                  cond: jax.Array, uncond: jax.Array, guidance_scale: float) -> jax.Array:
  """Classifier-free guidance u + w (c - u) in float32 from one UNet call on [x ; x]
  (`guidance_scale` <= 1: the conditional output alone, one call on x)."""
  if guidance_scale <= 1.0:
    return apply_fn(params, x, t, cond).astype(jnp.float32)
  b = x.shape[0]
  out = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                 jnp.concatenate([jnp.broadcast_to(uncond, cond.shape).astype(cond.dtype), cond]))
  out = out.astype(jnp.float32)
  u, c = out[:b], out[b:]
  return u + guidance_scale * (c - u)


def transition(apply_fn: ApplyFn, params: Any, plan: samplers.SamplerPlan, x: jax.Array,
               idx: jax.Array, cond: jax.Array, uncond: jax.Array, guidance_scale: float
               ) -> tuple[jax.Array, jax.Array]:
  """(mu (B, H, W, C) float32, sigma (B, 1, 1, 1)) of transition `idx` (B,) int32 (per-sample
  step indices into the plan) from x (B, H, W, C)."""
  x = x.astype(jnp.float32)
  t = plan.timesteps[idx]
  output = guided_output(apply_fn, params, x, t, cond, uncond, guidance_scale)
  alpha, sigma = _coeff(plan.alpha, idx, x.ndim), _coeff(plan.sigma, idx, x.ndim)
  x0, eps = samplers.model_output_to_x0_eps(plan.prediction_type, output, x, alpha, sigma)
  if plan.clip_sample_range is not None:
    x0 = jnp.clip(x0, -plan.clip_sample_range, plan.clip_sample_range)
  mean = _coeff(plan.c_x0, idx, x.ndim) * x0 + _coeff(plan.c_eps, idx, x.ndim) * eps
  return mean, _coeff(plan.c_noise, idx, x.ndim)


def transition_log_prob(apply_fn: ApplyFn, params: Any, plan: samplers.SamplerPlan,
                        x: jax.Array, x_next: jax.Array, idx: jax.Array, cond: jax.Array,
                        uncond: jax.Array, guidance_scale: float
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(log p (B,), mu, sigma) of the stored transition x -> x_next at step indices `idx`."""
  mean, std = transition(apply_fn, params, plan, x, idx, cond, uncond, guidance_scale)
  return losses.ddim_log_prob(x_next, mean, std), mean, std


def init_indices(indices: np.ndarray, group_size: int, sharing: str) -> np.ndarray:
  """Which rollout's key draws the x_T of each rollout (module docstring)."""
  indices = np.asarray(indices, np.int64)
  if sharing == "none":
    return indices
  if sharing == "group":
    return indices // group_size * group_size
  if sharing == "batch":
    return np.zeros_like(indices)
  raise ValueError(f"sample.noise_sharing={sharing!r}; supported: {NOISE_SHARING}")


def rollout(apply_fn: ApplyFn, params: Any, plan: samplers.SamplerPlan, cond: jax.Array,
            uncond: jax.Array, seeds: jax.Array, indices: jax.Array, init_idx: jax.Array,
            latent_shape: tuple[int, int, int], guidance_scale: float, *,
            batch_sharding: jax.sharding.Sharding | None = None) -> dict[str, jax.Array]:
  """Sample B trajectories; returns `latents` (B, num_steps + 1, H, W, C) float32 (x_T first,
  x_0 last), `log_probs` (B, num_steps) float32 (log p of each stored transition). `cond` (B, T, D)
  prompt states, `uncond` (1 or B, T, D) empty-prompt states; `seeds`, `indices`, `init_idx` (B,)
  ints (module docstring). Call inside `jax.jit`; `batch_sharding` pins the carry's layout."""
  keys = samplers.sample_keys(seeds, indices)
  x_start = samplers.initial_noise(samplers.sample_keys(seeds, init_idx), tuple(latent_shape))
  b = x_start.shape[0]

  def constrain(x):
    return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

  def body(x, k):
    idx = jnp.full((b,), k, jnp.int32)
    mean, std = transition(apply_fn, params, plan, x, idx, cond, uncond, guidance_scale)
    x_next = constrain(mean + std * samplers.step_noise(keys, k, tuple(latent_shape)))
    return x_next, (x_next, losses.ddim_log_prob(x_next, mean, std))

  x_start = constrain(x_start)
  _, (xs, log_probs) = jax.lax.scan(body, x_start, jnp.arange(plan.num_steps, dtype=jnp.int32))
  latents = jnp.concatenate([x_start[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
  return {"latents": latents, "log_probs": jnp.moveaxis(log_probs, 0, 1)}
