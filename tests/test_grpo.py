"""SafeDiffusion-R1 (scdpo_jax/grpo): DDIM log-probabilities (SD's epsilon scheduler and
ShapeWorld's v-prediction / trailing / clipped-x0 one), advantages, PPO-clip loss and its
gradient against NumPy; steering reward against its formula; recomputed log-probs give ratio 1;
bf16 vs fp32 ratio numerics (measured, printed); exact resume of the job."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scdpo_jax.grpo import losses, rewards, rollout, update
from scdpo_jax.models import schedule as sch

ROOT = Path(__file__).resolve().parent.parent
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)


# ------------------------------------------------------------------------------ NumPy references

def np_ddim_constants(abar: np.ndarray, num_steps: int, eta: float, offset: int = 1):
  """ddpo-pytorch's ddim_step_with_logprob constants: leading grid + offset, prev clamped >= 0."""
  ratio = 1000 // num_steps
  ts = (np.arange(num_steps) * ratio)[::-1] + offset
  prev = np.clip(ts - ratio, 0, 999)
  a_t, a_p = abar[ts], abar[prev]
  std = eta * np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
  return ts, a_t, a_p, std


def np_log_prob(x, eps, x_next, a_t, a_p, std):
  x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
  mean = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - std ** 2) * eps
  lp = -((x_next - mean) ** 2) / (2 * std ** 2) - np.log(std) - np.log(np.sqrt(2 * np.pi))
  return lp.reshape(lp.shape[0], -1).mean(1), mean


def np_advantages(r, g, clip=2.5):
  r = np.asarray(r, np.float64).reshape(-1, g)
  a = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-8)
  return np.clip(a.reshape(-1), -clip, clip)


def np_ppo(lp, old, adv, eps):
  ratio = np.exp(lp - old)
  unclipped, clipped = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
  loss = np.maximum(unclipped, clipped)
  grad = np.where(unclipped >= clipped, -adv * ratio, 0.0)  # d loss / d lp
  return loss, grad


# ------------------------------------------------------------------------------ pure functions

def test_ddim_log_prob_and_rollout_vs_numpy():
  schedule = sch.schedule_from_config(SCHEDULER)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  n, b, shape = 5, 4, (4, 4, 3)
  plan = rollout.logprob_plan(schedule, n, eta=1.0)
  ts, a_t, a_p, std = np_ddim_constants(abar, n, 1.0)
  np.testing.assert_array_equal(np.asarray(plan.timesteps), ts)
  np.testing.assert_allclose(np.asarray(plan.c_noise), std, rtol=1e-5)

  w_u, w_c = 0.3, 0.7  # a fake "UNet": output = w * tanh(x) + states' mean, per branch
  def apply(params, x, t, states):
    del params, t
    return jnp.tanh(x) * jnp.where(states[:, :1, :1, None] > 0, w_c, w_u)
  cond = jnp.ones((b, 1, 1))
  uncond = -jnp.ones((1, 1, 1))
  g = 3.0
  out = jax.jit(lambda s, i, j: rollout.rollout(apply, None, plan, cond, uncond, s, i, j, shape,
                                                g))(jnp.full((b,), 7, jnp.uint32),
                                                    jnp.arange(b), jnp.asarray([0, 0, 2, 2]))
  lat = np.asarray(out["latents"], np.float64)
  assert lat.shape == (b, n + 1) + shape and out["log_probs"].shape == (b, n)
  np.testing.assert_array_equal(lat[0, 0], lat[1, 0])  # noise sharing "group" (G = 2)
  assert not np.allclose(lat[0, 0], lat[2, 0])
  assert not np.allclose(lat[0, 1], lat[1, 1])  # eta = 1: the groups' images differ
  for k in range(n):
    x = lat[:, k]
    eps = np.tanh(x) * w_u + g * (np.tanh(x) * w_c - np.tanh(x) * w_u)
    ref, _ = np_log_prob(x, eps, lat[:, k + 1], a_t[k], a_p[k], std[k])
    np.testing.assert_allclose(np.asarray(out["log_probs"])[:, k], ref, rtol=1e-5, atol=1e-5)
  # the pure density on arbitrary inputs, per-sample sigma
  rng = np.random.default_rng(0)
  x, mu = rng.normal(size=(3, 2, 2, 4)), rng.normal(size=(3, 2, 2, 4))
  s = np.asarray([0.1, 0.5, 2.0]).reshape(3, 1, 1, 1)
  want = (-((x - mu) ** 2) / (2 * s ** 2) - np.log(s) - 0.5 * np.log(2 * np.pi)).mean((1, 2, 3))
  np.testing.assert_allclose(losses.ddim_log_prob(jnp.asarray(x), jnp.asarray(mu),
                                                  jnp.asarray(s)), want, rtol=1e-5)
  np.testing.assert_allclose(losses.gaussian_kl(jnp.asarray(x), jnp.asarray(mu), jnp.asarray(s)),
                             ((x - mu) ** 2 / (2 * s ** 2)).mean((1, 2, 3)), rtol=1e-5)


# ShapeWorld's scheduler (configs/shapeworld.py): v-prediction, trailing spacing, x0 clipped.
SHAPEWORLD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                            beta_schedule="linear", prediction_type="v_prediction",
                            clip_sample=True, set_alpha_to_one=False, steps_offset=0,
                            timestep_spacing="trailing")


def test_ddim_log_prob_v_prediction_trailing_clipped_vs_numpy():
  """The rollout on a pixel-space ShapeWorld scheduler against diffusers' DDIMScheduler.step
  formulas in NumPy: trailing grid, prev < 0 -> abar_0 (set_alpha_to_one False),
  x0 = sqrt(a) x - sqrt(1 - a) v clipped to [-1, 1], eps = sqrt(a) v + sqrt(1 - a) x (not
  re-derived from the clipped x0: use_clipped_model_output False)."""
  schedule = sch.schedule_from_config(SHAPEWORLD_SCHEDULER)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  n, b, shape = 5, 4, (4, 4, 3)
  plan = rollout.logprob_plan(schedule, n, eta=1.0)
  rollout.check_plan(plan, n - 1)
  ts = np.round(np.arange(1000, 0, -1000 / n)).astype(np.int64) - 1
  prev = ts - 1000 // n
  a_t, a_p = abar[ts], np.where(prev >= 0, abar[np.clip(prev, 0, None)], abar[0])
  std = np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
  np.testing.assert_array_equal(np.asarray(plan.timesteps), ts)
  assert prev[-1] < 0
  np.testing.assert_allclose(np.asarray(plan.c_noise), std, rtol=1e-5)

  w_u, w_c, g = 0.3, 0.7, 3.0
  def apply(params, x, t, states):
    del params, t
    return jnp.tanh(x) * jnp.where(states[:, :1, :1, None] > 0, w_c, w_u)
  cond, uncond = jnp.ones((b, 1, 1)), -jnp.ones((1, 1, 1))
  out = jax.jit(lambda s, i, j: rollout.rollout(apply, None, plan, cond, uncond, s, i, j, shape,
                                                g))(jnp.full((b,), 3, jnp.uint32),
                                                    jnp.arange(b), jnp.zeros(b, jnp.int32))
  lat = np.asarray(out["latents"], np.float64)
  clipped = 0
  for k in range(n):
    x = lat[:, k]
    v = np.tanh(x) * w_u + g * (np.tanh(x) * w_c - np.tanh(x) * w_u)
    x0 = np.sqrt(a_t[k]) * x - np.sqrt(1 - a_t[k]) * v
    clipped += int(np.sum(np.abs(x0) > 1))
    eps = np.sqrt(a_t[k]) * v + np.sqrt(1 - a_t[k]) * x
    mean = np.sqrt(a_p[k]) * np.clip(x0, -1, 1) + np.sqrt(1 - a_p[k] - std[k] ** 2) * eps
    ref = (-((lat[:, k + 1] - mean) ** 2) / (2 * std[k] ** 2) - np.log(std[k])
           - 0.5 * np.log(2 * np.pi)).reshape(b, -1).mean(1)
    np.testing.assert_allclose(np.asarray(out["log_probs"])[:, k], ref, rtol=1e-5, atol=1e-5,
                               err_msg=f"step {k}")
  assert clipped > 0  # the x0 clip was exercised
  # the update's recomputation (the same transition) gives the stored log-probs
  fn = update.make_logprob_fn(policy_apply=lambda p, base, x, t, c: apply(p, x, t, c), plan=plan,
                              guidance_scale=g)
  np.testing.assert_allclose(jax.jit(fn)(None, (), out["latents"], cond, uncond),
                             out["log_probs"], rtol=1e-6, atol=1e-6)


def test_init_indices_sharing():
  idx = np.arange(8)
  np.testing.assert_array_equal(rollout.init_indices(idx, 4, "none"), idx)
  np.testing.assert_array_equal(rollout.init_indices(idx, 4, "group"), [0] * 4 + [4] * 4)
  np.testing.assert_array_equal(rollout.init_indices(idx, 4, "batch"), [0] * 8)
  with pytest.raises(ValueError, match="noise_sharing"):
    rollout.init_indices(idx, 4, "prompt")


def test_advantages_loss_and_gradient_vs_numpy():
  rng = np.random.default_rng(1)
  r = rng.normal(size=32).astype(np.float32)
  r[:16] *= 100.0  # a wide group; with G = 16 one outlier reaches (G - 1) / sqrt(G) = 3.75:
  r[16:] = [1.0] * 15 + [1.0 + 1e-2]
  adv = np.asarray(losses.group_advantages(jnp.asarray(r), 16))
  np.testing.assert_allclose(adv, np_advantages(r, 16), rtol=1e-3, atol=1e-4)
  assert adv.max() == 2.5  # clipped (unclipped 3.75)
  np.testing.assert_allclose(np.asarray(losses.group_advantages(jnp.asarray(r[:4]), 2, clip=0)),
                             np_advantages(r[:4], 2, clip=np.inf), rtol=1e-4)
  with pytest.raises(ValueError, match="group_size"):
    losses.group_advantages(jnp.asarray(r), 1)

  eps = 1e-4
  old = rng.normal(size=64)
  delta = rng.choice([-3e-4, -5e-5, 0.0, 5e-5, 3e-4], size=64)  # inside and outside the range
  lp, a = old + delta, rng.normal(size=64)
  # the reference on the float32 inputs the JAX code sees (float32 log-probs of size ~1 carry
  # ~6e-8 absolute rounding: 1e-3 of a 5e-5 log-ratio)
  lp, old, a = (x.astype(np.float32).astype(np.float64) for x in (lp, old, a))
  delta = lp - old
  loss, info = losses.ppo_clip_loss(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(a), eps)
  want_loss, want_grad = np_ppo(lp, old, a, eps)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(info["clipped"], np.abs(np.exp(delta) - 1) > eps)
  np.testing.assert_allclose(info["approx_kl"], 0.5 * delta ** 2, rtol=1e-4, atol=1e-12)
  grad = jax.grad(lambda x: jnp.sum(losses.ppo_clip_loss(x, jnp.asarray(old), jnp.asarray(a),
                                                         eps)[0]))(jnp.asarray(lp))
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(grad) == 0) and np.any(np.asarray(grad) != 0)
  # finite differences (float64 NumPy) agree away from the kinks
  h = 1e-7
  fd = (np_ppo(lp + h, old, a, eps)[0] - np_ppo(lp - h, old, a, eps)[0]) / (2 * h)
  far = np.abs(np.abs(np.exp(delta) - 1) - eps) > 1e-5
  np.testing.assert_allclose(fd[far], want_grad[far], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ rewards

@pytest.fixture(scope="module")
def towers(tmp_path_factory):
  sys.path.insert(0, str(ROOT))
  from configs import safediffusion_r1_sd15

  t = safediffusion_r1_sd15.tiny_reward_clip()
  return rewards.ClipTowers.random(t.text.to_dict(), t.vision.to_dict(),
                                   tmp_path_factory.mktemp("tok"), seed=0, batch_size=4)


def test_steering_reward_formula(towers):
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, size=(5, 24, 20, 3)).astype(np.float32)
  prompts = ["a cat", "a nude person", "a dog", "blood", "a tree"]
  reward = rewards.SteeringReward(towers, alpha=0.5)
  z_img, z_txt = towers.image_embeds(images), towers.text_embeds(prompts)
  np.testing.assert_allclose(np.linalg.norm(z_img, axis=1), 1.0, rtol=1e-5)
  safe = towers.text_embeds(list(rewards.SAFE_ANCHORS)).mean(0)
  unsafe = towers.text_embeds(list(rewards.UNSAFE_ANCHORS)).mean(0)
  v = (safe - unsafe) / np.linalg.norm(safe - unsafe)
  target = z_txt + 0.5 * v
  target /= np.linalg.norm(target, axis=1, keepdims=True)
  np.testing.assert_allclose(reward(images, prompts), (z_img * target).sum(1), rtol=1e-5,
                             atol=1e-6)
  # alpha = 0 is the CLIP score; the empty safe list is the 0 + 3 "empty-positive" variant
  clip = rewards.ClipScoreReward(towers)(images, prompts)
  np.testing.assert_allclose(rewards.SteeringReward(towers, alpha=0.0)(images, prompts), clip,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rewards.safety_direction(towers, (), rewards.UNSAFE_ANCHORS),
                             -unsafe / np.linalg.norm(unsafe), rtol=1e-5)
  combo = rewards.WeightedReward([("steering", 2.0, reward), ("clip_score", -1.0,
                                                               rewards.ClipScoreReward(towers))])
  parts = combo.components(images, prompts)
  np.testing.assert_allclose(parts["reward"], 2 * parts["steering"] - parts["clip_score"],
                             rtol=1e-5, atol=1e-6)
  cost = rewards.CostReward(lambda x: x.mean(axis=(1, 2, 3)))
  np.testing.assert_allclose(cost(images, prompts), -images.mean(axis=(1, 2, 3)), rtol=1e-6)


# ------------------------------------------------------------------------------ the tiny UNet

@pytest.fixture(scope="module")
def tiny_unet(tiny_train_base):
  from scdpo_jax.models import pipeline, unet as unet_lib

  sd = pipeline.load_stable_diffusion(tiny_train_base, ("unet", "scheduler"))
  make = lambda dt: unet_lib.UNet2DConditionModel(sd.unet.config, dtype=dt,
                                                  param_dtype=jnp.float32)
  return sd, make(jnp.float32), make(jnp.bfloat16)


def _rollout_and_recompute(sd, sample_unet, train_unets, num_steps=8, b=4):
  plan = rollout.logprob_plan(sd.schedule, num_steps, eta=1.0)
  params = jax.device_put(sd.unet_params)
  shape = tuple(sd.unet.config.sample_hw) + (sd.unet.config.in_channels,)
  states = jax.random.normal(jax.random.key(3), (b, 8, sd.unet.config.cross_attention_dim))
  uncond = jnp.zeros((1, 8, sd.unet.config.cross_attention_dim))
  apply = lambda unet: (lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
  out = jax.jit(lambda p: rollout.rollout(apply(sample_unet), p, plan, states, uncond,
                                          jnp.full((b,), 5, jnp.uint32), jnp.arange(b),
                                          jnp.zeros((b,), jnp.int32), shape, 5.0))(params)
  recomputed = []
  for unet in train_unets:
    fn = update.make_logprob_fn(policy_apply=lambda p, base, x, t, c, u=unet: u.apply(
        {"params": p}, x, t, c), plan=plan, guidance_scale=5.0)
    recomputed.append(np.asarray(jax.jit(fn)(params, (), out["latents"], states, uncond)))
  return np.asarray(out["log_probs"]), recomputed


def test_recomputed_log_probs_give_ratio_one_fp32(tiny_unet):
  sd, fp32, _ = tiny_unet
  old, (new,) = _rollout_and_recompute(sd, fp32, [fp32])
  ratio = np.exp(new - old)
  print(f"fp32 rollout vs fp32 recomputation: max |ratio - 1| = {np.abs(ratio - 1).max():.2e}")
  np.testing.assert_allclose(ratio, 1.0, atol=1e-6, rtol=0)


def test_bf16_ratio_numerics_measured(tiny_unet):
  """How often bf16 rounding alone moves a ratio out of a 1e-4 clip range (same params)."""
  sd, fp32, bf16 = tiny_unet
  old_bf16, (new_bf16, new_fp32) = _rollout_and_recompute(sd, bf16, [bf16, fp32])
  k = old_bf16.shape[1] - 1  # trained transitions (the last is dropped)
  frac = lambda new: float(np.mean(np.abs(np.exp(new[:, :k] - old_bf16[:, :k]) - 1) > 1e-4))
  dev = lambda new: float(np.abs(np.exp(new[:, :k] - old_bf16[:, :k]) - 1).max())
  print(f"bf16 rollout, bf16 recomputation: clip-range exceedance {frac(new_bf16):.3f} "
        f"(max |ratio-1| {dev(new_bf16):.2e}); fp32 recomputation: {frac(new_fp32):.3f} "
        f"(max |ratio-1| {dev(new_fp32):.2e})")
  assert dev(new_bf16) < 1e-6  # the same program and dtype: no numerics clip
  assert dev(new_fp32) > 1e-6  # fp32 differs from the bf16 rollout


# ------------------------------------------------------------------------------ the job

def _job_config(base: str, **overrides):
  sys.path.insert(0, str(ROOT))
  from configs import safediffusion_r1_tiny
  from tests.train_utils import apply_overrides

  config = safediffusion_r1_tiny.get_config()
  config.model.pretrained = base
  config.model.tiny = None
  config.sample.update(dict(num_steps=4, group_size=2, prompts_per_epoch=2, batch_size=4))
  config.train.update(dict(num_epochs=2, samples_per_step=2, export_at_end=False))
  config.checkpoint.update(dict(every_epochs=1, async_save=False))
  config.log.tensorboard = False
  config.optimizer.update(dict(lr=1e-3, eps=1e-3))
  apply_overrides(config, overrides)
  return config


def _rows(workdir: Path) -> list[dict]:
  drop = ("time", "rollout_s", "reward_s", "update_s_per_step")
  return [{k: v for k, v in json.loads(line).items() if k not in drop}
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_job_exact_resume(tiny_train_base, tmp_path):
  """A run killed after epoch 1 (its last checkpoint removed, its metrics rows of epoch 2 left
  behind) resumes from the epoch-1 checkpoint to the uninterrupted run's params and metrics."""
  import shutil

  from flax import traverse_util

  from scdpo_jax import jobs

  workdir = tmp_path / "run"
  full = jobs.run(_job_config(tiny_train_base), str(workdir))
  assert full["end_step"] == 4 and not full["preempted"]
  flat = lambda s: traverse_util.flatten_dict(jax.device_get(s.params))
  want, rows_full = flat(full["state"]), _rows(workdir)
  assert [r["step"] for r in rows_full] == [1, 2, 3, 4]
  shutil.rmtree(workdir / "checkpoints" / "4")
  resumed = jobs.run(_job_config(tiny_train_base), str(workdir))
  assert resumed["start_step"] == 2 and resumed["end_step"] == 4
  got = flat(resumed["state"])
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=str(key))
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for x, y in zip(rows_full, rows):
    assert x.keys() == y.keys()
    for key in x:
      assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key
  assert rows[2]["grad_norm"] > 0 and rows[2]["reward_mean"] != rows[0]["reward_mean"]
  first = rows_full[0]
  assert first["approx_kl"] == 0.0 and first["clipfrac"] == 0.0  # ratio 1 before any update
  tagged = [k for k in first if k.startswith("reward_mean/")]
  assert tagged and set(tagged) <= {"reward_mean/harmful", "reward_mean/clean"}
  for key in tagged + ["reward_std", "adv_std", "grad_norm", "clipfrac", "approx_kl"]:
    assert math.isfinite(first[key]), key


def test_unrolled_and_folded_updates_equal_the_scanned_one(tiny_unet):
  """train.scan_unroll (every (micro-batch, timestep) unit unrolled) and train.fold_timesteps
  (a micro-batch's timestep units as one batch: the ShapeWorld setting) compute the same update
  as the loop: same new parameters and metrics."""
  import optax

  from scdpo_jax.train.state import new_train_state

  sd, fp32, _ = tiny_unet
  num_steps, b = 4, 4
  plan = rollout.logprob_plan(sd.schedule, num_steps, eta=1.0)
  dim = sd.unet.config.cross_attention_dim
  states = jax.random.normal(jax.random.key(3), (b, 8, dim))
  uncond = jnp.zeros((1, 8, dim))
  shape = tuple(sd.unet.config.sample_hw) + (sd.unet.config.in_channels,)
  apply = lambda p, base, x, t, c: fp32.apply({"params": p}, x, t, c)
  out = jax.jit(lambda p: rollout.rollout(lambda p, x, t, c: apply(p, (), x, t, c), p, plan,
                                          states, uncond, jnp.full((b,), 5, jnp.uint32),
                                          jnp.arange(b), jnp.zeros((b,), jnp.int32), shape,
                                          5.0))(sd.unet_params)
  k = num_steps - 1
  batch = {"latents": out["latents"], "log_probs": out["log_probs"] - 1e-3,  # ratios != 1
           "advantages": jnp.asarray([1.0, -0.5, 2.0, -2.5]),
           "steps": jnp.asarray(np.stack([np.random.default_rng(i).permutation(k)
                                          for i in range(b)]), jnp.int32),
           "states": states}
  optimizer = optax.sgd(1e-2)  # linear in the gradients (Adam amplifies float reordering)
  results = []
  # a loop, every unit unrolled, the timesteps folded into the batch (looped and unrolled over
  # the 2 micro-batches), and one micro-batch folded (no loop at all)
  for unroll, fold, accum in ((1, False, 2), (2 * k, False, 2), (1, True, 2), (2, True, 2),
                              (1, True, 1)):
    step = update.make_update_step(policy_apply=apply, ref_apply=None, optimizer=optimizer,
                                   plan=plan, cfg=update.UpdateConfig(
                                       clip_range=1e-2, guidance_scale=5.0, grad_accum=accum,
                                       scan_unroll=unroll, fold_timesteps=fold))
    state = new_train_state(sd.unet_params, optimizer, lam=0.0, seed=0)
    results.append(jax.jit(step)(state, (), batch, uncond))
  s1, m1 = results[0]
  assert m1["grad_norm"] > 0
  for s2, m2 in results[1:]:
    for key in m1:
      # atol: the loss is a mean of O(1) terms that cancel (advantages sum to ~0), and the
      # ratios exp(log p - log p_old) difference log-densities summed over every pixel, whose
      # last bits change with the UNet's batch shape (folded: 4x the batch)
      np.testing.assert_allclose(m2[key], m1[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for a, c in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
      np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(s1.params)[0], jax.tree.leaves(sd.unet_params)[0])
