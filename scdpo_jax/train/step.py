"""Train state and the jitted SC-DPO train step.

One step consumes the global batch of `pairs_per_step` pairs as `grad_accum` micro-batches
(`lax.scan`), so effective batches of thousands of pairs fit in memory. For every micro-batch:

1. caption dropout: with probability `caption_dropout` a pair's text states become the empty
   prompt's (as the public Diffusion-DPO code's `proportion_empty_prompts`; on SDXL both the
   states and the pooled embedding become the empty prompt's, the time ids stay: the Salesforce
   `train.py --sdxl` replaces the caption by "" before `encode_prompt_sdxl`);
2. one timestep t ~ U{0..T-1} and one noise eps per pair, **shared by winner and loser** (drawn
   for the global batch before the split, so results do not depend on `grad_accum`);
3. the policy UNet (fp32 master weights, compute in `model.dtype`) and the frozen reference UNet
   (its own params, passed in as an argument, never closed over, no gradient) predict on
   [x_t^w ; x_t^l] in one call each;
4. per-pair MSEs -> DPO logit (+ cost margin for variants B/C) -> per-pair loss and focusing
   weights -> weighted sums, all by the functions of `losses.py` (the ones the tests check); the
   normalisation by sum(w) is exact across micro-batches. With `sdpo_mu` > 0 (Diffusion-SDPO),
   the loser's MSE enters the logit through `losses.sdpo_scale_loser_grad`: same value, gradient
   scaled by the micro-batch's winner-preserving lambda (`losses.sdpo_loser_scale`, one scalar
   over all pairs of the micro-batch, logged as `sdpo_lambda/all`, the step's mean over
   micro-batches). The official code computes it per device and micro-batch; here a micro-batch
   is global (all devices), so with data parallelism lambda sees more pairs.
5. with `sft_weight` alpha > 0 ([I], `losses.focused_dpo_sft_loss`), alpha * mean(m_w) over the
   whole batch is added outside the focusing weights; when sum(w) is only known after the last
   micro-batch, the two terms' gradients are accumulated apart and combined at the end.

By default the policy and the reference see the same text conditioning. `policy_text_fn`
(text-encoder LoRA, `lora/text_encoder.py`) gives the policy its own text states, computed in
the step from the micro-batch (and differentiated with the policy params); without it the
program is the same as before.

Text conditioning (`text_conditioning`) is a small pytree: {"text_states"} for SD 1.x/2.x, plus
"pooled_text" and "time_ids" for SDXL, whose UNet calls then get `added_cond_kwargs`
(`conditioning_xl.added_cond_kwargs`); `empty_states` is the empty prompt's states (an array) or,
for SDXL, {"text_states", "pooled_text"}. SD programs are the same as before (the same ops).

A step whose loss or gradients are not finite leaves params and optimizer state unchanged and
increments `state.skipped`. Randomness is `fold_in(rng, step)`, so a resumed run draws the same
numbers as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from scdpo_jax.errors import ConfigError, check_choice
from scdpo_jax.models import conditioning_xl, schedule as sch
from scdpo_jax.train import losses as L

LOSS_TYPES = ("dpo", "sft")
SAFETY_MODES = ("none", "relabel", "margin", "dual")
# "offset": z - lambda (C_l - C_w) (the default; SafeDPO / ODPO-style: the policy must beat the
# cost gap); "bonus": z + lambda (C_l - C_w) (the first [I] reconstruction, which moves harmful
# pairs less than plain DPO: tests/test_train_direction.py). See losses.cost_margin.
MARGIN_FORMS = ("bonus", "offset")
FOCUS_ON = ("logit", "preference")
TAGS = ("harmful", "clean")
PER_PAIR_KEYS = ("loss", "implicit_acc", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l",
                 "focus_weight", "logit", "policy_cost")
METRIC_SUM_KEYS = tuple(f"{k}/{tag}" for k in PER_PAIR_KEYS for tag in ("all",) + TAGS) + tuple(
    f"count/{tag}" for tag in ("all",) + TAGS)
# Only with train.sdpo_mu > 0: the micro-batch's Diffusion-SDPO lambda, repeated for its pairs.
SDPO_SUM_KEYS = tuple(f"sdpo_lambda/{tag}" for tag in ("all",) + TAGS)


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  lam: jax.Array  # safety weight lambda (dual variable in mode "dual")
  skipped: jax.Array  # non-finite steps skipped so far
  rng: jax.Array  # base key; step keys are fold_in(rng, step)


@struct.dataclass
class StepConfig:
  """Static hyper-parameters of the step (hashable, part of the compiled program)."""

  loss_type: str = struct.field(pytree_node=False, default="dpo")
  beta: float = struct.field(pytree_node=False, default=5000.0)
  safety_mode: str = struct.field(pytree_node=False, default="margin")
  gamma: float = struct.field(pytree_node=False, default=0.0)
  gamma_start: float = struct.field(pytree_node=False, default=0.0)
  gamma_ramp_steps: int = struct.field(pytree_node=False, default=0)
  focus_normalize: bool = struct.field(pytree_node=False, default=True)
  cost_budget: float = struct.field(pytree_node=False, default=0.0)
  dual_lr: float = struct.field(pytree_node=False, default=0.0)
  lam_max: float = struct.field(pytree_node=False, default=1e4)
  margin_form: str = struct.field(pytree_node=False, default="offset")
  focus_on: str = struct.field(pytree_node=False, default="preference")
  caption_dropout: float = struct.field(pytree_node=False, default=0.2)
  grad_accum: int = struct.field(pytree_node=False, default=1)
  sdpo_mu: float = struct.field(pytree_node=False, default=0.0)  # Diffusion-SDPO; 0 = off
  sft_weight: float = struct.field(pytree_node=False, default=0.0)  # alpha of + alpha m_w; 0 = off

  def validate(self) -> None:
    check_choice("train.loss_type", self.loss_type, LOSS_TYPES)
    check_choice("train.margin_form", self.margin_form, MARGIN_FORMS)
    check_choice("train.focus_on", self.focus_on, FOCUS_ON)
    check_choice("train.safety_mode", self.safety_mode, SAFETY_MODES)
    if not 0.0 <= self.caption_dropout < 1.0:
      raise ConfigError(f"train.caption_dropout must be in [0, 1), got {self.caption_dropout}")
    if self.grad_accum < 1:
      raise ConfigError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
    for name in ("beta", "dual_lr", "lam_max"):
      value = getattr(self, name)
      if not (value > 0 if name == "beta" else value >= 0) or value != value:
        raise ConfigError(f"train.{name} must be {'> 0' if name == 'beta' else '>= 0'}, got {value}")
    for name in ("gamma", "gamma_start", "gamma_ramp_steps"):
      if not getattr(self, name) >= 0:
        raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
    # [0, 1] is what the official get_adaptive_lose_l_scale asserts; 0 switches it off here.
    if not 0.0 <= self.sdpo_mu <= 1.0:
      raise ConfigError(f"train.sdpo_mu must be in [0, 1] (0 = off), got {self.sdpo_mu}")
    if not self.sft_weight >= 0:
      raise ConfigError(f"train.sft_weight must be >= 0 (0 = off), got {self.sft_weight}")
    if self.sft_weight > 0 and self.loss_type != "dpo":
      raise ConfigError(f"train.sft_weight > 0 adds the winner's MSE to the DPO loss; it needs "
                        f"train.loss_type 'dpo', got {self.loss_type!r}")
    if self.sdpo_mu > 0 and self.loss_type != "dpo":
      raise ConfigError(f"train.sdpo_mu > 0 (Diffusion-SDPO) needs train.loss_type 'dpo', got "
                        f"{self.loss_type!r}")


def _tree_norm(tree) -> jax.Array:
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


COND_KEYS = ("text_states", "pooled_text", "time_ids")  # batch keys the UNet is conditioned on
DROPPED_KEYS = ("text_states", "pooled_text")  # replaced by the empty prompt's in caption dropout


def text_conditioning(batch: dict) -> dict:
  """The UNet's text conditioning of a batch: {"text_states"} (SD), + "pooled_text", "time_ids"
  (SDXL, `data.batch.XL_KEYS`)."""
  return {k: batch[k] for k in COND_KEYS if k in batch}


def drop_captions(cond: dict, drop: jax.Array, empty_states) -> dict:
  """Rows with `drop` take the empty prompt's states (and pooled embedding); time ids stay."""
  empty = empty_states if isinstance(empty_states, dict) else {"text_states": empty_states}
  out = dict(cond)
  for key in DROPPED_KEYS:
    if key in cond:
      if key not in empty:
        raise ValueError(f"caption dropout: the batch has {key!r} but empty_states does not")
      x = cond[key]
      mask = drop.reshape(drop.shape + (1,) * (x.ndim - 1))
      out[key] = jnp.where(mask, empty[key].astype(x.dtype), x)
  return out


def _pair_forward(apply_fn, params, x_w, x_l, t, cond):
  """One UNet call on [x_w ; x_l] (shared t and text), returned as (pred_w, pred_l). `cond`: the
  text states (array) or a `text_conditioning` pytree (SDXL: also `added_cond_kwargs`)."""
  cond = cond if isinstance(cond, dict) else {"text_states": cond}
  twice = {k: jnp.concatenate([v, v]) for k, v in cond.items()}
  extra = ()
  if "pooled_text" in twice:
    extra = (conditioning_xl.added_cond_kwargs(twice["pooled_text"], twice["time_ids"]),)
  pred = apply_fn({"params": params}, jnp.concatenate([x_w, x_l]), jnp.concatenate([t, t]),
                  twice["text_states"], *extra)
  return jnp.split(pred, 2)


def draw_randomness(rng: jax.Array, batch: dict, num_train_timesteps: int,
                    caption_dropout: float) -> dict:
  """Per-pair timestep, noise (shared by winner and loser) and caption-dropout flag.

  Drawn for the whole global batch before it is split into micro-batches, so the result does not
  depend on `grad_accum`.
  """
  n = batch["latents_w"].shape[0]
  k_drop, k_t, k_noise = jax.random.split(rng, 3)
  return {
      "t": jax.random.randint(k_t, (n,), 0, num_train_timesteps),
      "noise": jax.random.normal(k_noise, batch["latents_w"].shape, jnp.float32),
      "drop_caption": jax.random.uniform(k_drop, (n,)) < caption_dropout,
  }


def micro_batch_terms(params, ref_params, batch, lam, gamma, *, apply_fn, ref_apply_fn,
                      schedule: sch.NoiseSchedule, empty_states, cfg: StepConfig,
                      policy_text_fn: Callable | None = None):
  """(weighted loss sum, (weight sum, per-pair metrics)) for one micro-batch. `policy_text_fn`:
  `(params, micro-batch, empty_states) -> text states` of the policy, if not the batch's."""
  b = batch["latents_w"].shape[0]
  states = text_conditioning(batch)
  if cfg.caption_dropout > 0:
    states = drop_captions(states, batch["drop_caption"], empty_states)
  t, noise = batch["t"], batch["noise"]
  x0_w, x0_l = batch["latents_w"], batch["latents_l"]
  cost_w, cost_l = batch["cost_w"], batch["cost_l"]
  if cfg.safety_mode == "relabel":  # variant A applied on the fly: higher r - lambda*C wins
    swap = L.relabel_by_combined_score(batch["reward_w"], batch["reward_l"], cost_w, cost_l, lam)
    sw = swap[:, None, None, None]
    x0_w, x0_l = jnp.where(sw, x0_l, x0_w), jnp.where(sw, x0_w, x0_l)
    cost_w, cost_l = jnp.where(swap, cost_l, cost_w), jnp.where(swap, cost_w, cost_l)
  x_w, x_l = sch.add_noise(schedule, x0_w, noise, t), sch.add_noise(schedule, x0_l, noise, t)
  target_w = sch.training_target(schedule, x0_w, noise, t)
  target_l = sch.training_target(schedule, x0_l, noise, t)

  policy_states = states
  if policy_text_fn is not None:
    policy_states = {**states, "text_states": policy_text_fn(params, batch, empty_states)}
  pred_w, pred_l = _pair_forward(apply_fn, params, x_w, x_l, t, policy_states)
  m_w, m_l = L.per_sample_mse(pred_w, target_w), L.per_sample_mse(pred_l, target_l)
  ref_w, ref_l = jax.lax.stop_gradient(
      _pair_forward(ref_apply_fn, ref_params, x_w, x_l, t, states))
  r_w, r_l = L.per_sample_mse(ref_w, target_w), L.per_sample_mse(ref_l, target_l)
  if cfg.sdpo_mu > 0:  # Diffusion-SDPO: same m_l, its gradient scaled by lambda (Python if: off =
    # the program of plain DPO)
    sdpo_lam = L.sdpo_loser_scale(pred_w, target_w, pred_l, target_l, cfg.sdpo_mu)
    m_l = L.sdpo_scale_loser_grad(m_l, sdpo_lam)

  z = z_pref = L.dpo_logit(m_w, m_l, r_w, r_l, cfg.beta)
  if cfg.safety_mode in ("margin", "dual"):
    margin = L.cost_margin(cost_w, cost_l, lam)
    z = z + margin if cfg.margin_form == "bonus" else z - margin
  if cfg.loss_type == "sft":
    per_pair_loss, weights = L.sft_nll(m_w), jnp.ones_like(z)
  else:
    # [I] focus_on: the hardness the focusing weight sees, the full logit (cost margin in it) or
    # the preference alone (losses.py, Dynamic Focusing).
    per_pair_loss = L.dpo_nll(z)
    weights = L.focusing_weights(z if cfg.focus_on == "logit" else z_pref, gamma)
  total, wsum = L.weighted_sums(per_pair_loss, weights)
  if cfg.loss_type == "sft" or not cfg.focus_normalize:
    wsum = jnp.asarray(b, jnp.float32)
  per_pair = {
      "loss": jax.lax.stop_gradient(per_pair_loss),
      "implicit_acc": L.implicit_correct(z),
      "model_mse_w": m_w, "model_mse_l": m_l, "ref_mse_w": r_w, "ref_mse_l": r_l,
      "focus_weight": weights, "logit": jax.lax.stop_gradient(z),
      "policy_cost": L.policy_cost(z, cost_w, cost_l),
  }
  if cfg.sdpo_mu > 0:
    per_pair["sdpo_lambda"] = jnp.full((b,), sdpo_lam)
  return total, (wsum, per_pair)


def _tagged_sums(per_pair, is_harmful):
  """Sums and counts of every per-pair metric, overall and per tag."""
  harmful = is_harmful.astype(jnp.float32)
  masks = {"all": jnp.ones_like(harmful), "harmful": harmful, "clean": 1.0 - harmful}
  sums = {f"{k}/{tag}": jnp.sum(v * m) for k, v in per_pair.items() for tag, m in masks.items()}
  counts = {f"count/{tag}": jnp.sum(m) for tag, m in masks.items()}
  return sums, counts


def make_train_step(*, apply_fn: Callable, ref_apply_fn: Callable, optimizer,
                    schedule: sch.NoiseSchedule, cfg: StepConfig,
                    policy_text_fn: Callable | None = None):
  """Build `train_step(state, ref_params, batch, empty_states) -> (state, metrics)` (not jitted).
  `policy_text_fn`: see `micro_batch_terms`."""
  cfg.validate()

  def train_step(state: TrainState, ref_params, batch, empty_states):
    rng = jax.random.fold_in(state.rng, state.step)
    gamma = L.scheduled_gamma(state.step, cfg.gamma, cfg.gamma_start, cfg.gamma_ramp_steps)
    accum = cfg.grad_accum
    n = batch["latents_w"].shape[0]

    # (n, ...) -> (accum, n / accum, ...): micro-batch i takes rows i, i + accum, ... so that every
    # micro-batch is spread over all devices of the batch-sharded input.
    batch = {**batch, **draw_randomness(rng, batch, schedule.num_train_timesteps,
                                        cfg.caption_dropout)}
    micro = jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape((n // accum, accum) + x.shape[1:]), 1, 0), batch)
    terms_kw = dict(apply_fn=apply_fn, ref_apply_fn=ref_apply_fn, schedule=schedule,
                    empty_states=empty_states, cfg=cfg, policy_text_fn=policy_text_fn)
    alpha = cfg.sft_weight
    # [I] the winner likelihood term alpha * mean(m_w) (losses.focused_dpo_sft_loss) sits outside
    # the focusing weights and their sum(w) normalisation. Its gradient is exact in one backward
    # pass when sum(w) is known inside the micro-batch (one micro-batch, or no normalisation);
    # else the two terms' gradients are accumulated apart (one forward, two backward passes).
    normalized = cfg.focus_normalize  # (alpha > 0 implies loss_type "dpo", validated)
    split_grads = alpha > 0 and normalized and accum > 1

    def terms(p, mb):
      return micro_batch_terms(p, ref_params, mb, state.lam, gamma, **terms_kw)

    def objective(p, mb):  # what one backward pass differentiates; aux: the DPO sums
      total, (wsum, per_pair) = terms(p, mb)
      if alpha == 0:  # Python if: the program without the term
        return total, (total, wsum, per_pair)
      # the step divides by sum(w) (= this micro-batch's wsum) or by n (= wsum unnormalised)
      scale = alpha * jax.lax.stop_gradient(wsum) / n if normalized else alpha
      return total + scale * jnp.sum(per_pair["model_mse_w"]), (total, wsum, per_pair)

    def grads_of(p, mb):
      if not split_grads:
        (_, (total, wsum, per_pair)), grads = jax.value_and_grad(objective, has_aux=True)(p, mb)
        return total, wsum, per_pair, grads, None
      def both(q):  # the two sums, differentiated apart
        total, (wsum, per_pair) = terms(q, mb)
        return (total, jnp.sum(per_pair["model_mse_w"])), (wsum, per_pair)

      (total, sft), vjp_fn, (wsum, per_pair) = jax.vjp(both, p, has_aux=True)
      grads = vjp_fn((jnp.ones_like(total), jnp.zeros_like(sft)))[0]
      sft_grads = vjp_fn((jnp.zeros_like(total), jnp.ones_like(sft)))[0]
      return total, wsum, per_pair, grads, sft_grads

    def body(carry, xs):
      grads_acc, sft_acc, total_acc, wsum_acc, sums_acc = carry
      mb = xs
      total, wsum, per_pair, grads, sft_grads = grads_of(state.params, mb)
      sums, counts = _tagged_sums(per_pair, mb["is_harmful"])
      sums = {**sums, **counts}
      if split_grads:
        sft_acc = jax.tree.map(jnp.add, sft_acc, sft_grads)
      return (jax.tree.map(jnp.add, grads_acc, grads), sft_acc, total_acc + total,
              wsum_acc + wsum, jax.tree.map(jnp.add, sums_acc, sums)), None

    zeros_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    sum_keys = METRIC_SUM_KEYS + (SDPO_SUM_KEYS if cfg.sdpo_mu > 0 else ())
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in sum_keys}
    init = (zeros_grads, zeros_grads if split_grads else (), jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32), zero_sums)
    if accum == 1:
      (grads, sft_grads, total, wsum, sums), _ = body(init, jax.tree.map(lambda x: x[0], micro))
    else:
      (grads, sft_grads, total, wsum, sums), _ = jax.lax.scan(body, init, micro)
    if split_grads:  # sum(w) is known now: bring the term's gradient to the same divisor
      grads = jax.tree.map(lambda g, h: g + (alpha * wsum / n) * h, grads, sft_grads)

    loss = total / wsum
    if alpha > 0:
      loss = loss + alpha * sums["model_mse_w/all"] / n
    grads = jax.tree.map(lambda g, p: (g / wsum).astype(p.dtype), grads, state.params)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(_tree_norm(grads))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    metrics = {}
    for key, value in sums.items():
      if key.startswith("count/"):
        metrics[key] = value
        continue
      tag = key.rsplit("/", 1)[1]
      metrics[key] = value / jnp.maximum(sums[f"count/{tag}"], 1.0)
    lam = state.lam
    if cfg.safety_mode == "dual":
      lam = jnp.where(finite, L.dual_ascent_update(lam, metrics["policy_cost/all"],
                                                   cfg.cost_budget, cfg.dual_lr, cfg.lam_max),
                      lam)
    metrics.update({
        "objective": loss, "lambda": state.lam, "gamma": gamma,
        "grad_norm": _tree_norm(grads), "param_norm": _tree_norm(state.params),
        "update_norm": _tree_norm(updates), "finite": finite.astype(jnp.float32),
        "skipped_total": state.skipped + (~finite).astype(jnp.int32),
    })
    new_state = state.replace(
        step=state.step + 1, params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state), lam=lam,
        skipped=state.skipped + (~finite).astype(jnp.int32))
    return new_state, metrics

  return train_step
