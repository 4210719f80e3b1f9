"""Cost-model objectives of method.md section 2.3 (project reconstruction [I]), as pure functions.

Notation: c_h = C(x_h), costs of harmful images, and c_s = C(x_s), costs of safe images, are 1-D
float arrays. sigma is the logistic function; log sigma is computed stably (`jax.nn.log_sigmoid`).

* Contrastive (Bradley-Terry ranking) term over matched pairs (c_h[i], c_s[i]), temperature tau:
      L_con = -mean_i log sigma((c_h[i] - c_s[i]) / tau)
  It only orders costs (shift-invariant), so it is paired with an anchoring term.
* Cost anchoring, sign form (Safe-RLHF): safe <= 0 < harmful, decision threshold 0:
      L_anc_sign = -mean_h log sigma(c_h) - mean_s log sigma(-c_s)
* Cost anchoring, squared form: costs pulled to fixed anchors a_h (harmful) and a_s (safe),
  decision threshold (a_h + a_s) / 2:
      L_anc_sq = mean_h (c_h - a_h)^2 + mean_s (c_s - a_s)^2
* Total: L_cost = L_con + mu * L_anc.

Inputs are checked when traced: both must be 1-D floating arrays (a TypeError for integer or
boolean costs, a ValueError for other ranks), and the contrastive term needs equal lengths.
Half-precision costs are computed in float32 (float64 stays float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ANCHORS = ("sign", "squared")


def _check_costs(name: str, x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating array of costs, got dtype {x.dtype}")
  if x.ndim != 1:
    raise ValueError(f"{name} must be 1-D (one cost per image), got shape {x.shape}")
  if x.shape[0] == 0:
    raise ValueError(f"{name} is empty")
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))  # bf16/fp16 -> fp32, fp64 kept


def contrastive_loss(cost_harmful: jax.Array, cost_safe: jax.Array, tau: float = 1.0
                     ) -> jax.Array:
  """L_con = -mean log sigma((c_h - c_s) / tau) over matched pairs (equal-length 1-D arrays)."""
  c_h = _check_costs("cost_harmful", cost_harmful)
  c_s = _check_costs("cost_safe", cost_safe)
  if c_h.shape != c_s.shape:
    raise ValueError(f"contrastive_loss pairs costs element-wise: cost_harmful {c_h.shape} and "
                     f"cost_safe {c_s.shape} differ")
  if not tau > 0:
    raise ValueError(f"tau must be > 0, got {tau}")
  return -jnp.mean(jax.nn.log_sigmoid((c_h - c_s) / tau))


def sign_anchor_loss(cost_harmful: jax.Array, cost_safe: jax.Array) -> jax.Array:
  """L_anc = -mean_h log sigma(c_h) - mean_s log sigma(-c_s) (lengths may differ)."""
  c_h = _check_costs("cost_harmful", cost_harmful)
  c_s = _check_costs("cost_safe", cost_safe)
  return -jnp.mean(jax.nn.log_sigmoid(c_h)) - jnp.mean(jax.nn.log_sigmoid(-c_s))


def squared_anchor_loss(cost_harmful: jax.Array, cost_safe: jax.Array,
                        anchor_harmful: float = 1.0, anchor_safe: float = 0.0) -> jax.Array:
  """L_anc = mean_h (c_h - a_h)^2 + mean_s (c_s - a_s)^2 (lengths may differ)."""
  c_h = _check_costs("cost_harmful", cost_harmful)
  c_s = _check_costs("cost_safe", cost_safe)
  if not anchor_harmful > anchor_safe:
    raise ValueError(f"anchor_harmful ({anchor_harmful}) must exceed anchor_safe ({anchor_safe})")
  return jnp.mean((c_h - anchor_harmful) ** 2) + jnp.mean((c_s - anchor_safe) ** 2)


def anchor_threshold(anchor: str, anchor_harmful: float = 1.0, anchor_safe: float = 0.0) -> float:
  """Cost above which an image counts as harmful: 0 (sign form) or (a_h + a_s) / 2."""
  if anchor == "sign":
    return 0.0
  if anchor == "squared":
    return 0.5 * (anchor_harmful + anchor_safe)
  raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")


def harm_probability(costs: jax.Array, anchor: str, anchor_harmful: float = 1.0,
                     anchor_safe: float = 0.0) -> jax.Array:
  """The probability of "harmful" each anchoring form implies (used for calibration):
  sigma(c) for the sign form (its loss is the logistic likelihood of that probability),
  clip((c - a_s) / (a_h - a_s), 0, 1) for the squared form (the least-squares estimate of the
  label on the anchored scale)."""
  c = jnp.asarray(costs, jnp.float32)
  if anchor == "sign":
    return jax.nn.sigmoid(c)
  if anchor == "squared":
    return jnp.clip((c - anchor_safe) / (anchor_harmful - anchor_safe), 0.0, 1.0)
  raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")


def cost_model_loss(cost_harmful: jax.Array, cost_safe: jax.Array, *, tau: float = 1.0,
                    mu: float = 1.0, anchor: str = "sign", anchor_harmful: float = 1.0,
                    anchor_safe: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_cost = L_con + mu * L_anc over matched pairs; returns (loss, {"con", "anc", "loss",
  "pair_accuracy"}) where pair_accuracy = mean[c_h > c_s]."""
  con = contrastive_loss(cost_harmful, cost_safe, tau)
  if anchor == "sign":
    anc = sign_anchor_loss(cost_harmful, cost_safe)
  elif anchor == "squared":
    anc = squared_anchor_loss(cost_harmful, cost_safe, anchor_harmful, anchor_safe)
  else:
    raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
  loss = con + mu * anc
  acc = jnp.mean((jnp.asarray(cost_harmful) > jnp.asarray(cost_safe)).astype(jnp.float32))
  return loss, {"loss": loss, "con": con, "anc": anc, "pair_accuracy": acc}
