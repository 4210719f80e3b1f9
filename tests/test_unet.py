"""Our Flax UNet against diffusers' PyTorch UNet2DConditionModel on tiny random weights (fp32).

Tolerance: max |flax - torch| <= 1e-4 on outputs of order 1 (float32 with XLA's "highest" matmul
precision; the remaining difference is summation order).
"""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from scdpo_jax.models import convert, io
from scdpo_jax.models.layers import abstract_params
from scdpo_jax.models.unet import UNet2DConditionModel
from scdpo_jax.models.unet_config import UNetConfig
from scdpo_jax.models.unet_io import load_unet, save_unet
from tests.torch_refs import nchw_to_nhwc, nhwc_to_nchw, to_numpy

SD1_TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD2_TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
    layers_per_block=2, cross_attention_dim=24, attention_head_dim=(2, 4, 8),
    transformer_layers_per_block=(1, 2, 1), use_linear_projection=True, upcast_attention=True,
    norm_num_groups=16, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def _torch_unet(kwargs, seed):
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**kwargs).eval()
  # Random (not zero-initialised) weights everywhere, so every parameter matters.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _inputs(cfg_kwargs, batch=2, seq=7, seed=0):
  rng = np.random.default_rng(seed)
  s = cfg_kwargs["sample_size"]
  sample = rng.standard_normal((batch, s, s, 4)).astype(np.float32)
  timesteps = np.array([999, 17][:batch], dtype=np.int32)
  context = rng.standard_normal((batch, seq, cfg_kwargs["cross_attention_dim"])).astype(np.float32)
  return sample, timesteps, context


def _torch_out(model, sample, timesteps, context):
  with torch.no_grad():
    out = model(torch.from_numpy(nhwc_to_nchw(sample)), torch.from_numpy(timesteps).long(),
                encoder_hidden_states=torch.from_numpy(context)).sample
  return nchw_to_nhwc(to_numpy(out))


def _reference(name, tmp_path_factory):
  kwargs = SD1_TINY if name == "sd1" else SD2_TINY
  model = _torch_unet(kwargs, seed=1 if name == "sd1" else 2)
  folder = tmp_path_factory.mktemp(f"unet_{name}")
  model.save_pretrained(folder)
  return name, kwargs, model, folder


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def reference(request, tmp_path_factory):
  return _reference(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sd1_reference(tmp_path_factory):
  """The SD1 case alone, for the tests one config is enough for (no skipped sd2 copies)."""
  return _reference("sd1", tmp_path_factory)


@pytest.fixture(scope="module")
def apply_fn():
  cache = {}

  def get(model):
    if model not in cache:
      cache[model] = jax.jit(model.apply)
    return cache[model]
  return get


def test_sd15_parameter_count():
  model = UNet2DConditionModel(UNetConfig())
  shapes = abstract_params(model)
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 859_520_964


def test_matches_diffusers(reference, apply_fn):
  name, kwargs, torch_model, folder = reference
  model, params = load_unet(folder)
  sample, t, ctx = _inputs(kwargs)
  ours = np.asarray(apply_fn(model)({"params": params}, sample, t, ctx))
  ref = _torch_out(torch_model, sample, t, ctx)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  assert np.abs(ref).max() > 0.1  # a real signal, not two zero tensors


def test_export_round_trip(reference, apply_fn, tmp_path):
  name, kwargs, torch_model, folder = reference
  model, params = load_unet(folder)
  save_unet(tmp_path / "unet", model.config, params)
  reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
  sample, t, ctx = _inputs(kwargs, seed=3)
  ref = _torch_out(torch_model, sample, t, ctx)
  np.testing.assert_array_equal(_torch_out(reloaded, sample, t, ctx), ref)
  saved_cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
  assert saved_cfg["use_linear_projection"] == kwargs.get("use_linear_projection", False)


def test_save_rejects_params_of_another_config(sd1_reference, tmp_path):
  name, kwargs, _, folder = sd1_reference
  _, params = load_unet(folder)
  other = UNetConfig.from_dict({**kwargs, "cross_attention_dim": 16})
  with pytest.raises(convert.CheckpointMismatchError, match="cannot save UNet.*attn2/to_k"):
    save_unet(tmp_path / "unet", other, params)
  assert not (tmp_path / "unet").exists()


def test_bf16_compute_close_to_fp32(sd1_reference, apply_fn):
  name, kwargs, _, folder = sd1_reference
  model32, params = load_unet(folder)
  model16, _ = load_unet(folder, dtype=jnp.bfloat16)
  sample, t, ctx = _inputs(kwargs)
  out32 = np.asarray(apply_fn(model32)({"params": params}, sample, t, ctx))
  out16 = apply_fn(model16)({"params": params}, sample, t, ctx)
  assert out16.dtype == jnp.bfloat16
  rel = np.abs(np.asarray(out16, np.float32) - out32).max() / np.abs(out32).max()
  assert rel < 0.05


def test_remat_gives_same_gradients(sd1_reference):
  name, kwargs, _, folder = sd1_reference
  sample, t, ctx = _inputs(kwargs)
  grads = []
  for policy in ("none", "block"):
    model, params = load_unet(folder, remat_policy=policy)
    loss = lambda p: jnp.mean(model.apply({"params": p}, sample, t, ctx) ** 2)
    grads.append(jax.jit(jax.grad(loss))(params))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_logical_axis_names_on_params():
  model = UNet2DConditionModel(UNetConfig.from_dict(SD1_TINY))
  boxed = abstract_params(model)
  import flax.linen as nn
  specs = nn.get_partition_spec(boxed)
  q = specs["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
  assert tuple(q) == ("embed", "heads")
  conv = specs["conv_in"]["kernel"]
  assert tuple(conv) == (None, None, "conv_in", "conv_out")


def test_unsupported_config_option_is_named():
  with pytest.raises(ValueError, match="class_embed_type"):
    UNetConfig.from_dict({**SD1_TINY, "class_embed_type": "timestep"})
  with pytest.raises(ValueError, match="down_block_types.*SimpleCrossAttnDownBlock2D"):
    UNetConfig.from_dict({**SD1_TINY, "down_block_types": ["SimpleCrossAttnDownBlock2D",
                                                           "DownBlock2D"]})


def test_missing_folder_and_bin_only(tmp_path):
  with pytest.raises(io.CheckpointNotFoundError, match="UNet folder not found.*nope"):
    load_unet(tmp_path / "nope")
  folder = tmp_path / "unet"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(SD1_TINY))
  (folder / "diffusion_pytorch_model.bin").write_bytes(b"")
  with pytest.raises(io.CheckpointNotFoundError, match="safetensors.*save_file"):
    load_unet(folder)


def test_shape_and_key_mismatch_lists_keys(sd1_reference, tmp_path):
  name, kwargs, _, folder = sd1_reference
  from safetensors.numpy import load_file, save_file
  state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
  bad = dict(state)
  bad["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
  del bad["conv_out.bias"]
  bad["extra.weight"] = np.zeros((1,), np.float32)
  target = tmp_path / "unet"
  target.mkdir()
  (target / "config.json").write_text((folder / "config.json").read_text())
  save_file(bad, str(target / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(convert.CheckpointMismatchError) as err:
    load_unet(target)
  msg = str(err.value)
  assert "conv_in.weight" in msg and "conv_out.bias" in msg and "extra.weight" in msg
  assert str(target) in msg
