"""SafeDiffusion-R1's update as pure per-sample functions (optax style: arrays in, arrays out).

Notation: a rollout is a DDIM trajectory x_T -> ... -> x_0 of `num_steps` transitions; transition
k maps x_k to x_{k+1} (sampler order) with the Gaussian policy

    pi_theta(x_{k+1} | x_k) = N(mu_theta(x_k, t_k), sigma_k^2 I)              (DDIM, eta = 1)

where mu is the DDIM mean of `rollout.transition_mean` and sigma_k the DDIM std.

* `ddim_log_prob`: log pi averaged (not summed) over the C*H*W latent entries, the DDPO
  convention kept by the released code (`ddim_with_logprob.py`):

      log p = mean_{chw} [ -(x_{k+1} - mu)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi) ]

* `group_advantages`: G consecutive rollouts of one prompt form a group;

      A_i = clip((r_i - mean_g r) / (std_g r + 1e-8), -2.5, 2.5),   std_g unbiased (n - 1),

  the same scalar A for every transition of trajectory i (released `train.py`: groups of
  `num_generations` contiguous samples, `torch.std`, `adv_clip_max = 2.5`).

* `ppo_clip_loss`: per transition, rho = exp(log p_theta - log p_old) and

      L = max(-A rho, -A clip(rho, 1 - eps, 1 + eps)),     eps = clip_range (1e-4 released).

  Its gradient with respect to log p_theta is -A rho where the unclipped branch is the max (ties
  included) and 0 where the clipped one is strictly larger: outside [1 - eps, 1 + eps] on the
  side the advantage favours, a transition contributes nothing.

* `gaussian_kl`: the optional penalty to the frozen reference (off by default, as in the released
  code; the project page claims "KL regularization"): KL(pi_theta || pi_ref) of two Gaussians
  with the same sigma, averaged over C*H*W like the log-probability:

      KL = mean_{chw} (mu_theta - mu_ref)^2 / (2 sigma^2).

* Logged, not optimised (released): approx_kl = 0.5 (log p_theta - log p_old)^2 and
  clipfrac = [|rho - 1| > eps].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _mean_over_sample(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def ddim_log_prob(x_next: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """(B,) Gaussian log-density of x_next (B, ...) under N(mean, std^2), averaged over the
  non-batch entries. `std` broadcasts against x_next (a scalar or (B, 1, ..., 1)); it must be > 0.
  Computed in float32."""
  x_next, mean = x_next.astype(jnp.float32), mean.astype(jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  log_p = -((x_next - mean) ** 2) / (2.0 * std ** 2) - jnp.log(std) - LOG_SQRT_2PI
  return _mean_over_sample(jnp.broadcast_to(log_p, x_next.shape))


def gaussian_kl(mean: jax.Array, ref_mean: jax.Array, std: jax.Array) -> jax.Array:
  """(B,) KL(N(mean, std^2) || N(ref_mean, std^2)) averaged over the non-batch entries."""
  d = mean.astype(jnp.float32) - ref_mean.astype(jnp.float32)
  kl = d ** 2 / (2.0 * jnp.asarray(std, jnp.float32) ** 2)
  return _mean_over_sample(jnp.broadcast_to(kl, d.shape))


def group_advantages(rewards: jax.Array, group_size: int, *, eps: float = 1e-8,
                     clip: float = 2.5) -> jax.Array:
  """(N,) advantages of N = n_groups * group_size rewards ordered group by group (see module
  docstring); `clip` <= 0 disables the clamp."""
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1 or rewards.shape[0] % group_size:
    raise ValueError(f"rewards must be (N,) with N a multiple of group_size={group_size}, got "
                     f"shape {rewards.shape}")
  if group_size < 2:
    raise ValueError(f"group_size must be >= 2 (the unbiased group std needs two samples), got "
                     f"{group_size}")
  g = rewards.reshape(-1, group_size)
  mean = jnp.mean(g, axis=1, keepdims=True)
  std = jnp.std(g, axis=1, keepdims=True, ddof=1)
  adv = ((g - mean) / (std + eps)).reshape(-1)
  return jnp.clip(adv, -clip, clip) if clip > 0 else adv


def ppo_clip_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
                  clip_range: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-transition PPO-clip loss (B,) and per-transition diagnostics (module docstring):
  `ratio`, `clipped` (|rho - 1| > eps as float), `approx_kl` (0.5 (delta log p)^2)."""
  delta = log_prob.astype(jnp.float32) - jax.lax.stop_gradient(old_log_prob).astype(jnp.float32)
  ratio = jnp.exp(delta)
  adv = jax.lax.stop_gradient(advantages).astype(jnp.float32)
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  loss = jnp.maximum(unclipped, clipped)
  info = {"ratio": jax.lax.stop_gradient(ratio),
          "clipped": (jnp.abs(jax.lax.stop_gradient(ratio) - 1.0) > clip_range).astype(
              jnp.float32),
          "approx_kl": 0.5 * jax.lax.stop_gradient(delta) ** 2}
  return loss, info
