"""LoRA adapters and diffusers / peft LoRA files against PyTorch diffusers + peft (tiny, fp32).

Tolerance: our UNet with a LoRA vs diffusers' base UNet with the same LoRA loaded <= 1e-4
(measured, 2-core CPU: 3.5e-6 ours -> diffusers, 3.1e-6 / 3.8e-6 diffusers / peft -> ours;
`pytest -s` prints them).
"""

import json

import diffusers
import jax
import numpy as np
import peft
import pytest
import torch
from flax import traverse_util
from peft.utils import get_peft_model_state_dict

from scdpo_jax.errors import ConfigError
from scdpo_jax.lora import adapters, io as lora_io
from scdpo_jax.models import layers, unet_io
from tests.torch_refs import nchw_to_nhwc, nhwc_to_nchw, tiny_torch_pipeline, to_numpy

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(folder of the tiny diffusers pipeline, our UNet module, its params, inputs)."""
  root = tmp_path_factory.mktemp("lora_pipe")
  tiny_torch_pipeline(root / "pipe", root / "tok")
  unet, params = unet_io.load_unet(root / "pipe" / "unet")
  rng = np.random.default_rng(0)
  inputs = (rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([999, 17], np.int32),
            rng.standard_normal((2, 7, 32)).astype(np.float32))
  return root / "pipe", unet, params, inputs


def _apply(unet, params, inputs):
  return np.asarray(jax.jit(unet.apply)({"params": params}, *inputs))


def _torch_apply(torch_unet, inputs):
  x, t, c = inputs
  with torch.no_grad():
    out = torch_unet(torch.from_numpy(nhwc_to_nchw(x)), torch.from_numpy(t).long(),
                     encoder_hidden_states=torch.from_numpy(c)).sample
  return nchw_to_nhwc(to_numpy(out))


def _random_lora(unet, spec, seed=0):
  """Adapters with B != 0 (a fresh LoRA is the identity), as NumPy."""
  lora = adapters.init_lora(adapters.abstract_lora(layers.abstract_params(unet), spec), spec, seed)
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(lora)
  return traverse_util.unflatten_dict({
      k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) if k[-1] == "lora_B" else v
      for k, v in flat.items()})


# ------------------------------------------------------------------------------ adapters

def test_default_targets_are_the_attention_projections(tiny):
  _, unet, params, _ = tiny
  modules = adapters.target_modules(params, adapters.LoraSpec().patterns)
  names = {"/".join(m[-2:]) for m in modules}
  assert names == {f"attn{i}/{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0")}
  # one block in each of down_blocks_0, up_blocks_1 (x2 layers), mid_block: 8 projections each
  n_blocks = sum(1 for p in traverse_util.flatten_dict(params)
                 if p[-2:] == ("to_q", "kernel") and "attn1" in p)
  assert len(modules) == 8 * n_blocks


def test_logical_axes_mirror_the_base_kernel(tiny):
  _, unet, _, _ = tiny
  boxed = layers.abstract_params(unet)
  spec = adapters.LoraSpec(rank=3, targets=("attention", "resnet_conv"))
  lora = adapters.abstract_lora(boxed, spec)
  q = lora["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]
  assert q["lora_A"].names == ("embed", None) and q["lora_A"].value.shape == (64, 3)
  assert q["lora_B"].names == (None, "heads") and q["lora_B"].value.shape == (3, 64)
  out = lora["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_out_0"]
  assert out["lora_A"].names == ("heads", None) and out["lora_B"].names == (None, "embed")
  conv = lora["mid_block"]["resnets_0"]["conv1"]
  assert conv["lora_A"].value.shape == (3, 3, 64, 3)
  assert conv["lora_A"].names == (None, None, "conv_in", None)
  assert conv["lora_B"].value.shape == (1, 1, 3, 64)
  assert conv["lora_B"].names == (None, None, None, "conv_out")


def test_init_gaussian_and_kaiming_as_peft(tiny):
  _, unet, _, _ = tiny
  boxed = layers.abstract_params(unet)
  for init in ("gaussian", "kaiming"):
    spec = adapters.LoraSpec(rank=4, init=init, targets=("attention", "resnet_conv"))
    lora = adapters.init_lora(adapters.abstract_lora(boxed, spec), spec, seed=0)
    flat = traverse_util.flatten_dict(lora)
    a_all = np.concatenate([v.ravel() for k, v in flat.items() if k[-1] == "lora_A"])
    assert all(not v.any() for k, v in flat.items() if k[-1] == "lora_B")  # B = 0
    if init == "gaussian":  # peft: normal_(std=1/r)
      assert abs(a_all.std() - 0.25) < 0.01 and abs(a_all.mean()) < 0.01
    else:  # peft: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)), fan_in = in * kh * kw
      conv_a = flat[("mid_block", "resnets_0", "conv1", "lora_A")]
      bound = 1 / np.sqrt(3 * 3 * 64)
      assert np.abs(conv_a).max() <= bound and np.abs(conv_a).max() > 0.95 * bound
    # the merged model of a fresh LoRA is the base
  again = adapters.init_lora(adapters.abstract_lora(boxed, spec), spec, seed=0)
  for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_merge_is_base_plus_scaled_product(tiny):
  _, unet, params, _ = tiny
  spec = adapters.LoraSpec(rank=2, alpha=3.0, targets=("attention", "resnet_conv"))
  lora = _random_lora(unet, spec)
  merged = adapters.merge(params, lora, spec.scale)
  path = ("mid_block", "attentions_0", "transformer_blocks_0", "attn2", "to_k")
  a, b = lora[path[0]][path[1]][path[2]][path[3]][path[4]].values()
  got = np.asarray(traverse_util.flatten_dict(merged)[path + ("kernel",)])
  want = traverse_util.flatten_dict(params)[path + ("kernel",)] + 1.5 * a @ b
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  conv = lora["mid_block"]["resnets_0"]["conv1"]
  got = np.asarray(merged["mid_block"]["resnets_0"]["conv1"]["kernel"])
  want = params["mid_block"]["resnets_0"]["conv1"]["kernel"] + 1.5 * np.einsum(
      "hwir,ro->hwio", conv["lora_A"], conv["lora_B"][0, 0])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # untouched leaves are the base's arrays
  assert merged["conv_in"]["kernel"] is params["conv_in"]["kernel"]


def test_bad_lora_configs_are_refused():
  with pytest.raises(ConfigError, match="lora.rank"):
    adapters.LoraSpec(rank=0).validate()
  with pytest.raises(ConfigError, match="lora.init"):
    adapters.LoraSpec(init="xavier").validate()
  with pytest.raises(ConfigError, match="bad regular expression"):
    adapters.LoraSpec(targets=("to_q(",)).validate()
  with pytest.raises(ConfigError, match="lora.dropout"):
    adapters.LoraSpec(dropout=1.0).validate()
  with pytest.raises(ConfigError, match="match no Dense / Conv kernel"):
    from scdpo_jax.models import unet as unet_lib
    from scdpo_jax.models.unet_config import UNetConfig
    cfg = UNetConfig.from_dict(dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,),
        layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)))
    adapters.abstract_lora(layers.abstract_params(unet_lib.UNet2DConditionModel(cfg)),
                           adapters.LoraSpec(targets=("nothing/like/this",)))


def test_dropout_branch_is_peft_forward(tiny):
  """lora.dropout > 0: y = x W + scale * dropout(x) A B per adapted layer (interceptor, the model
  definitions unchanged). Rate -> 0 gives the merged model; B = 0 gives the base at any rate
  (the mask touches only the LoRA branch); a rate of 0.5 changes the output, the same key gives
  the same masks. The rate is a traced argument here (training passes the config's float), so
  one compiled program serves every rate."""
  _, unet, params, inputs = tiny
  spec = adapters.LoraSpec(rank=4, alpha=8.0, targets=("attention", "proj", "resnet_conv"))
  lora = _random_lora(unet, spec)
  key = jax.random.PRNGKey(1)
  run = jax.jit(lambda l, rate, k: adapters.apply_with_dropout(unet, params, l, spec.scale,
                                                               rate, k, *inputs))
  merged = _apply(unet, adapters.merge(params, lora, spec.scale), inputs)
  assert np.abs(np.asarray(run(lora, 1e-12, key)) - merged).max() <= TOL
  zero_b = jax.tree_util.tree_map_with_path(
      lambda p, v: np.zeros_like(v) if p[-1].key == "lora_B" else v, lora)
  base = _apply(unet, params, inputs)
  assert np.abs(np.asarray(run(zero_b, 0.5, key)) - base).max() <= 1e-5
  half = np.asarray(run(lora, 0.5, key))
  assert np.abs(half - merged).max() > 0.1
  np.testing.assert_array_equal(half, np.asarray(run(lora, 0.5, key)))
  assert np.abs(half - np.asarray(run(lora, 0.5, jax.random.PRNGKey(2)))).max() > 0.1


# ------------------------------------------------------------------------------ files: ours -> diffusers

def test_exported_lora_loads_in_diffusers_with_the_same_output(tiny, tmp_path):
  folder, unet, params, inputs = tiny
  spec = adapters.LoraSpec(rank=4, alpha=8.0, init="kaiming",
                           targets=("attention", "resnet_conv", "proj", "feed_forward"))
  lora = _random_lora(unet, spec)
  path = lora_io.save_lora(tmp_path / "lora", lora, rank=spec.rank, alpha=spec.alpha)
  assert path.name == "pytorch_lora_weights.safetensors"
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  pipe.load_lora_weights(tmp_path / "lora")
  # every tensor in the file went into a LoRA layer of diffusers' UNet, and every LoRA layer
  # diffusers created has a tensor from the file (no unexpected / missing keys)
  loaded = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
  ours = lora_io.to_peft_state_dict(lora, prefix="")
  assert set(loaded) == set(ours)
  for k, v in loaded.items():
    np.testing.assert_array_equal(to_numpy(v), ours[k], err_msg=k)
  assert pipe.unet.down_blocks[0].attentions[0].proj_in.scaling["default_0"] == 2.0
  ref = _torch_apply(pipe.unet, inputs)
  got = _apply(unet, adapters.merge(params, lora, spec.scale), inputs)
  base = _apply(unet, params, inputs)
  assert np.abs(got - base).max() > 0.1  # the LoRA matters
  print(f"max |ours - diffusers| {np.abs(got - ref).max():.1e}")
  assert np.abs(got - ref).max() <= TOL, np.abs(got - ref).max()


# ------------------------------------------------------------------------------ files: peft / diffusers -> ours

def _torch_unet_with_peft_lora(folder, config, writer):
  """diffusers' UNet with a peft LoRA (B randomised); `writer` = "diffusers" uses diffusers'
  `add_adapter`, "peft" wraps it in peft's `get_peft_model`."""
  unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
  if writer == "diffusers":
    unet.add_adapter(config)
  else:
    unet = peft.get_peft_model(unet, config).eval()
  torch.manual_seed(3)
  with torch.no_grad():
    for name, p in unet.named_parameters():
      if "lora_B" in name:
        p.copy_(0.1 * torch.randn_like(p))
  return unet


@pytest.mark.parametrize("writer", ["diffusers", "peft"])
def test_lora_written_by_peft_or_diffusers_imports(tiny, tmp_path, writer):
  folder, unet, params, inputs = tiny
  config = peft.LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian",
                           target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                           rank_pattern={"conv1": 2}, alpha_pattern={"to_k": 8})
  torch_unet = _torch_unet_with_peft_lora(folder, config, writer)
  ref = _torch_apply(torch_unet, inputs)
  if writer == "diffusers":  # pytorch_lora_weights.safetensors (unet.*) with adapter metadata
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(torch_unet),
        unet_lora_adapter_metadata=torch_unet.peft_config["default"].to_dict())
  else:  # peft's folder: adapter_model.safetensors (base_model.model.*) + adapter_config.json
    torch_unet.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
  lora, scale, info = lora_io.load_lora(tmp_path, layers.abstract_params(unet))
  assert scale == 1.0  # mixed alphas: folded into B
  ranks = {n: m["rank"] for n, m in info["modules"].items()}
  assert ranks["mid_block.resnets.0.conv1"] == 2
  assert ranks["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"] == 4
  got = _apply(unet, adapters.merge(params, lora, scale), inputs)
  assert np.abs(got - _apply(unet, params, inputs)).max() > 0.1
  print(f"max |ours - diffusers| {np.abs(got - ref).max():.1e}")
  assert np.abs(got - ref).max() <= TOL, np.abs(got - ref).max()


def test_round_trip_and_mismatched_file(tiny, tmp_path):
  _, unet, params, _ = tiny
  spec = adapters.LoraSpec(rank=4, alpha=4.0)
  lora = _random_lora(unet, spec)
  lora_io.save_lora(tmp_path, lora, rank=4, alpha=4.0)
  back, scale, _ = lora_io.load_lora(tmp_path, layers.abstract_params(unet))
  assert scale == 1.0
  for (pa, a), (pb, b) in zip(traverse_util.flatten_dict(lora).items(),
                              traverse_util.flatten_dict(back).items()):
    assert pa == pb
    np.testing.assert_array_equal(a, b)
  # a LoRA for another architecture is refused with the offending module named
  state = lora_io.to_peft_state_dict(lora)
  state["unet.down_blocks.7.attentions.0.proj_in.lora_A.weight"] = np.zeros((4, 32, 1, 1),
                                                                          np.float32)
  state["unet.down_blocks.7.attentions.0.proj_in.lora_B.weight"] = np.zeros((32, 4, 1, 1),
                                                                          np.float32)
  from safetensors.numpy import save_file
  save_file(state, str(tmp_path / "bad.safetensors"))
  with pytest.raises(lora_io.LoraFileError, match="down_blocks.7.attentions.0.proj_in"):
    lora_io.load_lora(tmp_path / "bad.safetensors", layers.abstract_params(unet))
