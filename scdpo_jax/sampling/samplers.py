"""DDIM and DPM-Solver++ (2M) as one jit-compiled `lax.scan` over a precomputed step plan.

Conventions
-----------
* Latents are channels-last (B, H, W, C) float32 throughout the solver; the model may compute
  in bf16, its output is cast to float32.
* VP notation: `alpha_t = sqrt(abar_t)`, `sigma_t = sqrt(1 - abar_t)`, `x_t = alpha_t x_0 +
  sigma_t eps`. The network output is converted to (x_0, eps) per `prediction_type`
  ("epsilon", "v_prediction" with `v = alpha_t eps - sigma_t x_0`, or "sample").
* Both solvers are written as the same per-step linear update

      x_next = c_sample * x_t + c_x0 * x0_hat + c_prev_x0 * x0_hat_prev + c_eps * eps_hat
               + c_noise * z,        z ~ N(0, I)

  whose coefficients depend only on the (static) timestep grid, so they are computed once on the
  host in float64 (`SamplerPlan`) and the scan body is a handful of fused multiply-adds around the
  model call. `x0_hat_prev` is the previous step's data prediction (DPM-Solver++'s multistep
  history; zero weight at the first step and for DDIM).

* **DDIM** (`ddim_plan`) reproduces diffusers' `DDIMScheduler.step`: the timestep grid of
  `set_timesteps` ("leading" + `steps_offset`, "trailing", "linspace"); the previous timestep is
  `t - num_train_timesteps // num_steps` (diffusers' rule for every spacing), below 0 it uses
  `final_alpha_cumprod` (1 if `set_alpha_to_one` else abar_0); `clip_sample` clamps x0_hat to
  `+-clip_sample_range` while eps_hat stays unclipped (diffusers' default
  `use_clipped_model_output=False`); `eta` scales the DDIM variance
  `sigma_t(eta)^2 = eta^2 (1 - abar_prev)/(1 - abar_t) (1 - abar_t/abar_prev)`.
* **DPM-Solver++ 2M** (`dpm_solver_plan`) reproduces diffusers' `DPMSolverMultistepScheduler`
  with `algorithm_type="dpmsolver++"`, `solver_order=2`, `solver_type` "midpoint" (default) or
  "heun", `lower_order_final`, `euler_at_final`, `final_sigmas_type` "zero" (default) or
  "sigma_min", `lambda_min_clipped`, and its own timestep grid (which differs from DDIM's:
  "linspace" is the default and "leading" divides by `num_steps + 1`). With
  `lambda_s = log(alpha_s / sigma_s)` and `h = lambda_next - lambda_cur`, the first-order step is
  `x_next = (sigma_next / sigma_cur) x + alpha_next (1 - e^-h) x0_hat` and the second-order
  (midpoint) step adds `0.5 alpha_next (1 - e^-h) D1` with `D1 = (h / h_prev)(x0_hat -
  x0_hat_prev)`. `e^-h` is computed as the ratio of the VE sigmas `sigma/alpha`, so the final
  step to sigma = 0 (`final_sigmas_type="zero"`, always first order) is exact: it returns x0_hat.
* Karras / exponential / beta sigma grids, thresholding, SDE variants and third-order solvers are
  not implemented; a scheduler config asking for them is rejected by name.

Randomness is per sample and independent of batch composition: sample `b` owns the key
`fold_in(key(seed_b), image_index_b)`; its initial latent is `normal(fold_in(k, 0))` and the
noise of scan step `i` (DDIM with eta > 0) is `normal(fold_in(k, i + 1))`. So an image depends on
(seed, image index, prompt, settings) only, never on which other images share its batch, the
batch size or the device count - which is what makes the prompt-set runner resumable.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from scdpo_jax.models.schedule import NoiseSchedule

SAMPLERS = ("ddim", "dpmsolver++")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# A denoiser maps (x_t (B,H,W,C) float32, t scalar int32) to (model output (B,H,W,C) float32,
# x_t to use for the solver update). Guards such as TraSCE's loss guidance move x_t before the
# update; plain guidance returns x_t unchanged.
Denoiser = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class StatefulDenoiser:
  """A denoiser that sees the scan step index and carries a guard state across steps.

  `init(x_T) -> state` (a pytree, e.g. SLD's momentum); `step(x_t, t, i, state) -> (model
  output, x_t for the update, new state)` with `i` the 0-based step index (int32 scalar). Used by
  guards whose rule depends on the step (SLD's warm-up and momentum, SAFREE's filtered-step
  window); `run_sampler` accepts it wherever it accepts a `Denoiser`.
  """

  init: Callable[[jax.Array], Any]
  step: Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, jax.Array, Any]]


@struct.dataclass
class SamplerPlan:
  """Per-step constants of a sampler run, each of shape (num_steps,), in the order of use.

  `timesteps` (int32) are the model's timesteps; `alpha`, `sigma` convert the model output to
  (x0_hat, eps_hat) at that step; the `c_*` arrays are the update coefficients of the module
  docstring. Static fields: the sampler name, the prediction type, the x0 clip range (None: no
  clipping) and whether any step draws noise.
  """

  timesteps: jax.Array
  alpha: jax.Array
  sigma: jax.Array
  c_sample: jax.Array
  c_x0: jax.Array
  c_prev_x0: jax.Array
  c_eps: jax.Array
  c_noise: jax.Array
  sampler: str = struct.field(pytree_node=False, default="ddim")
  prediction_type: str = struct.field(pytree_node=False, default="epsilon")
  clip_sample_range: float | None = struct.field(pytree_node=False, default=None)
  stochastic: bool = struct.field(pytree_node=False, default=False)

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])


def _option(options: Mapping[str, Any], overrides: Mapping[str, Any], key: str, default: Any):
  """An explicit override, else the scheduler config's value, else the scheduler class default."""
  if overrides.get(key) is not None:
    return overrides[key]
  value = options.get(key)
  return default if value is None else value


def _check_steps(num_steps: int, num_train_timesteps: int) -> None:
  if not 1 <= num_steps <= num_train_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")


def _check_spacing(spacing: str) -> None:
  if spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; use one of "
                     f"{TIMESTEP_SPACINGS}")


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading",
                   steps_offset: int = 0) -> np.ndarray:
  """`DDIMScheduler.set_timesteps`: the model timesteps, descending, int64."""
  _check_steps(num_steps, num_train_timesteps)
  _check_spacing(spacing)
  n = num_train_timesteps
  if spacing == "linspace":
    return np.linspace(0, n - 1, num_steps).round()[::-1].copy().astype(np.int64)
  if spacing == "leading":
    ratio = n // num_steps
    return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
  ratio = n / num_steps
  return np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1


def dpm_solver_timesteps(num_steps: int, alphas_cumprod: np.ndarray, spacing: str = "linspace",
                         steps_offset: int = 0,
                         lambda_min_clipped: float = -math.inf) -> np.ndarray:
  """`DPMSolverMultistepScheduler.set_timesteps` (plain sigma grid): timesteps, descending."""
  n = len(alphas_cumprod)
  _check_steps(num_steps, n)
  _check_spacing(spacing)
  abar = np.asarray(alphas_cumprod, np.float64)
  lambdas = 0.5 * np.log(abar) - 0.5 * np.log1p(-abar)
  clipped = int(np.searchsorted(lambdas[::-1], lambda_min_clipped))
  last = n - clipped
  if spacing == "linspace":
    return np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
  if spacing == "leading":
    ratio = last // (num_steps + 1)
    return ((np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            + steps_offset)
  ratio = n / num_steps
  return np.arange(last, 0, -ratio).round().astype(np.int64) - 1


def _host_abar(schedule: NoiseSchedule) -> np.ndarray:
  return np.asarray(jax.device_get(schedule.alphas_cumprod), np.float64)


def _as_plan(sampler: str, prediction_type: str, timesteps: np.ndarray, alpha, sigma, c_sample,
             c_x0, c_prev_x0, c_eps, c_noise, clip_sample_range) -> SamplerPlan:
  f32 = lambda a: jnp.asarray(np.asarray(a, np.float64), jnp.float32)
  return SamplerPlan(
      timesteps=jnp.asarray(timesteps, jnp.int32), alpha=f32(alpha), sigma=f32(sigma),
      c_sample=f32(c_sample), c_x0=f32(c_x0), c_prev_x0=f32(c_prev_x0), c_eps=f32(c_eps),
      c_noise=f32(c_noise), sampler=sampler, prediction_type=prediction_type,
      clip_sample_range=clip_sample_range, stochastic=bool(np.any(np.asarray(c_noise) > 0)))


def ddim_plan(schedule: NoiseSchedule, num_steps: int, *, eta: float = 0.0,
              timestep_spacing: str | None = None, steps_offset: int | None = None,
              set_alpha_to_one: bool | None = None, clip_sample: bool | None = None,
              clip_sample_range: float | None = None) -> SamplerPlan:
  """DDIM steps for `schedule`; unset options come from the scheduler config (`schedule.options`)
  with `DDIMScheduler`'s defaults (leading spacing, steps_offset 0, set_alpha_to_one True,
  clip_sample True, range 1.0), exactly as `DDIMScheduler.from_config(config)` reads them."""
  opts = schedule.options
  over = dict(timestep_spacing=timestep_spacing, steps_offset=steps_offset,
              set_alpha_to_one=set_alpha_to_one, clip_sample=clip_sample,
              clip_sample_range=clip_sample_range)
  if _option(opts, over, "thresholding", False):
    raise ValueError("scheduler config thresholding=True (dynamic thresholding) is not supported "
                     "for latent diffusion sampling; set it to False")
  if eta < 0:
    raise ValueError(f"eta must be >= 0, got {eta}")
  n = schedule.num_train_timesteps
  timesteps = ddim_timesteps(num_steps, n, _option(opts, over, "timestep_spacing", "leading"),
                             int(_option(opts, over, "steps_offset", 0)))
  abar = _host_abar(schedule)
  if timesteps.max() >= n or timesteps.min() < 0:
    raise ValueError(f"timesteps {timesteps.min()}..{timesteps.max()} fall outside [0, {n}); "
                     "lower steps_offset")
  final = 1.0 if _option(opts, over, "set_alpha_to_one", True) else abar[0]
  prev = timesteps - n // num_steps
  abar_t = abar[timesteps]
  abar_prev = np.where(prev >= 0, abar[np.clip(prev, 0, n - 1)], final)
  variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
  std = eta * np.sqrt(variance)
  zeros = np.zeros(num_steps)
  clip = (float(_option(opts, over, "clip_sample_range", 1.0))
          if _option(opts, over, "clip_sample", True) else None)
  return _as_plan("ddim", schedule.prediction_type, timesteps, np.sqrt(abar_t),
                  np.sqrt(1 - abar_t), zeros, np.sqrt(abar_prev), zeros,
                  np.sqrt(np.maximum(1 - abar_prev - std ** 2, 0.0)), std, clip)


_UNSUPPORTED_DPM_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                            "use_lu_lambdas", "use_flow_sigmas", "thresholding")


def dpm_solver_plan(schedule: NoiseSchedule, num_steps: int, *,
                    timestep_spacing: str | None = None, steps_offset: int | None = None,
                    solver_type: str | None = None, lower_order_final: bool | None = None,
                    euler_at_final: bool | None = None, final_sigmas_type: str | None = None,
                    lambda_min_clipped: float | None = None) -> SamplerPlan:
  """DPM-Solver++ 2M steps for `schedule`, read like `DPMSolverMultistepScheduler.from_config`.

  Unset options come from the scheduler config, else the class defaults (linspace spacing,
  midpoint, lower_order_final True, euler_at_final False, final_sigmas_type "zero").
  """
  opts = schedule.options
  over = dict(timestep_spacing=timestep_spacing, steps_offset=steps_offset,
              solver_type=solver_type, lower_order_final=lower_order_final,
              euler_at_final=euler_at_final, final_sigmas_type=final_sigmas_type,
              lambda_min_clipped=lambda_min_clipped)
  for key in _UNSUPPORTED_DPM_OPTIONS:
    if opts.get(key):
      raise ValueError(f"scheduler config {key}=True is not supported by our DPM-Solver++; "
                       "set it to False (plain sigma grid)")
  algorithm = opts.get("algorithm_type", "dpmsolver++")
  if opts.get("_class_name") == "DPMSolverMultistepScheduler" and algorithm != "dpmsolver++":
    raise ValueError(f"scheduler config algorithm_type={algorithm!r} is not supported; only "
                     "'dpmsolver++' is implemented")
  if opts.get("_class_name") == "DPMSolverMultistepScheduler" and opts.get(
      "solver_order", 2) != 2:
    raise ValueError(f"scheduler config solver_order={opts['solver_order']} is not supported; "
                     "only 2 (DPM-Solver++ 2M) is implemented")
  kind = _option(opts, over, "solver_type", "midpoint")
  if kind not in ("midpoint", "heun"):
    raise ValueError(f"solver_type={kind!r} is not supported; use 'midpoint' or 'heun'")
  final_type = _option(opts, over, "final_sigmas_type", "zero")
  if final_type not in ("zero", "sigma_min"):
    raise ValueError(f"final_sigmas_type={final_type!r} is not supported; use 'zero' or "
                     "'sigma_min'")
  abar = _host_abar(schedule)
  if opts.get("rescale_betas_zero_snr"):
    abar = abar.copy()
    abar[-1] = 2.0 ** -24  # diffusers' DPM-Solver keeps the terminal SNR finite this way
  timesteps = dpm_solver_timesteps(
      num_steps, abar, _option(opts, over, "timestep_spacing", "linspace"),
      int(_option(opts, over, "steps_offset", 0)),
      float(_option(opts, over, "lambda_min_clipped", -math.inf)))
  n_train = len(abar)
  if timesteps.max() >= n_train or timesteps.min() < 0:
    raise ValueError(f"timesteps {timesteps.min()}..{timesteps.max()} fall outside "
                     f"[0, {n_train}); lower steps_offset")
  ve = np.sqrt((1 - abar) / abar)  # VE sigmas sigma/alpha
  ve_steps = np.interp(timesteps, np.arange(n_train), ve)
  last = ve[0] if final_type == "sigma_min" else 0.0
  ve_all = np.concatenate([ve_steps, [last]])
  alpha_all = 1.0 / np.sqrt(ve_all ** 2 + 1.0)
  sigma_all = ve_all * alpha_all
  n = len(timesteps)
  lower_final = bool(_option(opts, over, "lower_order_final", True))
  euler_final = bool(_option(opts, over, "euler_at_final", False))
  c_sample, c_x0, c_prev = np.zeros(n), np.zeros(n), np.zeros(n)
  for i in range(n):
    alpha_next, sigma_next = alpha_all[i + 1], sigma_all[i + 1]
    exp_neg_h = ve_all[i + 1] / ve_all[i]  # e^{-h}, h = lambda_next - lambda_i
    first = alpha_next * (1.0 - exp_neg_h)
    c_sample[i] = sigma_next / sigma_all[i]
    c_x0[i] = first
    # diffusers' order choice for solver_order=2: first order at the first step and at a
    # lowered final step; its "lower_order_second" rule only matters for third order.
    final_first_order = (i == n - 1) and (euler_final or (lower_final and n < 15)
                                          or final_type == "zero")
    if i >= 1 and not final_first_order:
      h = -math.log(exp_neg_h)
      h_prev = math.log(ve_all[i - 1] / ve_all[i])
      if kind == "midpoint":
        d1_weight = 0.5 * first
      else:  # heun
        d1_weight = alpha_next * ((exp_neg_h - 1.0) / h + 1.0)
      # D1 = (h / h_prev) (x0_hat - x0_hat_prev); x_next = ... + d1_weight * D1
      ratio = h / h_prev
      c_x0[i] += d1_weight * ratio
      c_prev[i] = -d1_weight * ratio
  zeros = np.zeros(n)
  return _as_plan("dpmsolver++", schedule.prediction_type, timesteps, alpha_all[:-1],
                  sigma_all[:-1], c_sample, c_x0, c_prev, zeros, zeros, None)


def make_plan(schedule: NoiseSchedule, sampler: str, num_steps: int, *, eta: float = 0.0,
              **overrides: Any) -> SamplerPlan:
  """`ddim_plan` or `dpm_solver_plan` by name ("ddim" | "dpmsolver++"); `eta` is DDIM-only."""
  if sampler == "ddim":
    return ddim_plan(schedule, num_steps, eta=eta, **overrides)
  if sampler == "dpmsolver++":
    if eta:
      raise ValueError(f"eta={eta} is a DDIM option; DPM-Solver++ 2M is deterministic")
    return dpm_solver_plan(schedule, num_steps, **overrides)
  raise ValueError(f"unknown sampler {sampler!r}; known: {SAMPLERS}")


# ----------------------------------------------------------------------------- randomness


def sample_keys(seeds: jax.Array, image_indices: jax.Array) -> jax.Array:
  """Per-sample PRNG keys `fold_in(key(seed), image_index)`; seeds (B,) uint32, indices (B,)."""
  seeds = jnp.asarray(seeds).astype(jnp.uint32)
  image_indices = jnp.asarray(image_indices).astype(jnp.uint32)
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, image_indices)


def _per_sample_normal(keys: jax.Array, salt: jax.Array | int, shape: tuple[int, ...]
                       ) -> jax.Array:
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), shape,
                                              jnp.float32))(keys)


def initial_noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """x_T for each sample: (B, *shape) float32, standard normal (init_noise_sigma is 1)."""
  return _per_sample_normal(keys, 0, shape)


def step_noise(keys: jax.Array, step: jax.Array | int, shape: tuple[int, ...]) -> jax.Array:
  """The DDIM noise z of scan step `step` (0-based) for each sample: (B, *shape) float32."""
  return _per_sample_normal(keys, jnp.asarray(step, jnp.uint32) + 1, shape)


# ----------------------------------------------------------------------------- the loop


def model_output_to_x0_eps(prediction_type: str, output: jax.Array, x_t: jax.Array,
                           alpha: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x0_hat, eps_hat) from the model output at x_t, with VP coefficients alpha, sigma."""
  if prediction_type == "epsilon":
    return (x_t - sigma * output) / alpha, output
  if prediction_type == "v_prediction":
    return alpha * x_t - sigma * output, alpha * output + sigma * x_t
  if prediction_type == "sample":
    return output, (x_t - alpha * output) / sigma
  raise ValueError(f"unknown prediction_type {prediction_type!r}")


def run_sampler(plan: SamplerPlan, denoise: Denoiser | StatefulDenoiser, x_start: jax.Array,
                keys: jax.Array | None = None, *,
                batch_sharding: jax.sharding.Sharding | None = None,
                unroll: int = 1) -> jax.Array:
  """Integrate from x_start (= x_T, (B, H, W, C)) to x_0 with `lax.scan`; returns (B, H, W, C).

  `denoise(x_t, t)` returns (model output, x_t for the update); it is typically a guided UNet from
  `scdpo_jax.sampling.guards`; a `StatefulDenoiser` also gets the step index and its state
  (carried in the scan, pinned to the batch sharding like x_t). `keys` (B,) per-sample keys
  are needed when the plan is stochastic (DDIM with eta > 0). `batch_sharding` (optional) pins
  the carry's layout to the batch sharding of the mesh on every step. `unroll` steps per scan
  iteration (the same arithmetic): on XLA:CPU a gradient inside a loop (TraSCE's loss guidance)
  runs many times slower than unrolled, so CPU runs of such guards unroll every step. Call
  inside `jax.jit`.
  """
  if plan.stochastic and keys is None:
    raise ValueError("this plan draws noise (eta > 0): pass the per-sample keys")
  x_start = jnp.asarray(x_start, jnp.float32)
  sample_shape = tuple(x_start.shape[1:])

  def constrain(x):
    return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

  stateful = isinstance(denoise, StatefulDenoiser)

  def constrain_state(state):
    return jax.tree.map(lambda a: constrain(a) if a.ndim == x_start.ndim else a, state)

  def body(carry, step):
    x, prev_x0, state = carry
    i, t, alpha, sigma, c_sample, c_x0, c_prev_x0, c_eps, c_noise = step
    if stateful:
      output, x, state = denoise.step(x, t, i, state)
      state = constrain_state(state)
    else:
      output, x = denoise(x, t)
    x0, eps = model_output_to_x0_eps(plan.prediction_type, output.astype(jnp.float32), x,
                                     alpha, sigma)
    if plan.clip_sample_range is not None:
      x0 = jnp.clip(x0, -plan.clip_sample_range, plan.clip_sample_range)
    x_next = c_sample * x + c_x0 * x0 + c_prev_x0 * prev_x0 + c_eps * eps
    if plan.stochastic:
      x_next = x_next + c_noise * step_noise(keys, i, sample_shape)
    return (constrain(x_next), constrain(x0), state), None

  steps = (jnp.arange(plan.num_steps, dtype=jnp.int32), plan.timesteps, plan.alpha, plan.sigma,
           plan.c_sample, plan.c_x0, plan.c_prev_x0, plan.c_eps, plan.c_noise)
  x_start = constrain(x_start)
  state = constrain_state(denoise.init(x_start)) if stateful else ()
  (x_final, _, _), _ = jax.lax.scan(body, (x_start, jnp.zeros_like(x_start), state), steps,
                                    unroll=max(1, min(int(unroll), plan.num_steps)))
  return x_final
