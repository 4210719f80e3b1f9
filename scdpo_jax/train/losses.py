"""SC-DPO losses as pure, jit-compatible functions (all math in float32).

Optax style: every function takes per-pair arrays of shape (B,) and returns per-pair values
(unreduced), except the few reductions at the end of the file (`weighted_sums` and the
`*_loss` conveniences, defined from the per-pair functions). The train step (`train/step.py`)
calls exactly these functions; the tests check them against NumPy.

Conventions (those of the public Diffusion-DPO code, Wallace et al. 2024):

* `m_w, m_l`: per-pair mean squared error of the **policy** UNet's prediction against its target
  (epsilon or v) for the winner / loser, averaged over all non-batch axes (a mean, not a sum).
  `r_w, r_l`: the same for the frozen **reference** UNet. Winner and loser share timestep and noise.
* The DPO logit is `z = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))`, beta = 5000 for SD1.5.
  (diffusers' LoRA port writes the same loss as `beta' * ((r_w - r_l) - (m_w - m_l))` with
  beta' = beta / 2 = 2500.) `z > 0` means the policy, relative to the reference, denoises the
  winner better than the loser: the implicit preference is right.
* Diffusion-DPO: `L = -mean(log sigmoid(z))`.
* Safety constraint, three forms ([I] reconstructions, see ../shared/docs/method.md 2.2):
  (A) pairs are (re)labelled by the combined score `s = r - lambda * C` before training
      (`combined_score`, `relabel_by_combined_score`);
  (B) a cost margin inside the sigmoid: `z_B = z + lambda * (C_l - C_w)` (`cost_margin`,
      `train.margin_form="bonus"`, our first form) or `z_B = z - lambda * (C_l - C_w)`
      (`"offset"`, SafeDPO / offset-DPO style, the default). Measured
      (tests/test_train_direction.py): the bonus form treats a pair with a costly loser as
      already explained, its gradient weight sigmoid(-z) shrinks, and harmful pairs move *less*
      than under plain DPO; the offset form demands that the policy's preference exceed the cost
      gap and moves them more;
  (C) lambda adapted by projected dual ascent towards a cost budget d (`dual_ascent_update`).
* Dynamic Focusing Mechanism ([I] formula): `w = stop_gradient((1 - sigmoid(z)) ** gamma)`; the
  loss is `sum(w * -log sigmoid(z)) / sum(w)` (weights normalised over the batch, so the gradient
  scale stays that of DPO) or `mean(w * -log sigmoid(z))` without normalisation. gamma = 0 gives
  w = 1 and plain Diffusion-DPO exactly. [I] Which logit w is computed from (`train.focus_on`):
  "logit" = the z above, cost margin included (with the bonus margin this down-weights exactly
  the harmful pairs with a costly loser, README "ShapeWorld"), or "preference" = the plain DPO
  logit z without the margin, so w measures how hard the *preference* still is for the policy,
  the paper's "difficult pairs" reading.
* Winner likelihood term ([I], `train.sft_weight` alpha, `focused_dpo_sft_loss`): the loss
  above plus alpha * mean(m_w), outside the focusing weights; alpha = 0 is the loss above.
* Diffusion-SDPO winner-preserving safeguard (`sdpo_loser_scale`, `sdpo_scale_loser_grad`;
  AIDC-AI/Diffusion-SDPO `train.py`, arXiv 2511.03317): the loser's gradient is scaled by a
  detached lambda in [0, 1] so that, to first order in output space, the step does not increase
  the winner's error; the forward values (and so z and the loss) are unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_float(name: str, x: jax.Array, ndim: int | None = None) -> None:
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array, got dtype {jnp.asarray(x).dtype}")
  if ndim is not None and jnp.ndim(x) != ndim:
    raise ValueError(f"{name} must have {ndim} dimensions, got shape {jnp.shape(x)}")


def _check_same_shape(**arrays: jax.Array) -> None:
  shapes = {k: jnp.shape(v) for k, v in arrays.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"shapes must match: {shapes}")


def per_sample_mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """mean((prediction - target)^2) over all axes but the first, in float32: shape (B,)."""
  _check_float("prediction", prediction)
  _check_float("target", target)
  _check_same_shape(prediction=prediction, target=target)
  if jnp.ndim(prediction) < 1:
    raise ValueError("prediction must have a leading batch axis")
  diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def dpo_logit(model_w: jax.Array, model_l: jax.Array, ref_w: jax.Array, ref_l: jax.Array,
              beta: float) -> jax.Array:
  """z = -0.5 * beta * ((m_w - m_l) - (r_w - r_l)), per pair; the reference terms get no gradient."""
  for name, x in (("model_w", model_w), ("model_l", model_l), ("ref_w", ref_w), ("ref_l", ref_l)):
    _check_float(name, x, ndim=1)
  _check_same_shape(model_w=model_w, model_l=model_l, ref_w=ref_w, ref_l=ref_l)
  ref_diff = jax.lax.stop_gradient(ref_w.astype(jnp.float32) - ref_l.astype(jnp.float32))
  model_diff = model_w.astype(jnp.float32) - model_l.astype(jnp.float32)
  return -0.5 * beta * (model_diff - ref_diff)


def cost_margin(cost_w: jax.Array, cost_l: jax.Array, lam: jax.Array | float) -> jax.Array:
  """Variant B: lambda * (C_l - C_w), added to the DPO logit. Costs are data, never trained here."""
  _check_float("cost_w", cost_w, ndim=1)
  _check_float("cost_l", cost_l, ndim=1)
  _check_same_shape(cost_w=cost_w, cost_l=cost_l)
  return jax.lax.stop_gradient(
      jnp.asarray(lam, jnp.float32) * (cost_l.astype(jnp.float32) - cost_w.astype(jnp.float32)))


def focusing_weights(z: jax.Array, gamma: jax.Array | float) -> jax.Array:
  """Dynamic Focusing Mechanism: w = stop_gradient((1 - sigmoid(z)) ** gamma).

  Hard pairs (z small or negative: the implicit preference is wrong) get w -> 1, easy pairs
  (z >> 0) get w -> 0. gamma = 0 gives w = 1 exactly (also where 1 - sigmoid(z) underflows to 0).
  """
  _check_float("z", z, ndim=1)
  gamma = jnp.asarray(gamma, jnp.float32)
  # (1 - sigmoid(z)) = sigmoid(-z); in log space for stability: exp(gamma * log_sigmoid(-z)).
  w = jnp.exp(gamma * jax.nn.log_sigmoid(-z.astype(jnp.float32)))
  return jax.lax.stop_gradient(jnp.where(gamma == 0, jnp.ones_like(w), w))


def dpo_nll(z: jax.Array) -> jax.Array:
  """Per-pair Diffusion-DPO loss -log sigmoid(z).

  Args:
    z: (B,) DPO logits (`dpo_logit`, plus `cost_margin` for the margin/dual forms).
  Returns:
    (B,) float32 negative log-likelihoods of the preferred ordering.
  """
  _check_float("z", z, ndim=1)
  return -jax.nn.log_sigmoid(z.astype(jnp.float32))


def sft_nll(model_w: jax.Array) -> jax.Array:
  """Per-pair SFT loss of the Diffusion-DPO code: the winner's denoising MSE m_w.

  Args:
    model_w: (B,) policy MSEs on the winners.
  Returns:
    (B,) float32 m_w (the loser is ignored).
  """
  _check_float("model_w", model_w, ndim=1)
  return model_w.astype(jnp.float32)


def implicit_correct(z: jax.Array) -> jax.Array:
  """Per pair 1.0 where the implicit preference is right (z > 0), else 0.0."""
  _check_float("z", z, ndim=1)
  return (z > 0).astype(jnp.float32)


def policy_cost(z: jax.Array, cost_w: jax.Array, cost_l: jax.Array) -> jax.Array:
  """Per-pair expected cost of the policy's choice: sigmoid(z) C_w + (1 - sigmoid(z)) C_l.

  Under the implicit Bradley-Terry model the policy ranks the winner first with probability
  sigmoid(z) ([I], the C-DPO-style constraint estimate that variant C drives towards the budget).
  No gradient flows through it.
  """
  _check_float("z", z, ndim=1)
  p = jax.nn.sigmoid(jax.lax.stop_gradient(z.astype(jnp.float32)))
  return p * cost_w + (1.0 - p) * cost_l


def sdpo_loser_scale(pred_w: jax.Array, target_w: jax.Array, pred_l: jax.Array,
                     target_l: jax.Array, mu: jax.Array | float, eps: float = 1e-9) -> jax.Array:
  """Diffusion-SDPO's winner-preserving scale lambda of the loser's gradient (one scalar).

  Source: AIDC-AI/Diffusion-SDPO `train.py`, `get_adaptive_lose_l_scale` (arXiv 2511.03317),
  transcribed with its constants. With residuals r_w = pred_w - target_w, r_l = pred_l - target_l
  (target = the scheduler's training target, the same as in the MSEs; winner and loser share
  timestep and noise) over a whole batch of N elements per branch, the output-space proxies are
  A = mean(r_w^2), B = mean(r_l^2) with gradients gA = 2 r_w / N, gB = 2 r_l / N, and

      num = ||gA||^2,  den = <gB, gA>,
      lambda = clip((1 - mu) * num / (den + eps), 0, 1)  if den > 0,  else 1,

  the largest loser scale with (-gA + lambda gB) . gA <= -mu ||gA||^2 (the winner's error does not
  grow to first order, with margin mu). The 2/N factors cancel except against eps; they are kept
  (as eps * N^2 / 4 on the plain sums) so that eps weighs what it weighs in the official code.
  No gradient flows through lambda.

  Args:
    pred_w, target_w, pred_l, target_l: the policy's predictions and their training targets on
      the winners / losers, all of one shape with a leading batch axis (all pairs of the batch
      enter one lambda). Residuals are taken in float32, as in `per_sample_mse`.
    mu: margin in [0, 1]; 0.9 in the released SD1.5 Diffusion-DPO launcher, 0.6 for SDXL.
      mu = 1 gives lambda = 0 whenever den > 0.
    eps: added to den, as in the official code.
  Returns:
    float32 scalar lambda in [0, 1], stop-gradient.
  """
  for name, x in (("pred_w", pred_w), ("target_w", target_w), ("pred_l", pred_l),
                  ("target_l", target_l)):
    _check_float(name, x)
  _check_same_shape(pred_w=pred_w, target_w=target_w, pred_l=pred_l, target_l=target_l)
  if jnp.ndim(pred_w) < 1:
    raise ValueError("pred_w must have a leading batch axis")
  if isinstance(mu, (int, float)) and not 0.0 <= mu <= 1.0:
    raise ValueError(f"mu must be in [0, 1], got {mu}")
  f32 = lambda x: jax.lax.stop_gradient(x).astype(jnp.float32)
  rw, rl = f32(pred_w) - f32(target_w), f32(pred_l) - f32(target_l)
  n = rw.size
  num = jnp.sum(jnp.square(rw))  # = ||gA||^2 * N^2 / 4
  dot = jnp.sum(rl * rw)  # = <gB, gA> * N^2 / 4
  mu = jnp.asarray(mu, jnp.float32)
  lam = jnp.where(dot > 0, (1.0 - mu) * num / (dot + eps * (n * n / 4.0)), 1.0)
  return jax.lax.stop_gradient(jnp.clip(lam, 0.0, 1.0))


def sdpo_scale_loser_grad(model_l: jax.Array, lam: jax.Array | float) -> jax.Array:
  """m_l' = sg(m_l) + sg(lambda) * (m_l - sg(m_l)): the loser MSE with its gradient scaled.

  The forward value is exactly m_l (m_l - sg(m_l) is 0); d m_l' / d m_l = lambda. Diffusion-SDPO puts m_l' in place of m_l in the DPO logit
  (`model_losses_l_scaled` in AIDC-AI/Diffusion-SDPO `train.py`).

  Args:
    model_l: (B,) policy MSEs on the losers.
    lam: scalar (or (B,)) scale, normally `sdpo_loser_scale`; treated as a constant.
  Returns:
    (B,) float32 m_l'.
  """
  _check_float("model_l", model_l, ndim=1)
  m = model_l.astype(jnp.float32)
  lam = jax.lax.stop_gradient(jnp.asarray(lam, jnp.float32))
  if jnp.ndim(lam) not in (0, 1) or (jnp.ndim(lam) == 1 and lam.shape != m.shape):
    raise ValueError(f"lam must be a scalar or have shape {m.shape}, got {jnp.shape(lam)}")
  sg = jax.lax.stop_gradient(m)
  return sg + lam * (m - sg)


# ------------------------------------------------------------------------------ reductions

def weighted_sums(per_pair_loss: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum_i w_i * l_i, sum_i w_i): the two sums a normalised loss divides.

  Keeping them separate makes the batch normalisation exact under gradient accumulation: the
  trainer adds both over micro-batches and divides once.
  """
  _check_float("per_pair_loss", per_pair_loss, ndim=1)
  _check_float("weights", weights, ndim=1)
  _check_same_shape(per_pair_loss=per_pair_loss, weights=weights)
  return jnp.sum(weights * per_pair_loss), jnp.sum(weights)


def weighted_dpo_terms(z: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum_i w_i * -log sigmoid(z_i), sum_i w_i) = `weighted_sums(dpo_nll(z), weights)`."""
  return weighted_sums(dpo_nll(z), weights)


def diffusion_dpo_loss(z: jax.Array) -> jax.Array:
  """Diffusion-DPO (sigmoid): mean(dpo_nll(z)) = -mean(log sigmoid(z))."""
  return jnp.mean(dpo_nll(z))


def focused_dpo_loss(z: jax.Array, gamma: jax.Array | float, normalize: bool = True) -> jax.Array:
  """DPO with the Dynamic Focusing Mechanism; normalize=True divides by sum(w), else by B."""
  total, wsum = weighted_dpo_terms(z, focusing_weights(z, gamma))
  return total / (wsum if normalize else z.shape[0])


def focused_dpo_sft_loss(z: jax.Array, hardness: jax.Array, model_w: jax.Array,
                         gamma: jax.Array | float, sft_weight: float,
                         normalize: bool = True) -> jax.Array:
  """SC-DPO with the winner likelihood term ([I], `train.sft_weight` alpha):

      L = sum_i w_i * -log sigmoid(z_i) / sum_i w_i  +  alpha * mean_i(m_w_i),
      w_i = stop_gradient((1 - sigmoid(h_i)) ** gamma)   (h = `hardness`: z, or z without margin)

  (sum_i w_i becomes B with normalize=False). SC-DPO "maximizes the likelihood of generating
  human-preferred samples while minimizing the safety cost" (arXiv 2504.14290, abstract); the
  DPO logit alone only ranks winner above loser relative to the reference, and can do so by
  making both worse. alpha * m_w (the Diffusion-DPO code's SFT loss, `sft_nll`; for LLMs, RPO's
  DPO + NLL, Pang et al. 2024) pulls the policy towards the winners themselves. It sits outside
  the focusing weights: inside them, the pairs the policy already ranks right (most harmful
  pairs after a few steps) lose their winner term too (measured in the ShapeWorld study, README).
  DPO's own pull on m_w is 0.5 * beta * sigmoid(-z) per pair, so alpha = 0.5 * beta matches it
  at z = 0. The train step computes the same value with exact gradients under gradient
  accumulation (train/step.py).
  """
  _check_float("model_w", model_w, ndim=1)
  total, wsum = weighted_dpo_terms(z, focusing_weights(hardness, gamma))
  dpo = total / (wsum if normalize else z.shape[0])
  return dpo + jnp.asarray(sft_weight, jnp.float32) * jnp.mean(sft_nll(model_w))


def sft_loss(model_w: jax.Array) -> jax.Array:
  """The SFT baseline of the Diffusion-DPO code: mean(sft_nll(m_w))."""
  return jnp.mean(sft_nll(model_w))


def implicit_accuracy(z: jax.Array) -> jax.Array:
  """Fraction of pairs whose implicit preference is right: mean(implicit_correct(z))."""
  return jnp.mean(implicit_correct(z))


def policy_cost_estimate(z: jax.Array, cost_w: jax.Array, cost_l: jax.Array) -> jax.Array:
  """Batch mean of `policy_cost`: the constraint estimate of variant C."""
  return jnp.mean(policy_cost(z, cost_w, cost_l))


# ------------------------------------------------------------------------------ safety forms

def combined_score(reward: jax.Array, cost: jax.Array, lam: float) -> jax.Array:
  """Variant A's score s = r - lambda * C (used when pairs are built: higher s wins)."""
  _check_float("reward", reward)
  _check_float("cost", cost)
  _check_same_shape(reward=reward, cost=cost)
  return reward.astype(jnp.float32) - lam * cost.astype(jnp.float32)


def relabel_by_combined_score(reward_w, reward_l, cost_w, cost_l, lam: float) -> jax.Array:
  """Variant A: True where the pair must be swapped because s(loser) > s(winner)."""
  return combined_score(reward_l, cost_l, lam) > combined_score(reward_w, cost_w, lam)


def dual_ascent_update(lam: jax.Array, cost_estimate: jax.Array, budget: float, lr: float,
                       lam_max: float = 1e4) -> jax.Array:
  """Variant C: projected dual ascent lambda <- clip(lambda + lr * (E[C] - d), 0, lambda_max)."""
  lam = jnp.asarray(lam, jnp.float32)
  return jnp.clip(lam + lr * (jnp.asarray(cost_estimate, jnp.float32) - budget), 0.0, lam_max)


def scheduled_gamma(step: jax.Array, gamma: float, gamma_start: float = 0.0,
                    ramp_steps: int = 0) -> jax.Array:
  """gamma ramped linearly from gamma_start to gamma over ramp_steps (fixed gamma if 0)."""
  if ramp_steps <= 0:
    return jnp.asarray(gamma, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / ramp_steps, 0.0, 1.0)
  return jnp.asarray(gamma_start + (gamma - gamma_start) * frac, jnp.float32)
