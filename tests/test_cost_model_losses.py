"""Cost-model losses and metrics against NumPy references; gradients; input checks."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scdpo_jax.cost_model import losses, metrics


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def costs():
  rng = np.random.default_rng(0)
  return (rng.normal(0.5, 2.0, 16).astype(np.float32), rng.normal(-0.5, 2.0, 16).astype(np.float32),
          rng.normal(0.0, 1.0, 7).astype(np.float32))


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_contrastive_matches_numpy(costs, tau):
  c_h, c_s, _ = costs
  want = -np.mean(np_log_sigmoid((c_h.astype(np.float64) - c_s) / tau))
  got = jax.jit(losses.contrastive_loss, static_argnums=2)(c_h, c_s, tau)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Bradley-Terry is shift invariant: the ranking term alone cannot fix the cost scale.
  np.testing.assert_allclose(losses.contrastive_loss(c_h + 5.0, c_s + 5.0, tau), got, rtol=1e-5)


def test_anchor_losses_match_numpy(costs):
  c_h, _, c_s_unpaired = costs  # anchoring does not need matched lengths
  sign = -np.mean(np_log_sigmoid(c_h.astype(np.float64))) - np.mean(np_log_sigmoid(-c_s_unpaired))
  np.testing.assert_allclose(jax.jit(losses.sign_anchor_loss)(c_h, c_s_unpaired), sign, rtol=1e-5)
  sq = np.mean((c_h.astype(np.float64) - 2.0) ** 2) + np.mean((c_s_unpaired + 1.0) ** 2)
  np.testing.assert_allclose(losses.squared_anchor_loss(c_h, c_s_unpaired, 2.0, -1.0), sq,
                             rtol=1e-5)
  # extreme costs stay finite (stable log-sigmoid)
  big = np.array([80.0, -80.0], np.float32)
  assert np.isfinite(float(losses.sign_anchor_loss(-big, big)))


@pytest.mark.parametrize("anchor,mu", [("sign", 1.0), ("squared", 0.5)])
def test_total_loss(costs, anchor, mu):
  c_h, c_s, _ = costs
  loss, aux = losses.cost_model_loss(c_h, c_s, tau=0.5, mu=mu, anchor=anchor,
                                     anchor_harmful=1.0, anchor_safe=0.0)
  anc = (losses.sign_anchor_loss(c_h, c_s) if anchor == "sign"
         else losses.squared_anchor_loss(c_h, c_s, 1.0, 0.0))
  np.testing.assert_allclose(loss, losses.contrastive_loss(c_h, c_s, 0.5) + mu * anc, rtol=1e-6)
  np.testing.assert_allclose(aux["pair_accuracy"], np.mean(c_h > c_s))


def test_gradients_match_analytic(costs):
  c_h, c_s, c_u = costs
  tau, n = 0.7, len(c_h)
  z = (c_h.astype(np.float64) - c_s) / tau
  g_h, g_s = jax.grad(losses.contrastive_loss, argnums=(0, 1))(c_h, c_s, tau)
  np.testing.assert_allclose(g_h, -np_sigmoid(-z) / (tau * n), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(g_s, np_sigmoid(-z) / (tau * n), rtol=1e-4, atol=1e-7)
  g_h, g_s = jax.grad(losses.sign_anchor_loss, argnums=(0, 1))(c_h, c_u)
  np.testing.assert_allclose(g_h, -np_sigmoid(-c_h.astype(np.float64)) / n, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(g_s, np_sigmoid(c_u.astype(np.float64)) / len(c_u), rtol=1e-4,
                             atol=1e-7)
  g_h, g_s = jax.grad(losses.squared_anchor_loss, argnums=(0, 1))(c_h, c_u, 1.0, 0.0)
  np.testing.assert_allclose(g_h, 2 * (c_h - 1.0) / n, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_s, 2 * c_u / len(c_u), rtol=1e-5, atol=1e-7)
  # the total loss, by central finite differences in float64
  with jax.enable_x64():
    h64, s64 = jnp.asarray(c_h, jnp.float64), jnp.asarray(c_s, jnp.float64)
    f = lambda a, b: losses.cost_model_loss(a, b, tau=tau, mu=0.3)[0]  # noqa: E731
    g = jax.grad(f)(h64, s64)
    eps = 1e-6
    for i in (0, 5):
      e = jnp.zeros_like(h64).at[i].set(eps)
      fd = (f(h64 + e, s64) - f(h64 - e, s64)) / (2 * eps)
      np.testing.assert_allclose(g[i], fd, rtol=1e-6, atol=1e-9)


def test_bad_inputs_raise():
  c = jnp.zeros((4,))
  with pytest.raises(TypeError, match="floating"):
    losses.contrastive_loss(jnp.zeros((4,), jnp.int32), c)
  with pytest.raises(TypeError, match="floating"):
    losses.sign_anchor_loss(c, jnp.zeros((4,), bool))
  with pytest.raises(ValueError, match="1-D"):
    losses.sign_anchor_loss(jnp.zeros((4, 1)), c)
  with pytest.raises(ValueError, match="differ"):
    losses.contrastive_loss(c, jnp.zeros((3,)))
  with pytest.raises(ValueError, match="empty"):
    losses.squared_anchor_loss(jnp.zeros((0,)), c)
  with pytest.raises(ValueError, match="tau"):
    losses.contrastive_loss(c, c, 0.0)
  with pytest.raises(ValueError, match="must exceed"):
    losses.squared_anchor_loss(c, c, 0.0, 1.0)
  with pytest.raises(ValueError, match="anchor"):
    losses.cost_model_loss(c, c, anchor="hinge")
  with pytest.raises(ValueError, match="anchor"):
    losses.anchor_threshold("hinge")


def test_thresholds_and_probabilities():
  assert losses.anchor_threshold("sign") == 0.0
  assert losses.anchor_threshold("squared", 3.0, 1.0) == 2.0
  c = np.array([-2.0, 0.0, 1.5, 4.0], np.float32)
  np.testing.assert_allclose(losses.harm_probability(c, "sign"), np_sigmoid(c), rtol=1e-6)
  np.testing.assert_allclose(losses.harm_probability(c, "squared", 3.0, 1.0), [0, 0, 0.25, 1])


def test_auroc_matches_pairwise_definition():
  rng = np.random.default_rng(1)
  scores = np.round(rng.normal(size=40), 1)  # rounding creates ties
  labels = (rng.random(40) < 0.4).astype(int)
  pos, neg = scores[labels == 1], scores[labels == 0]
  want = np.mean([1.0 if p > n else 0.5 if p == n else 0.0
                  for p, n in itertools.product(pos, neg)])
  assert metrics.auroc(scores, labels) == pytest.approx(want, abs=1e-12)
  assert metrics.auroc(np.array([0.1, 0.2, 0.9]), np.array([0, 0, 1])) == 1.0
  assert metrics.auroc(np.array([0.9, 0.2, 0.1]), np.array([0, 0, 1])) == 0.0
  assert np.isnan(metrics.auroc(np.array([0.1, 0.2]), np.array([1, 1])))
  with pytest.raises(ValueError, match="labels"):
    metrics.auroc(np.array([0.1, 0.2]), np.array([0, 2]))


def test_accuracy_and_ece():
  costs = np.array([-1.0, 0.5, 2.0, -0.2])
  labels = np.array([0, 0, 1, 1])
  assert metrics.accuracy_at_threshold(costs, labels, 0.0) == 0.5
  # two bins used: [0.1, 0.15] -> bin 1 with labels (0, 1); 0.95 -> bin 9 with label 1
  probs = np.array([0.1, 0.15, 0.95])
  want = (2 / 3) * abs(0.5 - 0.125) + (1 / 3) * abs(1 - 0.95)
  assert metrics.expected_calibration_error(probs, np.array([0, 1, 1])) == pytest.approx(want)
  assert metrics.expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0])) == 0.0
  with pytest.raises(ValueError, match="probabilities"):
    metrics.expected_calibration_error(np.array([1.5]), np.array([1]))
