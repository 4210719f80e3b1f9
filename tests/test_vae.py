"""Flax AutoencoderKL vs diffusers (CPU, fp32), torch-free IO round trips and error messages."""

import dataclasses
import json
import types

import numpy as np
import pytest
import diffusers
import torch
import jax
import jax.numpy as jnp
from flax.core import meta
from safetensors.numpy import load_file, save_file

from scdpo_jax.models import convert, io, layers, vae, vae_config, vae_io
from torch_refs import nchw_to_nhwc, nhwc_to_nchw, to_numpy


TOL = 1e-4
IMAGE_SIDE = 16

VARIANTS = {
    "small": dict(block_out_channels=(32, 64), layers_per_block=1),
    "deep": dict(block_out_channels=(32, 32, 64), layers_per_block=2, use_quant_conv=False,
                 mid_block_add_attention=True, scaling_factor=0.5, shift_factor=0.1),
}


def torch_vae(seed: int = 0, **overrides):
  n = len(overrides.get("block_out_channels", (32, 64)))
  kwargs = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=(32, 64),
                layers_per_block=1, latent_channels=4, norm_num_groups=32,
                sample_size=IMAGE_SIDE)
  kwargs.update(overrides)
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**kwargs).eval()
  # Random (not zero-initialised) norms and biases so every parameter matters in the comparison.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else
                0.1 * torch.randn_like(p))
  return model


def torch_outputs(model, image_nchw: np.ndarray, latents_nchw: np.ndarray):
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(image_nchw)).latent_dist
    decoded = model.decode(torch.from_numpy(latents_nchw)).sample
  return to_numpy(dist.mean), to_numpy(dist.logvar), to_numpy(decoded)


def jitted(module):
  encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))
  decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
  return encode, decode


def build_case(name: str, folder):
  model = torch_vae(**VARIANTS[name])
  model.save_pretrained(folder)
  module, params = vae_io.load_vae(folder)
  rng = np.random.RandomState(1)
  image = rng.uniform(-1, 1, (2, 3, IMAGE_SIDE, IMAGE_SIDE)).astype(np.float32)
  side = IMAGE_SIDE // module.config.downsample_factor
  latents = rng.randn(2, 4, side, side).astype(np.float32)
  mean, logvar, decoded = torch_outputs(model, image, latents)
  encode, decode = jitted(module)
  return types.SimpleNamespace(name=name, model=model, folder=folder, module=module,
                               params=params, image=image, latents=latents, mean=mean,
                               logvar=logvar, decoded=decoded, encode=encode, decode=decode)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  """Lazily built reference models, one per variant, shared by the whole module."""
  built = {}

  def get(name: str):
    if name not in built:
      built[name] = build_case(name, tmp_path_factory.mktemp(f"vae_{name}"))
    return built[name]

  return get


@pytest.fixture(params=sorted(VARIANTS))
def case(request, cases):
  return cases(request.param)


@pytest.fixture
def small(cases):
  return cases("small")


def max_diff(ours_nhwc, theirs_nchw) -> float:
  ours = nhwc_to_nchw(np.asarray(ours_nhwc, np.float32))
  assert ours.shape == theirs_nchw.shape
  return float(np.max(np.abs(ours - theirs_nchw)))


def test_encode_matches_diffusers(case):
  mean, logvar = case.encode(case.params, nchw_to_nhwc(case.image))
  assert max_diff(mean, case.mean) <= TOL
  assert max_diff(logvar, case.logvar) <= TOL


def test_decode_matches_diffusers(case):
  decoded = case.decode(case.params, nchw_to_nhwc(case.latents))
  assert decoded.shape == (2, IMAGE_SIDE, IMAGE_SIDE, 3)
  assert max_diff(decoded, case.decoded) <= TOL


def test_save_vae_round_trips_through_diffusers(case, tmp_path):
  vae_io.save_vae(tmp_path, case.module.config, case.params)
  reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
  for key, value in case.model.config.items():
    if not key.startswith("_"):
      got = reloaded.config[key]
      assert (list(got) if isinstance(got, tuple) else got) == (
          list(value) if isinstance(value, tuple) else value), key
  expected = case.model.state_dict()
  got = reloaded.state_dict()
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(to_numpy(got[key]), to_numpy(value), err_msg=key)
  for ours, theirs in zip(torch_outputs(reloaded, case.image, case.latents),
                          (case.mean, case.logvar, case.decoded)):
    np.testing.assert_array_equal(ours, theirs)
  # And back into JAX: same config, bit-identical parameters.
  module, params = vae_io.load_vae(tmp_path)
  assert module.config == case.module.config
  jax.tree.map(np.testing.assert_array_equal, params, case.params)


def test_save_rejects_params_of_another_config(small, tmp_path):
  other = dataclasses.replace(small.module.config, latent_channels=8)
  with pytest.raises(convert.CheckpointMismatchError, match="cannot save VAE.*quant_conv"):
    vae_io.save_vae(tmp_path / "vae", other, small.params)
  assert not (tmp_path / "vae").exists()


def test_init_params_matches_abstract_params(small):
  module = vae.AutoencoderKL(small.module.config, param_dtype=jnp.bfloat16)
  params = layers.init_params(module, jax.random.key(0))
  abstract = meta.unbox(layers.abstract_params(module))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
      lambda s: (s.shape, s.dtype), abstract)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))


def test_config_round_trip(case):
  config = case.module.config
  raw = json.loads((case.folder / "config.json").read_text())
  assert vae_config.VAEConfig.from_dict(config.to_dict()) == config
  ours = config.to_dict()
  for key, value in raw.items():
    if not key.startswith("_"):
      assert ours[key] == value, key
  assert ours["_class_name"] == "AutoencoderKL"


def test_params_carry_logical_axes(case):
  boxed = layers.abstract_params(case.module)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, meta.Partitioned))
  assert leaves and all(isinstance(x, meta.Partitioned) for x in leaves)
  assert boxed["encoder"]["conv_in"]["kernel"].names == (None, None, "conv_in", "conv_out")
  shapes = jax.tree.map(lambda x: x.shape, meta.unbox(boxed))
  assert shapes == jax.tree.map(np.shape, case.params)


@pytest.mark.parametrize("overrides", [
    dict(mid_block_add_attention=False),
    dict(use_post_quant_conv=False, act_fn="gelu", latent_channels=8),
    dict(block_out_channels=(32,), in_channels=1, out_channels=2, norm_num_groups=16),
])
def test_param_tree_matches_state_dict(overrides):
  model = torch_vae(**overrides)
  config = vae_config.VAEConfig.from_dict(dict(model.config))
  abstract = meta.unbox(layers.abstract_params(vae.AutoencoderKL(config)))
  ours = {k: v.shape for k, v in convert.flax_to_torch(
      jax.tree.map(lambda s: np.zeros(s.shape, np.bool_), abstract)).items()}
  theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert ours == theirs


def test_bf16_compute_is_close(small):
  case = small
  module = vae.AutoencoderKL(case.module.config, dtype=jnp.bfloat16)
  mean, logvar = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))(
      case.params, nchw_to_nhwc(case.image))
  assert mean.dtype == jnp.bfloat16 and logvar.dtype == jnp.bfloat16
  scale = np.abs(case.mean).max()
  assert max_diff(mean, case.mean) <= 0.05 * scale


def test_latent_helpers():
  config = vae_config.VAEConfig(scaling_factor=0.13025, shift_factor=0.0609)
  z = jnp.asarray(np.random.RandomState(0).randn(2, 4, 4, 4), jnp.float32)
  scaled = vae.scale_latents(z, config)
  np.testing.assert_allclose(scaled, (z - 0.0609) * 0.13025, rtol=1e-6)
  np.testing.assert_allclose(vae.unscale_latents(scaled, config), z, rtol=1e-5, atol=1e-6)
  plain = vae_config.VAEConfig()
  np.testing.assert_allclose(vae.scale_latents(z, plain), z * 0.18215, rtol=1e-6)

  mean = jnp.full((4, 32, 32, 4), 0.5)
  logvar = jnp.full((4, 32, 32, 4), np.log(4.0))
  sample = vae.sample_latent(mean, logvar, jax.random.key(0))
  assert sample.shape == mean.shape and sample.dtype == mean.dtype
  assert abs(float(sample.mean()) - 0.5) < 0.1
  assert abs(float(sample.std()) - 2.0) < 0.1
  again = vae.sample_latent(mean, logvar, jax.random.key(0))
  np.testing.assert_array_equal(sample, again)


def test_deprecated_attention_names_load(case, tmp_path):
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state = load_file(str(case.folder / "diffusion_pytorch_model.safetensors"))
  old = {}
  for key, value in state.items():
    for new_name, old_name in renames.items():
      key = key.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
    old[key] = value
  assert any(".attentions.0.proj_attn." in k for k in old)
  save_file(old, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "config.json").write_text((case.folder / "config.json").read_text())
  _, params = vae_io.load_vae(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, case.params)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def small_config_json() -> dict:
  return vae_config.VAEConfig(block_out_channels=(32, 64),
                       down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2).to_dict()


def test_missing_folder_names_path(tmp_path):
  missing = tmp_path / "model" / "vae"
  with pytest.raises(io.CheckpointNotFoundError, match="vae"):
    vae_io.load_vae(missing)
  try:
    vae_io.load_vae(missing)
  except io.CheckpointNotFoundError as e:
    assert str(missing) in str(e)


def test_missing_config_names_path(tmp_path):
  with pytest.raises(io.CheckpointNotFoundError) as info:
    vae_io.load_vae(tmp_path)
  assert str(tmp_path / "config.json") in str(info.value)


def test_bin_only_folder_gives_convert_hint(tmp_path):
  io.write_json(tmp_path / "config.json", small_config_json())
  (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
  with pytest.raises(io.CheckpointNotFoundError) as info:
    vae_io.load_vae(tmp_path)
  message = str(info.value)
  assert "diffusion_pytorch_model.bin" in message
  assert "safetensors" in message and "save_pretrained" in message


def test_shape_mismatch_lists_key(small, tmp_path):
  case = small
  state = load_file(str(case.folder / "diffusion_pytorch_model.safetensors"))
  state["decoder.conv_in.bias"] = np.zeros((7,), np.float32)
  del state["encoder.conv_out.bias"]
  state["encoder.extra.weight"] = np.zeros((1,), np.float32)
  save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "config.json").write_text((case.folder / "config.json").read_text())
  with pytest.raises(convert.CheckpointMismatchError) as info:
    vae_io.load_vae(tmp_path)
  message = str(info.value)
  assert "decoder.conv_in.bias" in message and "(7,)" in message
  assert "encoder.conv_out.bias" in message and "encoder.extra.weight" in message
  assert str(tmp_path) in message


@pytest.mark.parametrize("key, value, expected", [
    ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"], "DownEncoderBlock2D"),
    ("up_block_types", ["UpDecoderBlock2D"], "2 (len(block_out_channels))"),
    ("latents_mean", [0.1, 0.2, 0.3, 0.4], "null"),
    ("act_fn", "mish", "silu"),
    ("block_out_channels", [32, 48], "norm_num_groups=32"),
    ("use_quant_conv", "yes", "true or false"),
    ("_class_name", "AutoencoderTiny", "AutoencoderKL"),
])
def test_unsupported_config_value(key, value, expected):
  config = small_config_json()
  config[key] = value
  with pytest.raises(ValueError) as info:
    vae_config.VAEConfig.from_dict(config)
  message = str(info.value)
  assert key in message and repr(value) in message and expected in message


def test_unsupported_config_in_folder_names_file(tmp_path):
  config = small_config_json()
  config["down_block_types"] = ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]
  io.write_json(tmp_path / "config.json", config)
  with pytest.raises(ValueError, match="AttnDownEncoderBlock2D") as info:
    vae_io.load_vae(tmp_path)
  assert str(tmp_path / "config.json") in str(info.value)


def test_unknown_and_private_keys_are_ignored():
  config = small_config_json() | {"_diffusers_version": "0.1", "_name_or_path": "x",
                                   "some_future_option": 3}
  parsed = vae_config.VAEConfig.from_dict(config)
  assert parsed == vae_config.VAEConfig.from_dict(small_config_json())
  assert dataclasses.asdict(parsed)["block_out_channels"] == (32, 64)
