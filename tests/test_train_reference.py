"""One SC-DPO train step against an independent PyTorch transcription (CPU, fp32).

The same batch, timesteps, noise and caption-dropout flags go through a tiny diffusers
`UNet2DConditionModel` pair (policy and reference with different random weights) and a
hand-written PyTorch transcription of the loss with the semantics of the public Diffusion-DPO
`train.py` (Salesforce/DiffusionDPO): per-sample MSE averaged over C, H, W; `model_diff = m_w -
m_l`, `ref_diff = r_w - r_l` under `no_grad`; `inside = -0.5 * beta * (model_diff - ref_diff)`;
`loss = -logsigmoid(inside).mean()`; SFT = winner MSE. On top of it the SC-DPO forms written
from ../shared/docs/method.md 2.2/2.4: cost margin `inside -= lam * (C_l - C_w)` (`offset`, the
default; `bonus` adds it), relabelling
(swap where `r_l - lam C_l > r_w - lam C_w`), dual ascent `lam <- clip(lam + lr (E[C] - d), 0,
lam_max)` with `E[C] = mean(sigmoid(z) C_w + (1 - sigmoid(z)) C_l)`, and Dynamic Focusing
`w = (1 - sigmoid(z))^gamma` (detached; z without the margin by default, `focus_on="logit"`
with it), `loss = sum(w nll) / sum(w)`. Diffusion-SDPO
(`train.sdpo_mu`) transcribed from AIDC-AI/Diffusion-SDPO `train.py`: lambda from torch autograd
gradients of the winner / loser output-space MSEs (`get_adaptive_lose_l_scale`), per micro-batch,
and `model_losses_l_scaled = m_l.detach() + lambda (m_l - m_l.detach())` in the logit; its
cases run on the toy model only, as does the winner likelihood term (`train.sft_weight`: `loss +=
alpha * mean(m_w)`, outside the focusing weights; with two micro-batches, whose gradients the step
accumulates apart, and with one).

Compared: our step's loss and metrics, per-pair logits (`micro_batch_terms`) and parameter
gradients (torch autograd, moved to our layout by `scdpo_jax.models.convert`). Gradients are
read exactly from the real jitted `train_step` through an optimizer whose state is the last
gradient. Two model pairs: the tiny diffusers UNet, and a one-conv toy denoiser (same step and
loss code; it compiles in about a second, so tests/mutation_check.py runs its cases).

Tolerance, relative to the largest value compared (fp32): UNet 2e-5, measured (2-core CPU)
loss <= 8e-7, per-pair logits <= 6e-6 (1.07e-5 in one case on another 2-core machine, which
failed the earlier 1e-5), gradients <= 6e-6; toy 5e-5, measured gradients
<= 1.4e-5 (its few parameters each sum the whole batch, with cancellation between winner and
loser). `pytest -s` prints the errors per case. Every configuration is compiled once and shared
by its cases: gamma is ramped (`gamma_ramp_steps`), so one program gives gamma = 0 at step 0
and gamma > 0 later.
"""

from __future__ import annotations

import functools
import types

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from scdpo_jax.errors import ConfigError
from scdpo_jax.models import convert, schedule as sch
from scdpo_jax.models.layers import abstract_params
from scdpo_jax.models.unet import UNet2DConditionModel
from scdpo_jax.models.unet_config import UNetConfig
from scdpo_jax.train import step as step_lib
from tests.torch_refs import nchw_to_nhwc, nhwc_to_nchw

TOL = {"unet": 2e-5, "toy": 5e-5}  # relative; see the module docstring
N_PAIRS, SEQ, DIM, SIZE = 8, 7, 32, 8
UNET = dict(sample_size=SIZE, in_channels=4, out_channels=4, block_out_channels=(32,),
            layers_per_block=1, cross_attention_dim=DIM, attention_head_dim=4,
            down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
# (cross-attention in the mid block only: the text conditioning, caption dropout included, goes
# through attention; the fewer blocks keep each compile ~13 s of CPU on a 2-core machine)
# Small beta: the tiny random policies and references differ by O(0.1) in MSE, so these betas
# give logits of order 1 on both sides of 0 (beta = 5000 would saturate every sigmoid).
BETA = {"unet": 10.0, "toy": 10.0}
LAM = 1.5
CAPTION_DROPOUT = 0.3
GAMMA, RAMP = 2.0, 4  # gamma ramps 0 -> 2 over 4 steps: step 0 gives 0, step 2 gives 1, 4+ give 2
DUAL = dict(cost_budget=0.2, dual_lr=0.7, lam_max=2.0)
# cheap: the UNet cases check the same code
ONLY_TOY = ("sdpo_none", "sdpo_margin_accum2", "margin_sft_accum2", "margin_sft_unnorm",
            "margin_sft")


def _torch_unet(seed):
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**UNET)
  with torch.no_grad():  # random (not zero-initialised) weights everywhere
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.train()


class ToyDenoiser(nn.Module):
  """A denoiser that compiles in about a second (for the mutation check's fast cases):
  tanh(conv3x3(x)) scaled by a timestep embedding, shifted by a pooled text embedding (NHWC)."""

  @nn.compact
  def __call__(self, x, t, states):
    h = jnp.tanh(nn.Conv(4, (3, 3), padding=1, name="conv")(x))
    temb = nn.Dense(4, name="time")(t.astype(jnp.float32)[:, None] / 1000.0)
    text = nn.Dense(4, name="text")(states.mean(axis=1))
    return h * (1.0 + temb[:, None, None, :]) + text[:, None, None, :]


class TorchToyDenoiser(torch.nn.Module):
  """`ToyDenoiser` in PyTorch (NCHW), called like a diffusers UNet."""

  def __init__(self, seed, scale=1.0):
    super().__init__()
    torch.manual_seed(seed)
    self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    self.time = torch.nn.Linear(1, 4)
    self.text = torch.nn.Linear(DIM, 4)
    with torch.no_grad():
      for p in self.parameters():
        p.mul_(scale)

  def forward(self, x, t, encoder_hidden_states):
    h = torch.tanh(self.conv(x))
    temb = self.time(t.float()[:, None] / 1000.0)
    text = self.text(encoder_hidden_states.mean(dim=1))
    return types.SimpleNamespace(sample=h * (1.0 + temb[:, :, None, None])
                                 + text[:, :, None, None])


class _Models:
  """Torch policy/reference, our module and both parameter trees, the schedule, a batch.

  kind "unet": the tiny diffusers UNet2DConditionModel and ours; "toy": `ToyDenoiser`.
  """

  def __init__(self, kind: str):
    self.kind, self.beta = kind, BETA[kind]
    self.cfgs = _configs(self.beta)
    self.scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon")
    self.schedule = sch.schedule_from_config(dict(self.scheduler.config))
    if kind == "unet":
      self.policy_t, self.ref_t = _torch_unet(1), _torch_unet(2)
      self.module = UNet2DConditionModel(UNetConfig.from_dict(dict(self.policy_t.config)))
      self.shapes = abstract_params(self.module)
    else:
      # a reference far from the policy: per-pair MSE differences well above fp32 rounding
      self.policy_t, self.ref_t = TorchToyDenoiser(1), TorchToyDenoiser(2, scale=3.0)
      self.module = ToyDenoiser()
      self.shapes = jax.eval_shape(self.module.init, jax.random.key(0),
                                   jnp.zeros((1, SIZE, SIZE, 4)), jnp.zeros((1,), jnp.int32),
                                   jnp.zeros((1, SEQ, DIM)))["params"]
    self.params = self.to_flax(self.policy_t.state_dict())
    self.ref_params = self.to_flax(self.ref_t.state_dict())

    rng = np.random.default_rng(0)
    n = N_PAIRS
    harmful = np.array([1, 0] * (n // 2), np.int32)
    prompts = rng.standard_normal((2, SEQ, DIM)).astype(np.float32)  # one "harmful", one clean
    self.batch = {
        "latents_w": rng.standard_normal((n, SIZE, SIZE, 4)).astype(np.float32),
        "latents_l": rng.standard_normal((n, SIZE, SIZE, 4)).astype(np.float32),
        "text_states": prompts[1 - harmful] + 0.1 * rng.standard_normal(
            (n, SEQ, DIM)).astype(np.float32),
        "is_harmful": harmful,
        # Harmful pairs (even rows) mostly have a costly loser, one has a costly winner: the
        # margin takes both signs and relabelling swaps some pairs and keeps others.
        "cost_w": np.where(harmful, np.repeat([0.1, 0.05, 0.9, 0.1], 2),
                           0.05 * rng.random(n)).astype(np.float32),
        "cost_l": np.where(harmful, np.repeat([0.9, 0.8, 0.2, 0.7], 2),
                           0.05 * rng.random(n)).astype(np.float32),
        "reward_w": rng.standard_normal(n).astype(np.float32),
        "reward_l": rng.standard_normal(n).astype(np.float32),
    }
    self.empty_states = rng.standard_normal((1, SEQ, DIM)).astype(np.float32)

  def to_flax(self, torch_tree):
    return convert.torch_to_flax({k: v.detach().cpu().numpy() for k, v in torch_tree.items()},
                                 self.shapes, source="torch")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  # On a small shared CPU, torch's thread pool competing with XLA's makes the reference 10-50x
  # slower.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@functools.cache
def _models(kind: str) -> _Models:
  return _Models(kind)


@pytest.fixture(scope="module")
def models():
  return _models("unet")


def _capture_grads() -> optax.GradientTransformation:
  """An optimizer whose state is the last gradient it saw (params stay as they are): reads the
  exact gradient out of the real jitted train step."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


# ----------------------------------------------------------------------------- PyTorch reference

def torch_sdpo_lambda(model_pred, target, mu, eps=1e-9):
  """Diffusion-SDPO's loser scale (AIDC-AI/Diffusion-SDPO train.py, get_adaptive_lose_l_scale):
  `model_pred`, `target` are [winners; losers] along the batch axis. Output-space proxies A, B =
  mean squared error of each half; their gradients w.r.t. the half's prediction by autograd;
  lambda = clamp((1 - mu) |gA|^2 / (gB . gA + eps), 0, 1) where gB . gA > 0, else 1; detached."""
  assert 0.0 <= mu <= 1.0
  pred_w, pred_l = model_pred.detach().requires_grad_(True).chunk(2)
  tgt_w, tgt_l = target.detach().chunk(2)
  grad_a, = torch.autograd.grad((pred_w - tgt_w).pow(2).mean(), pred_w)
  grad_b, = torch.autograd.grad((pred_l - tgt_l).pow(2).mean(), pred_l)
  num = grad_a.flatten().pow(2).sum()
  den = (grad_b.flatten() * grad_a.flatten()).sum()
  lam = torch.where(den > 0, (1.0 - mu) * num / (den + eps), torch.ones_like(den))
  return lam.clamp(0.0, 1.0).detach()


def torch_step(m: _Models, *, t, noise, drop, lam, gamma, cfg: step_lib.StepConfig,
               policy=None, reference=None):
  """Loss, per-pair logits, gradients (torch layout, by parameter name), lambda after the step.

  A transcription of Salesforce/DiffusionDPO train.py (noise and timestep shared by the halves,
  `model_pred` on the concatenated [winner; loser] batch) plus the SC-DPO forms.
  """
  policy = m.policy_t if policy is None else policy
  reference = m.ref_t if reference is None else reference
  tt = lambda x: torch.from_numpy(np.array(x))  # a writable copy
  b = {k: tt(v) for k, v in m.batch.items()}
  x0_w, x0_l = (tt(nhwc_to_nchw(m.batch[k])) for k in ("latents_w", "latents_l"))
  cost_w, cost_l = b["cost_w"], b["cost_l"]
  if cfg.safety_mode == "relabel":
    swap = (b["reward_l"] - lam * cost_l) > (b["reward_w"] - lam * cost_w)
    s4 = swap[:, None, None, None]
    x0_w, x0_l = torch.where(s4, x0_l, x0_w), torch.where(s4, x0_w, x0_l)
    cost_w, cost_l = torch.where(swap, cost_l, cost_w), torch.where(swap, cost_w, cost_l)
  # proportion_empty_prompts: dropped pairs condition on the empty prompt's states.
  states = torch.where(tt(drop)[:, None, None], tt(m.empty_states), b["text_states"])

  latents = torch.cat([x0_w, x0_l])
  noise = tt(nhwc_to_nchw(np.asarray(noise))).repeat(2, 1, 1, 1)
  timesteps = tt(t).long().repeat(2)
  noisy = m.scheduler.add_noise(latents, noise, timesteps)
  target = noise  # epsilon prediction
  hidden = states.repeat(2, 1, 1)

  policy.zero_grad()
  model_pred = policy(noisy, timesteps, encoder_hidden_states=hidden).sample
  if cfg.loss_type == "sft":
    half = model_pred.shape[0] // 2
    loss = F.mse_loss(model_pred[:half].float(), target[:half].float(), reduction="mean")
    inside = torch.full((half,), float("nan"))
  else:
    model_losses = (model_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    lose_scale = torch.ones_like(model_losses_l)
    if cfg.sdpo_mu > 0:
      # one lambda per micro-batch (rows i, i + accum, ... as in our step) on its pairs
      n = model_losses_l.shape[0]
      for i in range(cfg.grad_accum):
        rows = torch.arange(i, n, cfg.grad_accum)
        both = torch.cat([rows, rows + n])
        lose_scale[rows] = torch_sdpo_lambda(model_pred[both], target[both], cfg.sdpo_mu)
      model_losses_l = (model_losses_l.detach()
                        + lose_scale * (model_losses_l - model_losses_l.detach()))
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
      ref_pred = reference(noisy, timesteps, encoder_hidden_states=hidden).sample.detach()
      ref_losses = (ref_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
      ref_losses_w, ref_losses_l = ref_losses.chunk(2)
      ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * cfg.beta
    inside = preference = scale_term * (model_diff - ref_diff)
    if cfg.safety_mode in ("margin", "dual"):
      sign = 1.0 if cfg.margin_form == "bonus" else -1.0
      inside = inside + sign * lam * (cost_l - cost_w)
    hardness = inside if cfg.focus_on == "logit" else preference
    weight = ((1.0 - torch.sigmoid(hardness)) ** gamma).detach()
    nll = -F.logsigmoid(inside)
    loss = (weight * nll).sum() / (weight.sum() if cfg.focus_normalize else weight.shape[0])
    if cfg.sft_weight > 0:  # the winner likelihood term, outside the focusing weights
      loss = loss + cfg.sft_weight * model_losses_w.mean()
  loss.backward()
  grads = {name: p.grad.detach().clone() for name, p in policy.named_parameters()}
  new_lam = lam
  if cfg.safety_mode == "dual":
    p = torch.sigmoid(inside.detach())
    expected_cost = (p * cost_w + (1 - p) * cost_l).mean()
    new_lam = float(torch.clamp(lam + cfg.dual_lr * (expected_cost - cfg.cost_budget), 0.0,
                                cfg.lam_max))
  return {"loss": float(loss.detach()), "logit": inside.detach().numpy(), "grads": grads,
          "lam": new_lam, "nll": None if cfg.loss_type == "sft" else nll.detach().numpy(),
          "sdpo_lambda": None if cfg.sdpo_mu == 0 else lose_scale.numpy()}


# ----------------------------------------------------------------------------- our step, compiled once

def _configs(beta: float) -> dict[str, step_lib.StepConfig]:
  common = dict(beta=beta, caption_dropout=CAPTION_DROPOUT)
  ramp = dict(gamma=GAMMA, gamma_ramp_steps=RAMP)
  return {
      "none": step_lib.StepConfig(safety_mode="none", **ramp, **common),
      # micro-batches of 4 against the torch loss on all 8 pairs: the sum(w) normalisation and
      # the gradient sum must be exact across micro-batches
      "relabel_accum2": step_lib.StepConfig(safety_mode="relabel", grad_accum=2, **ramp,
                                            **common),
      "margin": step_lib.StepConfig(safety_mode="margin", **ramp, **common),
      # with the unnormalised focusing loss sum(w nll) / B
      # the first [I] forms (cost margin added, focusing on the full logit) with dual ascent
      "dual_unnorm": step_lib.StepConfig(safety_mode="dual", focus_normalize=False, **ramp,
                                         margin_form="bonus", focus_on="logit", **DUAL,
                                         **common),
      "sft": step_lib.StepConfig(loss_type="sft", safety_mode="none", **common),
      # Diffusion-SDPO on plain DPO (the released SD1.5 mu) and on the SC-DPO margin form with
      # focusing and two micro-batches (one lambda each; the SDXL mu)
      "sdpo_none": step_lib.StepConfig(safety_mode="none", sdpo_mu=0.9, **common),
      "sdpo_margin_accum2": step_lib.StepConfig(safety_mode="margin", grad_accum=2, sdpo_mu=0.6,
                                                **ramp, **common),
      # the winner likelihood term (+ alpha m_w per pair) on the margin form with focusing and
      # two micro-batches; alpha = 0.5 beta, DPO's own pull on m_w at z = 0
      "margin_sft_accum2": step_lib.StepConfig(safety_mode="margin", grad_accum=2,
                                               sft_weight=0.5 * beta, **ramp, **common),
      "margin_sft": step_lib.StepConfig(safety_mode="margin", sft_weight=0.5 * beta, **ramp,
                                        **common),
      "margin_sft_unnorm": step_lib.StepConfig(safety_mode="margin", sft_weight=0.5 * beta,
                                               focus_normalize=False, **ramp, **common),
  }


REF_GRAD = "margin"  # the config whose program also differentiates terms w.r.t. the reference


@functools.cache
def _compiled(m: _Models, name: str):
  """One jitted program per config, shared by its cases:

  (state, ref_params, batch, empty_states, randomness, gamma) -> (new_state, metrics, per-pair
  outputs of `micro_batch_terms` on the whole batch, its gradient w.r.t. the reference params
  or None).
  """
  cfg = m.cfgs[name]
  kw = dict(apply_fn=m.module.apply, ref_apply_fn=m.module.apply, schedule=m.schedule, cfg=cfg)
  train_step = step_lib.make_train_step(optimizer=_capture_grads(), **kw)

  def run(state, ref_params, batch, empty_states, rnd, gamma):
    new_state, metrics = train_step(state, ref_params, batch, empty_states)
    terms = lambda p, r: step_lib.micro_batch_terms(p, r, {**batch, **rnd}, state.lam, gamma,
                                                    empty_states=empty_states, **kw)
    per_pair = terms(state.params, ref_params)[1][1]
    ref_grad = (jax.grad(lambda r: terms(state.params, r)[0])(ref_params) if name == REF_GRAD
                else None)
    return new_state, metrics, per_pair, ref_grad

  return jax.jit(run)


def _state(m: _Models, step: int, lam: float, seed: int = 0) -> step_lib.TrainState:
  return step_lib.TrainState(
      step=jnp.asarray(step, jnp.int32), params=m.params,
      opt_state=jax.tree.map(jnp.zeros_like, m.params), lam=jnp.asarray(lam, jnp.float32),
      skipped=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed))


def _randomness(m: _Models, state, cfg):
  """What the step draws: `draw_randomness(fold_in(rng, step), ...)` (the documented contract)."""
  return step_lib.draw_randomness(jax.random.fold_in(state.rng, state.step), m.batch,
                                  m.schedule.num_train_timesteps, cfg.caption_dropout)


def _rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _grad_err(m: _Models, ours_tree, torch_grads) -> tuple[float, float]:
  """(max |ours - torch| over all parameters / max |torch grad|, max |torch grad|)."""
  ref_tree = m.to_flax(torch_grads)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b))),
                       ours_tree, ref_tree)
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(ref_tree))
  return max(jax.tree.leaves(diffs)) / scale, scale


CASES = [  # (config, step, gamma at that step): gamma ramps 0 -> GAMMA over RAMP steps
    ("none", 0, 0.0), ("none", RAMP, GAMMA),
    ("relabel_accum2", 0, 0.0), ("relabel_accum2", RAMP + 3, GAMMA),
    ("margin", 0, 0.0), ("margin", RAMP // 2, GAMMA / 2),
    ("dual_unnorm", 0, 0.0), ("dual_unnorm", RAMP, GAMMA),
    ("sft", 0, 0.0),
    ("sdpo_none", 0, 0.0), ("sdpo_margin_accum2", 0, 0.0), ("sdpo_margin_accum2", RAMP, GAMMA),
    ("margin_sft_accum2", RAMP, GAMMA), ("margin_sft", RAMP, GAMMA),
    ("margin_sft_unnorm", RAMP, GAMMA),
]
ERRORS = {}  # measured relative errors, printed at the end of the module
PARAMS = [pytest.param(kind, name, step, gamma, id=f"{name}-step{step}-{kind}")
          for kind in ("unet", "toy") for name, step, gamma in CASES
          if kind == "toy" or name not in ONLY_TOY]


@pytest.mark.parametrize("kind,name,step,gamma", PARAMS)
def test_train_step_matches_torch_reference(kind, name, step, gamma):
  """kind "unet": the tiny diffusers UNet; "toy": a one-conv denoiser (the same step and loss
  code; compiles in a second, so tests/mutation_check.py runs these cases)."""
  m = _models(kind)
  cfg = m.cfgs[name]
  state = _state(m, step, LAM, seed=step)
  rnd = _randomness(m, state, cfg)
  drop = np.asarray(rnd["drop_caption"])
  assert 0 < drop.sum() < N_PAIRS, "the draw must drop some captions and keep others"

  new_state, metrics, per_pair, ref_grad = _compiled(m, name)(
      state, m.ref_params, m.batch, m.empty_states, rnd, jnp.asarray(gamma, jnp.float32))
  ref = torch_step(m, t=rnd["t"], noise=rnd["noise"], drop=drop, lam=LAM, gamma=gamma, cfg=cfg)

  np.testing.assert_allclose(float(metrics["gamma"]), gamma, rtol=1e-6)
  assert float(metrics["finite"]) == 1.0
  errors = {"loss": abs(float(metrics["objective"]) - ref["loss"]) / abs(ref["loss"])}
  errors["grads"], grad_scale = _grad_err(m, new_state.opt_state, ref["grads"])
  if cfg.loss_type == "dpo":
    errors["logits"] = _rel_err(per_pair["logit"], ref["logit"])
    np.testing.assert_allclose(float(metrics["loss/all"]), ref["nll"].mean(), rtol=TOL[kind])
    np.testing.assert_array_equal(np.asarray(per_pair["implicit_acc"]),
                                  (ref["logit"] > 0).astype(np.float32))
    np.testing.assert_allclose(float(metrics["implicit_acc/all"]), (ref["logit"] > 0).mean())
    assert np.abs(ref["logit"]).max() < 10, "the logits must not saturate the sigmoid"
  if cfg.sdpo_mu > 0:
    # lambda strictly inside (0, 1) for every micro-batch, so the scaling is seen by the grads
    assert np.all((ref["sdpo_lambda"] > 0.02) & (ref["sdpo_lambda"] < 0.98)), ref["sdpo_lambda"]
    errors["sdpo_lambda"] = abs(float(metrics["sdpo_lambda/all"]) - ref["sdpo_lambda"].mean()) / (
        ref["sdpo_lambda"].mean())
  else:
    assert "sdpo_lambda/all" not in metrics
  ERRORS[f"{kind}-{name}-step{step}"] = errors
  for key, err in errors.items():
    assert err <= TOL[kind], f"{name} step {step}: {key} relative error {err:.2e} > {TOL[kind]}"
  assert grad_scale > 1e-3

  lam_after = float(new_state.lam)
  if cfg.safety_mode == "dual":
    assert lam_after != LAM, "the dual variable must move"
    np.testing.assert_allclose(lam_after, ref["lam"], rtol=TOL[kind])
  else:
    assert lam_after == LAM

  if ref_grad is not None:
    # The frozen reference gets no gradient even when differentiated (a LoRA policy will share
    # its base weights with the reference): exactly zero, not just small.
    worst = max(float(np.max(np.abs(np.asarray(g)))) for g in jax.tree.leaves(ref_grad))
    assert worst == 0.0, f"gradient reaches the reference UNet (max {worst:.2e})"


def test_batch_exercises_every_branch(models):
  """The cases above are not vacuous: relabelling swaps some pairs and keeps others, the margin
  takes both signs."""
  b = models.batch
  swap = (b["reward_l"] - LAM * b["cost_l"]) > (b["reward_w"] - LAM * b["cost_w"])
  assert 0 < swap.sum() < N_PAIRS
  margin = LAM * (b["cost_l"] - b["cost_w"])
  assert (margin > 0.5).any() and (margin < -0.5).any()


def test_sdpo_mu_is_checked():
  """train.sdpo_mu: [0, 1] as the official code asserts (0 = off), and only with the DPO loss."""
  step_lib.StepConfig(sdpo_mu=1.0).validate()
  for bad in (-0.1, 1.5, float("nan")):
    with pytest.raises(ConfigError, match="sdpo_mu"):
      step_lib.StepConfig(sdpo_mu=bad).validate()
  with pytest.raises(ConfigError, match="loss_type"):
    step_lib.StepConfig(loss_type="sft", sdpo_mu=0.9).validate()


def test_sft_weight_is_checked():
  """train.sft_weight: >= 0 (0 = off), and only with the DPO loss (loss_type sft is m_w alone)."""
  step_lib.StepConfig(sft_weight=1000.0).validate()
  for bad in (-1.0, float("nan")):
    with pytest.raises(ConfigError, match="sft_weight"):
      step_lib.StepConfig(sft_weight=bad).validate()
  with pytest.raises(ConfigError, match="loss_type"):
    step_lib.StepConfig(loss_type="sft", sft_weight=1.0).validate()


def test_randomness_is_per_step_and_in_range(models):
  rnd = _randomness(models, _state(models, 3, LAM), models.cfgs["none"])
  t = np.asarray(rnd["t"])
  assert rnd["noise"].shape == models.batch["latents_w"].shape and t.shape == (N_PAIRS,)
  assert t.min() >= 0 and t.max() < 1000 and len(set(t.tolist())) > 1
  other = _randomness(models, _state(models, 4, LAM), models.cfgs["none"])
  assert not np.array_equal(np.asarray(other["noise"]), np.asarray(rnd["noise"]))


def test_print_measured_errors():
  """Runs last in this module: prints the measured errors (pytest -s, or -rA) for the README."""
  assert ERRORS, "the reference cases did not run"
  worst = {}
  for case, errs in ERRORS.items():
    print(case, " ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    for k, v in errs.items():
      worst[k] = max(worst.get(k, 0.0), v)
  print("worst:", " ".join(f"{k} {v:.1e}" for k, v in worst.items()))
