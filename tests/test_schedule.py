"""Noise schedule functions against diffusers' DDPMScheduler on the same inputs."""

import numpy as np
import pytest
import diffusers
import torch
import jax.numpy as jnp

from scdpo_jax.models import schedule as sch


SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
            beta_schedule="scaled_linear", prediction_type="epsilon")


@pytest.mark.parametrize("config", [
    SD15,
    {**SD15, "prediction_type": "v_prediction"},
    dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon"),
    dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
    {**SD15, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
])
def test_matches_ddpm_scheduler(config):
  ref = diffusers.DDPMScheduler(**config)
  ours = sch.schedule_from_config(dict(ref.config))
  np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(),
                             rtol=2e-5, atol=1e-7)
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
  noise = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
  t = np.array([0, 500, 999], np.int64)
  tt = torch.from_numpy(t)
  noisy_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
  np.testing.assert_allclose(np.asarray(sch.add_noise(ours, x0, noise, t)), noisy_ref, atol=1e-5)
  v_ref = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
  np.testing.assert_allclose(np.asarray(sch.velocity(ours, x0, noise, t)), v_ref, atol=1e-5)
  target = sch.training_target(ours, x0, noise, t)
  expected = {"epsilon": noise, "v_prediction": v_ref, "sample": x0}[config["prediction_type"]]
  np.testing.assert_allclose(np.asarray(target), expected, atol=1e-5)


@pytest.mark.parametrize("prediction_type", sch.PREDICTION_TYPES)
def test_inverting_the_parametrisation(prediction_type):
  s = sch.schedule_from_config({**SD15, "prediction_type": prediction_type})
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((2, 3)).astype(np.float32)
  noise = rng.standard_normal((2, 3)).astype(np.float32)
  t = np.array([10, 900])
  x_t = sch.add_noise(s, x0, noise, t)
  out = sch.training_target(s, x0, noise, t)
  x0_hat, eps_hat = sch.predict_x0_and_eps(s, out, x_t, t)
  np.testing.assert_allclose(np.asarray(x0_hat), x0, atol=2e-3)
  np.testing.assert_allclose(np.asarray(eps_hat), noise, atol=2e-3)


def test_bad_config_values_are_named():
  with pytest.raises(ValueError, match="beta_schedule='sigmoid'"):
    sch.schedule_from_config({"beta_schedule": "sigmoid"})
  with pytest.raises(ValueError, match="prediction_type='flow'"):
    sch.schedule_from_config({"prediction_type": "flow"})


def test_load_schedule_missing_file(tmp_path):
  from scdpo_jax.models.io import CheckpointNotFoundError
  (tmp_path / "scheduler").mkdir()
  with pytest.raises(CheckpointNotFoundError, match="scheduler_config.json"):
    sch.load_schedule(tmp_path / "scheduler")
