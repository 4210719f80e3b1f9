"""Learning-rate schedules, lr scaling and both optimizers (incl. their sharded state)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default
from scdpo_jax import parallel
from scdpo_jax.models.layers import abstract_params, init_params
from scdpo_jax.models.unet import UNet2DConditionModel
from scdpo_jax.models.unet_config import UNetConfig
from scdpo_jax.train import optim


def _opt(**kw) -> ml_collections.ConfigDict:
  c = default.get_config().optimizer
  c.update(kw)
  return c


def test_warmup_then_constant_with_scaled_lr():
  opt = _opt(lr=1e-8, scale_lr=True, warmup_steps=500, schedule="constant")
  sched = optim.learning_rate_schedule(opt, total_steps=2000, pairs_per_step=2048)
  assert optim.effective_learning_rate(opt, 2048) == pytest.approx(2.048e-5)
  assert float(sched(0)) == 0.0
  assert float(sched(250)) == pytest.approx(1.024e-5, rel=1e-5)
  assert float(sched(500)) == pytest.approx(2.048e-5, rel=1e-5)
  assert float(sched(1999)) == pytest.approx(2.048e-5, rel=1e-5)


def test_warmup_then_cosine():
  opt = _opt(lr=1e-4, warmup_steps=10, schedule="cosine", cosine_final_fraction=0.1)
  sched = optim.learning_rate_schedule(opt, total_steps=110, pairs_per_step=8)
  assert float(sched(10)) == pytest.approx(1e-4, rel=1e-5)
  assert float(sched(60)) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5), rel=1e-4)
  assert float(sched(110)) == pytest.approx(1e-5, rel=1e-4)


def test_bad_names_raise():
  with pytest.raises(ValueError, match="optimizer.name='sgd'"):
    optim.make_optimizer(_opt(name="sgd"), 10, 8)
  with pytest.raises(ValueError, match="optimizer.schedule='step'"):
    optim.make_optimizer(_opt(schedule="step"), 10, 8)


@pytest.fixture(scope="module")
def tiny_unet():
  model = UNet2DConditionModel(UNetConfig.from_dict(dict(
      sample_size=8, block_out_channels=(32,), layers_per_block=1, cross_attention_dim=16,
      attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D",),
      up_block_types=("CrossAttnUpBlock2D",))))
  params = init_params(model, jax.random.key(0))
  return model, params


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizer_steps_and_state_shardings(name, tiny_unet):
  model, params = tiny_unet
  tx = optim.make_optimizer(_opt(name=name, lr=1e-3, warmup_steps=0), 10, 4)
  boxed = abstract_params(model)
  mesh = parallel.make_mesh(1, 1, 1)
  # The optimizer state's shardings come from the boxed (logically named) params.
  state_shardings = parallel.logical_shardings(jax.eval_shape(tx.init, boxed), mesh,
                                               default.get_config().sharding_rules)
  opt_state = tx.init(params)
  assert jax.tree.structure(state_shardings) == jax.tree.structure(opt_state)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, opt_state, params)
  norms = [float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)]
  assert all(np.isfinite(norms)) and max(norms) > 0


def test_adafactor_matches_transformers_adafactor():
  """optimizer.name="adafactor" against transformers.Adafactor(lr, weight_decay, clip_threshold=1,
  scale_parameter=False, relative_step=False) (Diffusion-DPO's SDXL optimizer) over five steps
  of a conv kernel, a Dense kernel and a bias in their PyTorch layouts (converted to ours), with
  a warmup schedule, weight decay and gradients large enough for the update clip to act."""
  import torch
  import transformers

  rng = np.random.default_rng(0)
  shapes = {"conv": (6, 5, 3, 3), "dense": (7, 4), "bias": (7,)}  # PyTorch layouts
  to_ours = {"conv": lambda x: x.transpose(2, 3, 1, 0), "dense": lambda x: x.T,
             "bias": lambda x: x}
  init = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: (rng.standard_normal(s) * (10.0 if i == 2 else 1.0)).astype(np.float32)
            for k, s in shapes.items()} for i in range(5)]
  opt = _opt(name="adafactor", lr=1e-2, warmup_steps=2, weight_decay=0.05, max_grad_norm=0.0)

  tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
  topt = transformers.Adafactor(list(tparams.values()), lr=opt.lr, weight_decay=opt.weight_decay,
                                clip_threshold=1.0, scale_parameter=False, relative_step=False)
  sched = optim.learning_rate_schedule(opt, 5, 1)
  tx = optim.make_optimizer(opt, 5, 1)
  params = {k: jnp.asarray(to_ours[k](v)) for k, v in init.items()}
  state = tx.init(params)
  for i, g in enumerate(grads):
    for group in topt.param_groups:
      group["lr"] = float(sched(i))
    for k, p in tparams.items():
      p.grad = torch.from_numpy(g[k])
    topt.step()
    updates, state = tx.update({k: jnp.asarray(to_ours[k](v)) for k, v in g.items()}, state,
                               params)
    params = optax.apply_updates(params, updates)
    for k, p in tparams.items():
      np.testing.assert_allclose(np.asarray(params[k]), to_ours[k](p.detach().numpy()),
                                 rtol=1e-5, atol=1e-6, err_msg=f"{k} after step {i + 1}")
  moved = max(float(np.abs(np.asarray(params[k]) - to_ours[k](init[k])).max()) for k in init)
  assert moved > 1e-3, "the parameters must move"
