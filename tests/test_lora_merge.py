"""Co-Merge (our reconstruction) and plain averaging of LoRA experts (scdpo_jax/lora/merge.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from scdpo_jax.lora import adapters, merge


class Toy(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, name="first")(x)
    return nn.Dense(5, name="second")(jnp.tanh(h))


@pytest.fixture(scope="module")
def toy():
  model = Toy()
  x = np.random.default_rng(0).standard_normal((7, 3, 4)).astype(np.float32)
  params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0), x)["params"])
  return model, params, x


def _expert(params, seed, rank=2):
  rng = np.random.default_rng(seed)
  return {name: {"lora_A": rng.standard_normal((p["kernel"].shape[0], rank)).astype(np.float32),
                 "lora_B": rng.standard_normal((rank, p["kernel"].shape[1])).astype(np.float32)}
          for name, p in params.items()}


def test_input_means_are_the_layers_inputs(toy):
  model, params, x = toy
  means = merge.input_abs_means(model, params, [("first",), ("second",)], x)
  np.testing.assert_allclose(means[("first",)], np.abs(x).reshape(-1, 4).mean(0), rtol=1e-6)
  h = np.tanh(x @ params["first"]["kernel"] + params["first"]["bias"])
  np.testing.assert_allclose(means[("second",)], np.abs(h).reshape(-1, 6).mean(0), rtol=1e-5)


def test_co_merge_takes_the_most_active_expert_per_entry(toy):
  model, params, x = toy
  experts = [_expert(params, s) for s in (1, 2, 3)]
  scales = [1.0, 0.5, 2.0]
  means = merge.input_abs_means(model, params, [("first",), ("second",)], x)
  merged, shares = merge.co_merge(experts, scales, means)
  for module in (("first",), ("second",)):
    ds = [s * e[module[0]]["lora_A"] @ e[module[0]]["lora_B"] for e, s in zip(experts, scales)]
    want = np.zeros_like(ds[0])
    counts = np.zeros(3)
    for i in range(want.shape[0]):
      for j in range(want.shape[1]):
        acts = [abs(d[i, j] * means[module][i]) for d in ds]
        k = int(np.argmax(acts))
        want[i, j] = ds[k][i, j]
        counts[k] += 1
    np.testing.assert_allclose(merged[module], want, rtol=1e-6)
    np.testing.assert_allclose(shares[module], counts / want.size)
  assert np.linalg.matrix_rank(merged[("second",)]) > 2  # dense: above the experts' rank


def test_svd_refactorisation_and_average(toy):
  model, params, x = toy
  experts = [_expert(params, s) for s in (1, 2)]
  means = merge.input_abs_means(model, params, [("first",), ("second",)], x)
  dense, _ = merge.co_merge(experts, [1.0, 1.0], means)
  full = merge.refactorise(dense, rank=6)  # rank >= min(in, out): exact
  back = merge._deltas(full, 1.0)
  for m in dense:
    np.testing.assert_allclose(back[m], dense[m], atol=1e-5)
  low, _ = merge.co_merge(experts, [1.0, 1.0], means, mode="svd", rank=2)
  assert low["second"]["lora_A"].shape == (6, 2) and low["second"]["lora_B"].shape == (2, 5)
  d = dense[("second",)]
  s = np.linalg.svd(d, compute_uv=False)
  err = np.linalg.norm(merge._deltas(low, 1.0)[("second",)] - d)
  np.testing.assert_allclose(err, np.sqrt((s[2:] ** 2).sum()), rtol=1e-4)  # Eckart-Young
  avg = merge.average(experts, [1.0, 3.0])
  want = 0.5 * (experts[0]["first"]["lora_A"] @ experts[0]["first"]["lora_B"]
                + 3.0 * experts[1]["first"]["lora_A"] @ experts[1]["first"]["lora_B"])
  np.testing.assert_allclose(avg[("first",)], want, rtol=1e-5)
  # one expert: Co-Merge returns it; the merged params equal adapters.merge's
  one, _ = merge.co_merge(experts[:1], [2.0], means)
  np.testing.assert_allclose(
      merge.apply_deltas(params, one)["second"]["kernel"],
      np.asarray(adapters.merge(params, experts[0], 2.0)["second"]["kernel"]), rtol=1e-5,
      atol=1e-6)


def test_co_merge_on_the_unet_with_conv_adapters():
  from scdpo_jax.models import layers, unet as unet_lib
  from scdpo_jax.models.unet_config import UNetConfig
  cfg = UNetConfig.from_dict(dict(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,),
      layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
      down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)))
  unet = unet_lib.UNet2DConditionModel(cfg)
  params = jax.tree.map(np.asarray, layers.init_params(unet, jax.random.PRNGKey(0)))
  spec = adapters.LoraSpec(rank=2, targets=("attention", "resnet_conv"))
  abstract = adapters.abstract_lora(layers.abstract_params(unet), spec)
  rng = np.random.default_rng(0)
  experts = []
  for seed in (1, 2):
    e = traverse_util.flatten_dict(adapters.init_lora(abstract, spec, seed))
    experts.append(traverse_util.unflatten_dict(
        {k: (0.02 * rng.standard_normal(v.shape)).astype(np.float32) if k[-1] == "lora_B" else v
         for k, v in e.items()}))
  inputs = (rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([10, 500], np.int32),
            rng.standard_normal((2, 7, 32)).astype(np.float32))
  modules = adapters.target_modules(params, spec.patterns)
  means = merge.input_abs_means(unet, params, modules, *inputs)
  assert set(means) == set(modules)
  conv = ("mid_block", "resnets_0", "conv1")
  assert means[conv].shape == (32,) and (means[conv] > 0).all()
  dense, shares = merge.co_merge(experts, [spec.scale] * 2, means)
  assert dense[conv].shape == (3, 3, 32, 32)
  assert all(0.2 < s[0] < 0.8 for s in shares.values())  # both experts contribute
  out_dense = unet.apply({"params": merge.apply_deltas(params, dense)}, *inputs)
  full = merge.refactorise(dense, rank=32 * 9)
  out_svd = unet.apply({"params": adapters.merge(params, full, 1.0)}, *inputs)
  np.testing.assert_allclose(np.asarray(out_svd), np.asarray(out_dense), atol=1e-4)
