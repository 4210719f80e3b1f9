"""The diffusion noise schedule of a checkpoint's `scheduler/scheduler_config.json`, as pure functions.

Conventions: `t` are integer training timesteps in [0, num_train_timesteps); `alphas_cumprod[t]`
is abar_t; `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps` (`add_noise`). The network predicts
`eps` ("epsilon"), `v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0` ("v_prediction", SD 2.x 768px)
or `x_0` ("sample"); `training_target` returns the one the checkpoint was trained on. All
functions broadcast a (B,) timestep over (B, ...) data, any layout.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@struct.dataclass
class NoiseSchedule:
  """abar_t and friends as device arrays; the rest of the scheduler config as static fields."""

  alphas_cumprod: jax.Array
  prediction_type: str = struct.field(pytree_node=False, default="epsilon")
  num_train_timesteps: int = struct.field(pytree_node=False, default=1000)
  config: tuple = struct.field(pytree_node=False, default=())  # (key, value) pairs, for samplers

  @property
  def options(self) -> dict[str, Any]:
    return dict(self.config)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
  f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)])


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, 'Common Diffusion Noise Schedules and Sample Steps are Flawed', Alg. 1."""
  sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
  first, last = sqrt_abar[0], sqrt_abar[-1]
  sqrt_abar = (sqrt_abar - last) * first / (first - last)
  abar = sqrt_abar ** 2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return 1.0 - alphas


def schedule_from_config(config: dict[str, Any]) -> NoiseSchedule:
  """Build a schedule from a diffusers scheduler config dict (DDPM/DDIM/PNDM/... share the keys)."""
  n = int(config.get("num_train_timesteps", 1000))
  kind = config.get("beta_schedule", "linear")
  start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
  if config.get("trained_betas") is not None:
    betas = np.asarray(config["trained_betas"], np.float64)
  elif kind == "linear":
    betas = np.linspace(start, end, n, dtype=np.float64)
  elif kind == "scaled_linear":
    betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
  elif kind == "squaredcos_cap_v2":
    betas = _cosine_betas(n)
  else:
    raise ValueError(f"scheduler config beta_schedule={kind!r} is not supported "
                     f"(supported: {BETA_SCHEDULES})")
  if config.get("rescale_betas_zero_snr", False):
    betas = _rescale_zero_terminal_snr(betas)
  prediction_type = config.get("prediction_type", "epsilon")
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"scheduler config prediction_type={prediction_type!r} is not supported "
                     f"(supported: {PREDICTION_TYPES})")
  abar = np.cumprod(1.0 - betas)
  static = tuple(sorted((k, v) for k, v in config.items()
                        if not isinstance(v, (list, dict)) and not k.startswith("_")))
  return NoiseSchedule(alphas_cumprod=jnp.asarray(abar, jnp.float32),
                       prediction_type=prediction_type, num_train_timesteps=n, config=static)


def load_schedule(folder) -> NoiseSchedule:
  """Read `<folder>/scheduler_config.json` (a diffusers `scheduler/` folder)."""
  from scdpo_jax.models import io

  folder = io.require_dir(folder, "scheduler")
  return schedule_from_config(io.read_json(folder / "scheduler_config.json", "scheduler config"))


def _coeffs(schedule: NoiseSchedule, t: jax.Array, ndim: int):
  abar = schedule.alphas_cumprod[t]
  shape = abar.shape + (1,) * (ndim - abar.ndim)
  return jnp.sqrt(abar).reshape(shape), jnp.sqrt(1.0 - abar).reshape(shape)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
  a, s = _coeffs(schedule, t, x0.ndim)
  return (a * x0 + s * noise).astype(x0.dtype)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)."""
  a, s = _coeffs(schedule, t, x0.ndim)
  return (a * noise - s * x0).astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array,
                    t: jax.Array) -> jax.Array:
  """What the network is trained to output at (x_t, t), per `prediction_type`."""
  if schedule.prediction_type == "epsilon":
    return noise
  if schedule.prediction_type == "v_prediction":
    return velocity(schedule, x0, noise, t)
  return x0


def predict_x0_and_eps(schedule: NoiseSchedule, model_output: jax.Array, x_t: jax.Array,
                       t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Invert the parametrisation: (x_0, eps) from the model output at (x_t, t)."""
  a, s = _coeffs(schedule, t, x_t.ndim)
  if schedule.prediction_type == "epsilon":
    eps = model_output
    x0 = (x_t - s * eps) / a
  elif schedule.prediction_type == "v_prediction":
    x0 = a * x_t - s * model_output
    eps = a * model_output + s * x_t
  else:
    x0 = model_output
    eps = (x_t - a * x0) / s
  return x0, eps


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
  abar = schedule.alphas_cumprod[t]
  return abar / (1.0 - abar)
