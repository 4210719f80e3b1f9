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


@pytest.mark.parametrize("normalize", [True, False])
def test_focused_dpo_sft_loss_matches_numpy_and_its_gradient(normalize):
  """sum(w nll) / sum(w) + alpha mean(m_w), w from the hardness logit, outside the term; with
  gamma = 0 and w = 1 the winner's gradient is (0.5 beta sigmoid(-z) + alpha) / B; alpha = 0 is
  focused_dpo_loss exactly."""
  mw, ml, rw, rl = _mse_terms()
  beta, alpha, gamma = 2000.0, 300.0, 1.0
  z = L.dpo_logit(mw, ml, rw, rl, beta)
  z_ref = np_logit(mw, ml, rw, rl, beta)
  h = z_ref - RNG.uniform(0, 2, size=B)  # a hardness other than z (focus_on="preference" + margin)
  w = np_sigmoid(-h) ** gamma
  dpo = np.sum(w * -np_logsigmoid(z_ref)) / (w.sum() if normalize else B)
  np.testing.assert_allclose(
      L.focused_dpo_sft_loss(z, h.astype(np.float32), mw, gamma, alpha, normalize),
      dpo + alpha * mw.astype(np.float64).mean(), rtol=1e-5)
  np.testing.assert_allclose(L.focused_dpo_sft_loss(z, z, mw, gamma, 0.0, normalize),
                             L.focused_dpo_loss(z, gamma, normalize), rtol=1e-6)
  loss = lambda m: L.focused_dpo_sft_loss(L.dpo_logit(m, ml, rw, rl, beta),
                                          L.dpo_logit(m, ml, rw, rl, beta), m, 0.0, alpha,
                                          normalize)
  np.testing.assert_allclose(jax.grad(loss)(jnp.asarray(mw)),
                             (0.5 * beta * np_sigmoid(-z_ref) + alpha) / B, rtol=1e-4)


def test_sft_gradient():
  mw = jnp.asarray(_mse_terms()[0])
  np.testing.assert_allclose(jax.grad(L.sft_loss)(mw), np.full(B, 1.0 / B), rtol=1e-6)


# ------------------------------------------------------------------------------ Diffusion-SDPO

def np_sdpo_lambda(pw, tw, pl, tl, mu, eps=1e-9):
  """AIDC-AI/Diffusion-SDPO get_adaptive_lose_l_scale in NumPy (float64): output-space gradients
  gA = dA/dpred_w, gB = dB/dpred_l of A = mean((pred_w - t_w)^2), B = mean((pred_l - t_l)^2)."""
  rw, rl = pw.astype(np.float64) - tw, pl.astype(np.float64) - tl
  ga, gb = 2 * rw / rw.size, 2 * rl / rl.size
  num, den = np.sum(ga * ga), np.sum(gb * ga)
  lam = (1 - mu) * num / (den + eps) if den > 0 else 1.0
  return float(np.clip(lam, 0.0, 1.0))


def _sdpo_batch(corr=0.5, shape=(4, 3, 5, 2), seed=1):
  """Winner/loser predictions whose residuals against a shared noise are correlated by `corr`."""
  rng = np.random.default_rng(seed)
  noise = rng.normal(size=shape).astype(np.float32)
  rw = rng.normal(size=shape)
  rl = corr * rw + np.sqrt(1 - corr ** 2) * rng.normal(size=shape)
  return ((noise + rw).astype(np.float32), noise, (noise + rl).astype(np.float32), noise)


@pytest.mark.parametrize("mu", [0.0, 0.3, 0.6, 0.9, 1.0])
@pytest.mark.parametrize("corr", [0.95, 0.5, 0.1, -0.5])
def test_sdpo_lambda_matches_numpy(mu, corr):
  pw, tw, pl, tl = _sdpo_batch(corr)
  lam = float(L.sdpo_loser_scale(pw, tw, pl, tl, mu))
  ref = np_sdpo_lambda(pw, tw, pl, tl, mu)
  np.testing.assert_allclose(lam, ref, rtol=1e-5, atol=1e-7)
  rw, rl = pw.astype(np.float64) - tw, pl.astype(np.float64) - tl
  if np.sum(rl * rw) <= 0:
    assert lam == 1.0  # anti-aligned gradients: the loser is not scaled
  elif mu == 1.0:
    assert lam == 0.0  # the whole margin: no loser gradient when aligned


def test_sdpo_lambda_branches():
  """dot > 0 unclipped, clipped at 1 and at 0; dot = 0 exactly and dot < 0 give 1."""
  pw, tw, pl, tl = _sdpo_batch(0.95)  # nearly aligned: num / dot ~ 1 -> (1 - mu) unclipped
  lam = float(L.sdpo_loser_scale(pw, tw, pl, tl, 0.6))
  assert 0.0 < lam < 1.0
  np.testing.assert_allclose(lam, np_sdpo_lambda(pw, tw, pl, tl, 0.6), rtol=1e-5)
  # A loser residual much smaller than the winner's, same direction: (1 - mu) num / dot >> 1.
  tw = np.zeros((2, 8), np.float32)
  pw = np.ones((2, 8), np.float32)
  assert float(L.sdpo_loser_scale(pw, tw, 0.01 * pw, tw, 0.5)) == 1.0
  assert np_sdpo_lambda(pw, tw, 0.01 * pw, tw, 0.5) == 1.0
  # mu = 1 with aligned gradients: clipped to exactly 0 (the official clamp(min=0)).
  assert float(L.sdpo_loser_scale(pw, tw, 3.0 * pw, tw, 1.0)) == 0.0
  # Orthogonal residuals (disjoint supports): dot = 0 exactly -> 1 whatever mu.
  rw = np.zeros((2, 8), np.float32)
  rw[:, :4] = 1.0
  assert float(L.sdpo_loser_scale(rw, tw, 1.0 - rw, tw, 0.9)) == 1.0
  # Anti-aligned residuals: dot < 0 -> 1.
  assert float(L.sdpo_loser_scale(pw, tw, -pw, tw, 0.9)) == 1.0
  # A loser whose residual is 0 gives dot = 0 -> 1 (and its MSE gradient is 0 anyway).
  assert float(L.sdpo_loser_scale(pw, tw, tw, tw, 0.0)) == 1.0
  # The eps of the official code is added to the 2/N-scaled gradients' dot product: for tiny
  # residuals it dominates (plain sums would give num / dot = 10, clipped to 1).
  pw, pl = np.full((2, 8), 1e-5, np.float32), np.full((2, 8), 1e-6, np.float32)
  got = float(L.sdpo_loser_scale(pw, tw, pl, tw, 0.0))
  np.testing.assert_allclose(got, np_sdpo_lambda(pw, tw, pl, tw, 0.0), rtol=1e-4)
  assert 0.0 < got < 0.1


def test_sdpo_scaled_loser_mse_value_and_gradient():
  ml = jnp.asarray(_mse_terms()[1])
  for lam in (0.0, 0.25, 1.0):
    out = L.sdpo_scale_loser_grad(ml, lam)
    np.testing.assert_array_equal(out, ml)  # forward value exactly m_l
    g = jax.grad(lambda m: jnp.sum(jnp.arange(B) * L.sdpo_scale_loser_grad(m, lam)))(ml)
    np.testing.assert_allclose(g, lam * np.arange(B), rtol=1e-6)
  # lambda is a constant even when it is a traced function of the input
  g = jax.grad(lambda m: jnp.sum(L.sdpo_scale_loser_grad(m, jnp.mean(m))))(ml)
  np.testing.assert_allclose(g, np.full(B, float(jnp.mean(ml))), rtol=1e-6)


@pytest.mark.parametrize("mu", [0.6, 0.9])
def test_sdpo_gradient_is_lambda_times_the_loser_gradient(mu):
  """d/dpred_l of the DPO loss with m_l' is lambda times that of plain DPO; d/dpred_w and the
  loss value are unchanged (lambda is detached, though it is a function of both predictions)."""
  pw, tw, pl, tl = (jnp.asarray(x) for x in _sdpo_batch(0.9))
  rng = np.random.default_rng(3)
  ref_w, ref_l = (jnp.asarray(x + 0.1 * rng.normal(size=x.shape), jnp.float32) for x in (pw, pl))
  beta = 10.0

  def loss(pred_w, pred_l, sdpo):
    m_w, m_l = L.per_sample_mse(pred_w, tw), L.per_sample_mse(pred_l, tl)
    if sdpo:
      m_l = L.sdpo_scale_loser_grad(m_l, L.sdpo_loser_scale(pred_w, tw, pred_l, tl, mu))
    r_w, r_l = L.per_sample_mse(ref_w, tw), L.per_sample_mse(ref_l, tl)
    return L.diffusion_dpo_loss(L.dpo_logit(m_w, m_l, r_w, r_l, beta))

  lam = float(L.sdpo_loser_scale(pw, tw, pl, tl, mu))
  assert 0.0 < lam < 1.0
  (v0, (gw0, gl0)) = jax.value_and_grad(loss, argnums=(0, 1))(pw, pl, False)
  (v1, (gw1, gl1)) = jax.value_and_grad(loss, argnums=(0, 1))(pw, pl, True)
  assert float(v1) == float(v0)
  np.testing.assert_array_equal(gw1, gw0)
  np.testing.assert_allclose(gl1, lam * np.asarray(gl0), rtol=1e-5, atol=1e-12)
  assert np.abs(np.asarray(gl0)).max() > 1e-4  # not vacuous


def test_sdpo_input_checks():
  x = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match="mu must be in"):
    L.sdpo_loser_scale(x, x, x, x, 1.5)
  with pytest.raises(ValueError, match="mu must be in"):
    L.sdpo_loser_scale(x, x, x, x, -0.1)
  with pytest.raises(ValueError, match="shapes must match"):
    L.sdpo_loser_scale(x, x, x[:1], x[:1], 0.5)
  with pytest.raises(TypeError, match="floating-point"):
    L.sdpo_loser_scale(x.astype(np.int32), x, x, x, 0.5)
  with pytest.raises(ValueError, match="leading batch axis"):
    L.sdpo_loser_scale(np.float32(1.0), np.float32(0.0), np.float32(1.0), np.float32(0.0), 0.5)
  with pytest.raises(ValueError, match="1 dimensions"):
    L.sdpo_scale_loser_grad(x, 0.5)
  with pytest.raises(ValueError, match="lam must be a scalar"):
    L.sdpo_scale_loser_grad(np.zeros(3, np.float32), np.zeros(2, np.float32))


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
