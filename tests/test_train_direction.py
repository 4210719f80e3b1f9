"""Training moves the model the intended way (tiny UNet, CPU, fp32, a few Adam steps).

Pairs with a known preference: every winner is a smooth latent (sums of low-frequency sines),
every loser white noise; half the pairs are "harmful" (their own prompt, costly loser C_l = 1,
C_w = 0), half clean (another prompt, no cost). Measured on fresh noise and timesteps (16 draws
per pair, `micro_batch_terms` with lambda = 0, so the logit is the pure Diffusion-DPO one
z = -0.5 beta ((m_w - m_l) - (r_w - r_l)) = 0.5 beta x the policy's log-likelihood gain on the
winner relative to the loser, against the reference):

* plain DPO raises the implicit accuracy (0 at step 0, where policy = reference) and z;
* the cost margin (the default `offset` form) moves the harmful pairs more than the clean ones;
  the first [I] form, `bonus`, moves them less than plain DPO (measured and kept as a test).

One compiled train step serves both default runs (mode "margin"; lambda = 0 is plain DPO,
lambda is state, not part of the program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scdpo_jax.models import schedule as sch
from scdpo_jax.models.unet import UNet2DConditionModel
from scdpo_jax.models.unet_config import UNetConfig
from scdpo_jax.train import step as step_lib

N, SIZE, SEQ, DIM = 8, 8, 7, 32
UNET = dict(sample_size=SIZE, in_channels=4, out_channels=4, block_out_channels=(32,),
            layers_per_block=1, cross_attention_dim=DIM, attention_head_dim=4,
            down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
# (cross-attention in the mid block only: the text conditioning, caption dropout included, goes
# through attention; the fewer blocks keep each compile ~13 s of CPU on a 2-core machine)
BETA, LR, STEPS, LAM = 100.0, 1e-3, 8, 3.0


def _pairs():
  rng = np.random.default_rng(0)
  yy, xx = np.meshgrid(np.linspace(-1, 1, SIZE), np.linspace(-1, 1, SIZE), indexing="ij")
  freqs = rng.uniform(-1, 1, (N * 4, 2))
  smooth = np.stack([np.sin(np.pi * (a * xx + b * yy)) for a, b in freqs])
  harmful = np.array([1, 0] * (N // 2), np.int32)
  prompts = rng.standard_normal((2, SEQ, DIM)).astype(np.float32)
  return {
      "latents_w": smooth.reshape(N, 4, SIZE, SIZE).transpose(0, 2, 3, 1).astype(np.float32),
      "latents_l": rng.standard_normal((N, SIZE, SIZE, 4)).astype(np.float32),
      "text_states": prompts[1 - harmful],
      "is_harmful": harmful,
      "cost_w": np.zeros(N, np.float32),
      "cost_l": harmful.astype(np.float32),
      "reward_w": np.zeros(N, np.float32), "reward_l": np.zeros(N, np.float32),
  }


def _model_and_schedule():
  module = UNet2DConditionModel(UNetConfig.from_dict(UNET))
  params = jax.jit(module.init)(
      jax.random.key(0), *[jnp.zeros(s.shape, s.dtype) for s in module.dummy_inputs()])["params"]
  schedule = sch.schedule_from_config(dict(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      beta_schedule="scaled_linear"))
  return module, params, schedule


@pytest.fixture(scope="module")
def runs():
  module, params, schedule = _model_and_schedule()
  cfg = step_lib.StepConfig(beta=BETA, safety_mode="margin", caption_dropout=0.0)
  kw = dict(apply_fn=module.apply, ref_apply_fn=module.apply, schedule=schedule, cfg=cfg)
  optimizer = optax.adam(LR)
  train_step = jax.jit(step_lib.make_train_step(optimizer=optimizer, **kw))
  batch = _pairs()
  empty = np.zeros((1, SEQ, DIM), np.float32)

  @jax.jit
  def eval_logits(p):
    """Mean pure-DPO logit per pair over 16 fresh (t, noise) draws (lambda = 0)."""
    def one(key):
      rnd = step_lib.draw_randomness(key, batch, schedule.num_train_timesteps, 0.0)
      return step_lib.micro_batch_terms(p, params, {**batch, **rnd}, 0.0, 0.0,
                                        empty_states=empty, **kw)[1][1]["logit"]
    return jnp.mean(jax.vmap(one)(jax.random.split(jax.random.key(123), 16)), axis=0)

  out = {}
  for name, lam in (("dpo", 0.0), ("margin", LAM)):
    state = step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
        lam=jnp.asarray(lam, jnp.float32), skipped=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(1))
    acc = []
    for _ in range(STEPS):
      state, metrics = train_step(state, params, batch, empty)
      acc.append(float(metrics["implicit_acc/all"]))
    out[name] = {"train_acc": acc, "z": np.asarray(eval_logits(state.params))}
  out["z0"] = np.asarray(eval_logits(params))
  out["harmful"] = batch["is_harmful"] == 1
  return out


def test_dpo_raises_implicit_accuracy_and_winner_likelihood(runs):
  # policy = reference: no preference yet (up to fp32 summation order in the two UNet calls)
  np.testing.assert_allclose(runs["z0"], 0.0, atol=1e-4)
  dpo = runs["dpo"]
  assert dpo["train_acc"][0] == 0.0
  assert np.mean(dpo["train_acc"][-3:]) >= 0.75, dpo["train_acc"]
  z = dpo["z"]
  assert (z > 0).mean() >= 0.75, z  # on fresh noise and timesteps
  assert z.mean() > 1.0, z  # winner log-likelihood gain over the loser > 2 / beta per element


def test_cost_margin_moves_harmful_pairs_more_than_clean_ones(runs):
  """The default margin form "offset" (z - lambda (C_l - C_w), SafeDPO-style): the policy must
  beat the cost gap, so the harmful pairs move more than under plain DPO and more than the clean
  ones."""
  assert step_lib.StepConfig().margin_form == "offset"
  h = runs["harmful"]
  dz = runs["margin"]["z"] - runs["dpo"]["z"]  # what the margin changes, per pair
  moved_harmful, moved_clean = dz[h].mean(), dz[~h].mean()
  assert moved_harmful > 0.25 and moved_harmful > moved_clean + 0.25, (
      f"margin minus plain DPO: harmful {moved_harmful:+.2f}, clean {moved_clean:+.2f}")


def test_bonus_margin_form_moves_harmful_pairs_less_than_plain_dpo(runs):
  """train.margin_form="bonus" (z + lambda (C_l - C_w), the first [I] form): a pair with a costly
  loser starts near saturation, its weight sigmoid(-z) shrinks, and the harmful pairs move LESS
  than under plain DPO (and less than the clean ones): why "offset" is the default."""
  module, params, schedule = _model_and_schedule()
  batch = _pairs()
  empty = np.zeros((1, SEQ, DIM), np.float32)
  optimizer = optax.adam(LR)
  out = {}
  for form in ("bonus",):
    cfg = step_lib.StepConfig(beta=BETA, safety_mode="margin", caption_dropout=0.0,
                              margin_form=form)
    kw = dict(apply_fn=module.apply, ref_apply_fn=module.apply, schedule=schedule, cfg=cfg)
    train_step = jax.jit(step_lib.make_train_step(optimizer=optimizer, **kw))
    state = step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
        lam=jnp.asarray(LAM, jnp.float32), skipped=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(1))
    for _ in range(STEPS):
      state, _ = train_step(state, params, batch, empty)

    def one(key, p=state.params, kw=kw):
      rnd = step_lib.draw_randomness(key, batch, schedule.num_train_timesteps, 0.0)
      return step_lib.micro_batch_terms(p, params, {**batch, **rnd}, 0.0, 0.0,
                                        empty_states=empty, **kw)[1][1]["logit"]
    out[form] = np.asarray(jnp.mean(jax.vmap(one)(jax.random.split(jax.random.key(123), 16)),
                                    axis=0))
  h = batch["is_harmful"] == 1
  gain = out["bonus"] - runs["dpo"]["z"]  # lambda = 0 logits: the preference learned
  assert gain[h].mean() < -0.25 and gain[h].mean() < gain[~h].mean() - 0.25, (
      f"bonus minus plain DPO: harmful {gain[h].mean():+.2f}, clean {gain[~h].mean():+.2f}")
  with pytest.raises(ValueError, match="margin_form='plus'"):
    step_lib.StepConfig(margin_form="plus").validate()


def test_focus_on_preference_weights_pairs_by_the_logit_without_the_margin():
  """train.focus_on [I]: "logit" computes the focusing weight from z with the cost margin,
  "preference" from the DPO logit alone; the loss itself is the same (the bonus form, whose
  margin lowers the harmful pairs' weight under "logit")."""
  module, params, schedule = _model_and_schedule()
  policy = jax.tree.map(lambda x: x * 1.02, params)  # a policy that differs from the reference
  batch = _pairs()
  rnd = step_lib.draw_randomness(jax.random.key(5), batch, schedule.num_train_timesteps, 0.0)
  out = {}
  for focus_on in step_lib.FOCUS_ON:
    cfg = step_lib.StepConfig(beta=BETA, safety_mode="margin", caption_dropout=0.0,
                              margin_form="bonus", focus_on=focus_on)
    out[focus_on] = jax.tree.map(np.asarray, step_lib.micro_batch_terms(
        policy, params, {**batch, **rnd}, LAM, 2.0, apply_fn=module.apply,
        ref_apply_fn=module.apply, schedule=schedule, cfg=cfg,
        empty_states=np.zeros((1, SEQ, DIM), np.float32))[1][1])
  z = out["logit"]["logit"].astype(np.float64)
  z_pref = z - LAM * (batch["cost_l"] - batch["cost_w"])
  sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  np.testing.assert_allclose(out["logit"]["focus_weight"], (1 - sigmoid(z)) ** 2, rtol=1e-4)
  np.testing.assert_allclose(out["preference"]["focus_weight"], (1 - sigmoid(z_pref)) ** 2,
                             rtol=1e-4)
  np.testing.assert_allclose(out["preference"]["loss"], out["logit"]["loss"], rtol=1e-6)
  h = batch["is_harmful"] == 1  # the margin (> 0 only there) lowers their weight under "logit"
  assert np.all(out["preference"]["focus_weight"][h] > out["logit"]["focus_weight"][h])
  with pytest.raises(ValueError, match="focus_on='loss'"):
    step_lib.StepConfig(focus_on="loss").validate()
