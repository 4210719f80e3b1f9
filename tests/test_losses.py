"""SC-DPO losses against NumPy references, their gradients, and their input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scdpo_jax.train import losses as L

RNG = np.random.default_rng(0)
B = 16


def _mse_terms():
  # Per-pixel MSEs of order 0.1 whose differences are of order 1e-3, as in real training.
  base = RNG.uniform(0.05, 0.2, size=B)
  return [(base + RNG.normal(0, 1e-3, size=B)).astype(np.float32) for _ in range(4)]


def np_logsigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_logit(mw, ml, rw, rl, beta):
  return -0.5 * beta * ((mw.astype(np.float64) - ml) - (rw.astype(np.float64) - rl))


def test_per_sample_mse():
  pred = RNG.normal(size=(4, 3, 5, 2)).astype(np.float32)
  tgt = RNG.normal(size=(4, 3, 5, 2)).astype(np.float32)
  np.testing.assert_allclose(L.per_sample_mse(pred, tgt),
                             ((pred - tgt) ** 2).mean(axis=(1, 2, 3)), rtol=1e-6)
  # bf16 inputs are computed in fp32.
  assert L.per_sample_mse(pred.astype(jnp.bfloat16), tgt).dtype == jnp.float32


def test_dpo_logit_and_loss_match_numpy():
  mw, ml, rw, rl = _mse_terms()
  z = L.dpo_logit(mw, ml, rw, rl, beta=5000.0)
  z_ref = np_logit(mw, ml, rw, rl, 5000.0)
  np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(L.diffusion_dpo_loss(z), -np_logsigmoid(z_ref).mean(), rtol=1e-5)
  np.testing.assert_allclose(L.implicit_accuracy(z), (z_ref > 0).mean())
  # The diffusers convention (beta' = beta / 2, reference minus policy) is the same logit.
  z_diffusers = 2500.0 * ((rw.astype(np.float64) - rl) - (mw.astype(np.float64) - ml))
  np.testing.assert_allclose(z, z_diffusers, rtol=1e-4, atol=1e-3)


def test_sft_loss():
  mw = _mse_terms()[0]
  np.testing.assert_allclose(L.sft_loss(mw), mw.mean(), rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focusing_matches_numpy(gamma):
  z = RNG.normal(0, 3, size=B).astype(np.float32)
  w_ref = (1 - np_sigmoid(z.astype(np.float64))) ** gamma
  np.testing.assert_allclose(L.focusing_weights(z, gamma), w_ref, rtol=1e-5)
  nll = -np_logsigmoid(z.astype(np.float64))
  np.testing.assert_allclose(L.focused_dpo_loss(z, gamma), (w_ref * nll).sum() / w_ref.sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(L.focused_dpo_loss(z, gamma, normalize=False),
                             (w_ref * nll).mean(), rtol=1e-5)


def test_gamma_zero_is_plain_dpo_exactly():
  z = jnp.asarray(RNG.normal(0, 40, size=B), jnp.float32)  # includes saturated pairs
  assert float(L.focused_dpo_loss(z, 0.0)) == float(L.diffusion_dpo_loss(z))
  np.testing.assert_array_equal(L.focusing_weights(z, 0.0), np.ones(B))


def test_focus_upweights_hard_pairs():
  w = L.focusing_weights(jnp.array([-3.0, 0.0, 3.0]), 2.0)
  assert w[0] > w[1] > w[2]


def test_cost_margin_and_variant_a():
  cw, cl = RNG.uniform(0, 1, B).astype(np.float32), RNG.uniform(0, 1, B).astype(np.float32)
  np.testing.assert_allclose(L.cost_margin(cw, cl, 3.0), 3.0 * (cl - cw), rtol=1e-6)
  rw, rl = RNG.normal(size=B).astype(np.float32), RNG.normal(size=B).astype(np.float32)
  np.testing.assert_allclose(L.combined_score(rw, cw, 2.0), rw - 2.0 * cw, rtol=1e-6)
  swap = L.relabel_by_combined_score(rw, rl, cw, cl, 2.0)
  np.testing.assert_array_equal(swap, (rl - 2.0 * cl) > (rw - 2.0 * cw))


def test_dual_ascent_and_cost_estimate():
  z = RNG.normal(size=B).astype(np.float32)
  cw, cl = RNG.uniform(0, 1, B).astype(np.float32), RNG.uniform(0, 1, B).astype(np.float32)
  p = np_sigmoid(z.astype(np.float64))
  est = (p * cw + (1 - p) * cl).mean()
  np.testing.assert_allclose(L.policy_cost_estimate(z, cw, cl), est, rtol=1e-5)
  assert float(L.dual_ascent_update(1.0, 0.5, budget=0.2, lr=2.0)) == pytest.approx(1.6)
  assert float(L.dual_ascent_update(0.1, 0.0, budget=0.2, lr=2.0)) == 0.0  # projected onto >= 0
  assert float(L.dual_ascent_update(9.9, 1.0, budget=0.0, lr=1.0, lam_max=10.0)) == 10.0


def test_scheduled_gamma():
  assert float(L.scheduled_gamma(0, 2.0, 0.0, 100)) == 0.0
  assert float(L.scheduled_gamma(50, 2.0, 0.0, 100)) == pytest.approx(1.0)
  assert float(L.scheduled_gamma(500, 2.0, 0.0, 100)) == 2.0
  assert float(L.scheduled_gamma(7, 2.0)) == 2.0


def _dpo_loss_of_policy(mw, ml, rw, rl, beta, gamma, margin):
  z = L.dpo_logit(mw, ml, rw, rl, beta) + margin
  return L.focused_dpo_loss(z, gamma)


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_gradients_match_numpy_analytic(gamma):
  """d/dm_w of the focused loss: the weights are constants (stop_gradient), so
  dL/dm_w,i = (w_i / sum w) * (1 - sigmoid(z_i)) * 0.5 * beta, and dL/dm_l,i is its negative."""
  mw, ml, rw, rl = (jnp.asarray(x, jnp.float32) for x in _mse_terms())
  margin = jnp.asarray(RNG.normal(size=B), jnp.float32)
  beta = 5000.0
  g_w, g_l, g_rw = jax.grad(_dpo_loss_of_policy, argnums=(0, 1, 2))(mw, ml, rw, rl, beta, gamma,
                                                                    margin)
  z = np_logit(np.asarray(mw), np.asarray(ml), np.asarray(rw), np.asarray(rl), beta) + margin
  w = (1 - np_sigmoid(z)) ** gamma
  expected = (w / w.sum()) * (1 - np_sigmoid(z)) * 0.5 * beta
  np.testing.assert_allclose(g_w, expected, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(g_l, -expected, rtol=2e-3, atol=1e-6)
  np.testing.assert_array_equal(g_rw, np.zeros(B))  # the reference gets no gradient


def test_gradient_matches_finite_differences():
  mw, ml, rw, rl = (jnp.asarray(x, jnp.float64) if jax.config.jax_enable_x64 else
                    jnp.asarray(x, jnp.float32) for x in _mse_terms())
  f = lambda m: _dpo_loss_of_policy(m, ml, rw, rl, 50.0, 0.0, 0.0)
  g = jax.grad(f)(mw)
  eps = 1e-2
  for i in range(3):
    e = jnp.zeros(B).at[i].set(eps)
    fd = (f(mw + e) - f(mw - e)) / (2 * eps)
    np.testing.assert_allclose(g[i], fd, rtol=2e-2)


def test_sft_gradient():
  mw = jnp.asarray(_mse_terms()[0])
  np.testing.assert_allclose(jax.grad(L.sft_loss)(mw), np.full(B, 1.0 / B), rtol=1e-6)


def test_jit_compatible():
  mw, ml, rw, rl = _mse_terms()
  f = jax.jit(lambda a, b, c, d: L.focused_dpo_loss(L.dpo_logit(a, b, c, d, 5000.0), 1.0))
  np.testing.assert_allclose(f(mw, ml, rw, rl),
                             L.focused_dpo_loss(L.dpo_logit(mw, ml, rw, rl, 5000.0), 1.0),
                             rtol=1e-6)


def test_bad_shapes_and_dtypes_raise():
  mw, ml, rw, rl = _mse_terms()
  with pytest.raises(ValueError, match="shapes must match"):
    L.dpo_logit(mw, ml[:-1], rw, rl, 5000.0)
  with pytest.raises(ValueError, match="1 dimensions"):
    L.dpo_logit(mw[:, None], ml[:, None], rw[:, None], rl[:, None], 5000.0)
  with pytest.raises(TypeError, match="floating-point"):
    L.dpo_logit(mw.astype(np.int32), ml, rw, rl, 5000.0)
  with pytest.raises(TypeError, match="floating-point"):
    L.focusing_weights(np.arange(3), 1.0)
  with pytest.raises(ValueError, match="shapes must match"):
    L.cost_margin(np.zeros(3, np.float32), np.zeros(4, np.float32), 1.0)
  with pytest.raises(ValueError, match="shapes must match"):
    L.per_sample_mse(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="shapes must match"):
    L.weighted_dpo_terms(np.zeros(3, np.float32), np.zeros(2, np.float32))
  with pytest.raises(TypeError, match="floating-point"):
    L.sft_loss(np.arange(4))
