"""Flax port of diffusers' `AutoencoderKL` (the Stable Diffusion VAE), with torch-free IO.

Conventions (see `layers.py`):

* Layout is channels-last: images are (B, H, W, in_channels) in [-1, 1], latents are
  (B, H / 2**(n_blocks - 1), W / 2**(n_blocks - 1), latent_channels). PyTorch is NCHW; callers
  comparing with diffusers transpose at the boundary.
* Module names mirror the diffusers state-dict keys (`encoder.down_blocks.0.resnets.1.conv1` <->
  `encoder/down_blocks_0/resnets_1/conv1`), so `convert.torch_to_flax` / `convert.flax_to_torch`
  move the weights with no per-model table.
* `AutoencoderKL.decode` takes *unscaled* latents (what `encode` produces); the diffusion model
  works on scaled latents: `scale_latents(z) = (z - shift_factor) * scaling_factor`, undone by
  `unscale_latents` before decoding.
* `load_vae` returns the parameter tree without the `{"params": ...}` wrapper, as host NumPy
  arrays in `param_dtype`; apply with `module.apply({"params": params}, x, method="encode")`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
from flax.core import meta

from scdpo_jax.models import convert, io, layers
from scdpo_jax.models.layers import A, ACTIVATION_AXES_NHWC, Dtype, constrain

RESNET_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this
WEIGHTS_STEM = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"

SUPPORTED_DOWN_BLOCKS = ("DownEncoderBlock2D",)
SUPPORTED_UP_BLOCKS = ("UpDecoderBlock2D",)
# Activations both diffusers' `get_activation` and ours implement identically.
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _unsupported(key: str, value: Any, supported: str) -> ValueError:
  return ValueError(f"VAE config {key}={value!r} is not supported; supported: {supported}")


def _positive_int(d: Mapping[str, Any], key: str, default: int) -> int:
  value = d.get(key, default)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise _unsupported(key, value, "a positive integer")
  return value


def _bool(d: Mapping[str, Any], key: str, default: bool) -> bool:
  value = d.get(key, default)
  if not isinstance(value, bool):
    raise _unsupported(key, value, "true or false")
  return value


def _float(d: Mapping[str, Any], key: str, default: float | None, *,
           optional: bool = False) -> float | None:
  value = d.get(key, default)
  if value is None and optional:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _unsupported(key, value, "a number" + (" or null" if optional else ""))
  return float(value)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The subset of diffusers' `AutoencoderKL` config this port implements (defaults = diffusers')."""

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, ...] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self) -> None:
    # Direct construction skips from_dict's checks; catch the inconsistencies that would make
    # to_dict() write a config diffusers builds differently.
    n = len(self.block_out_channels)
    for key in ("down_block_types", "up_block_types"):
      if len(getattr(self, key)) != n:
        raise ValueError(f"VAEConfig {key} has {len(getattr(self, key))} entries but "
                         f"block_out_channels has {n}")
    if any(c % self.norm_num_groups for c in self.block_out_channels):
      raise ValueError(f"VAEConfig block_out_channels={list(self.block_out_channels)} must be "
                       f"divisible by norm_num_groups={self.norm_num_groups}")

  @property
  def downsample_factor(self) -> int:
    """Image side / latent side."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
    """Parse a diffusers `AutoencoderKL` config.json dict.

    Keys starting with "_" (`_class_name`, `_diffusers_version`, ...) and keys this port does not
    know are ignored; missing keys take diffusers' defaults. A value this port cannot reproduce
    exactly raises `ValueError` naming the key, the value and what is supported.
    """
    defaults = cls()
    class_name = d.get("_class_name", "AutoencoderKL")
    if class_name not in ("AutoencoderKL", "FlaxAutoencoderKL"):
      raise _unsupported("_class_name", class_name, "'AutoencoderKL'")

    channels = d.get("block_out_channels", defaults.block_out_channels)
    if (not isinstance(channels, (list, tuple)) or not channels
        or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels)):
      raise _unsupported("block_out_channels", channels, "a non-empty list of positive integers")
    channels = tuple(channels)
    groups = _positive_int(d, "norm_num_groups", defaults.norm_num_groups)
    if any(c % groups for c in channels):
      raise _unsupported("block_out_channels", list(channels),
                         f"channel counts divisible by norm_num_groups={groups}")

    def block_types(key: str, supported: tuple[str, ...]) -> tuple[str, ...]:
      value = d.get(key, (supported[0],) * len(channels))
      if (not isinstance(value, (list, tuple)) or len(value) != len(channels)
          or any(v not in supported for v in value)):
        raise _unsupported(key, value, f"a list of {len(channels)} (len(block_out_channels)) "
                           f"entries, each one of {list(supported)}")
      return tuple(value)

    act_fn = d.get("act_fn", defaults.act_fn)
    if act_fn not in SUPPORTED_ACTIVATIONS:
      raise _unsupported("act_fn", act_fn, f"one of {list(SUPPORTED_ACTIVATIONS)}")

    sample_size = d.get("sample_size", defaults.sample_size)
    if isinstance(sample_size, (list, tuple)):
      if len(sample_size) != 2 or any(
          isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sample_size):
        raise _unsupported("sample_size", sample_size, "a positive integer or [height, width]")
      sample_size = tuple(sample_size)
    else:
      sample_size = _positive_int(d, "sample_size", defaults.sample_size)

    for key in ("latents_mean", "latents_std"):
      if d.get(key) is not None:
        raise _unsupported(key, d[key], "null (per-channel latent statistics are not implemented)")

    scaling_factor = _float(d, "scaling_factor", defaults.scaling_factor)
    if not scaling_factor > 0:
      raise _unsupported("scaling_factor", d.get("scaling_factor"), "a positive number")

    return cls(
        in_channels=_positive_int(d, "in_channels", defaults.in_channels),
        out_channels=_positive_int(d, "out_channels", defaults.out_channels),
        down_block_types=block_types("down_block_types", SUPPORTED_DOWN_BLOCKS),
        up_block_types=block_types("up_block_types", SUPPORTED_UP_BLOCKS),
        block_out_channels=channels,
        layers_per_block=_positive_int(d, "layers_per_block", defaults.layers_per_block),
        act_fn=act_fn,
        latent_channels=_positive_int(d, "latent_channels", defaults.latent_channels),
        norm_num_groups=groups,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        shift_factor=_float(d, "shift_factor", None, optional=True),
        force_upcast=_bool(d, "force_upcast", defaults.force_upcast),
        use_quant_conv=_bool(d, "use_quant_conv", defaults.use_quant_conv),
        use_post_quant_conv=_bool(d, "use_post_quant_conv", defaults.use_post_quant_conv),
        mid_block_add_attention=_bool(d, "mid_block_add_attention",
                                      defaults.mid_block_add_attention),
    )

  def to_dict(self) -> dict[str, Any]:
    """A config.json dict that diffusers' `AutoencoderKL.from_pretrained` accepts."""
    out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      out[field.name] = list(value) if isinstance(value, tuple) else value
    out["latents_mean"] = None
    out["latents_std"] = None
    return out


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class VAEResnetBlock(nn.Module):
  """diffusers `ResnetBlock2D` without time embedding: norm1, act, conv1, norm2, act, conv2, plus a
  1x1 `conv_shortcut` on the residual when the channel count changes. NHWC."""

  out_channels: int
  groups: int
  act_fn: str = "silu"
  eps: float = RESNET_EPS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = layers.get_activation(self.act_fn)
    h = layers.group_norm(self.groups, self.eps, name="norm1", **kw)(x)
    h = layers.conv(self.out_channels, 3, name="conv1", **kw)(act(h))
    h = layers.group_norm(self.groups, self.eps, name="norm2", **kw)(h)
    h = layers.conv(self.out_channels, 3, name="conv2", **kw)(act(h))  # dropout is 0 in the VAE
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
    return x + h


class VAEAttention(nn.Module):
  """diffusers `Attention` as built by the VAE mid block: GroupNorm, single-head self-attention
  over the H*W positions (head_dim = channels), `to_out_0`, residual connection. NHWC.

  The softmax runs in fp32 (diffusers' `upcast_softmax=True`), except with
  `attention_impl="cudnn"`, whose fused kernel needs fp16/bf16 inputs (it accumulates in fp32).
  """

  groups: int
  eps: float = RESNET_EPS
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, height, width, channels = x.shape
    h = layers.group_norm(self.groups, self.eps, name="group_norm", **kw)(x)
    h = h.reshape(batch, height * width, channels)
    q = layers.dense(channels, (A.EMBED, A.HEADS), name="to_q", **kw)(h)
    k = layers.dense(channels, (A.EMBED, A.HEADS), name="to_k", **kw)(h)
    v = layers.dense(channels, (A.EMBED, A.HEADS), name="to_v", **kw)(h)
    h = layers.dot_product_attention(q, k, v, num_heads=1, implementation=self.attention_impl,
                                     upcast=self.attention_impl != "cudnn")
    h = layers.dense(channels, (A.HEADS, A.EMBED), name="to_out_0", **kw)(h)
    return x + h.reshape(batch, height, width, channels)


class VAEMidBlock(nn.Module):
  """diffusers `UNetMidBlock2D` (no temb): resnets_0, [attentions_0], resnets_1."""

  channels: int
  groups: int
  act_fn: str
  add_attention: bool = True
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = VAEResnetBlock(self.channels, self.groups, self.act_fn, name="resnets_0", **kw)(x)
    if self.add_attention:
      x = VAEAttention(self.groups, attention_impl=self.attention_impl, name="attentions_0",
                       **kw)(x)
    return VAEResnetBlock(self.channels, self.groups, self.act_fn, name="resnets_1", **kw)(x)


class Downsample(nn.Module):
  """diffusers `Downsample2D(padding=0)`: pad right/bottom by one, then a stride-2 3x3 `conv`."""

  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.conv(self.channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                       param_dtype=self.param_dtype, name="conv")(x)


class Upsample(nn.Module):
  """diffusers `Upsample2D`: nearest-neighbour 2x, then a 3x3 `conv`."""

  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return layers.conv(self.channels, 3, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="conv")(x)



class DownEncoderBlock(nn.Module):
  """diffusers `DownEncoderBlock2D`: `num_layers` resnets, then an optional `downsamplers_0`."""

  channels: int
  num_layers: int
  groups: int
  act_fn: str
  add_downsample: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = VAEResnetBlock(self.channels, self.groups, self.act_fn, name=f"resnets_{j}", **kw)(x)
    if self.add_downsample:
      x = Downsample(self.channels, name="downsamplers_0", **kw)(x)
    return constrain(x, ACTIVATION_AXES_NHWC)


class UpDecoderBlock(nn.Module):
  """diffusers `UpDecoderBlock2D`: `num_layers` resnets, then an optional `upsamplers_0`."""

  channels: int
  num_layers: int
  groups: int
  act_fn: str
  add_upsample: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = VAEResnetBlock(self.channels, self.groups, self.act_fn, name=f"resnets_{j}", **kw)(x)
    if self.add_upsample:
      x = Upsample(self.channels, name="upsamplers_0", **kw)(x)
    return constrain(x, ACTIVATION_AXES_NHWC)


class Encoder(nn.Module):
  """diffusers VAE `Encoder` (double_z=True): (B, H, W, in_channels) -> (B, h, w, 2*latent)."""

  config: VAEConfig
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    groups, n_blocks = cfg.norm_num_groups, len(cfg.block_out_channels)
    x = layers.conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
    for i, channels in enumerate(cfg.block_out_channels):
      x = DownEncoderBlock(channels, cfg.layers_per_block, groups, cfg.act_fn,
                           add_downsample=i < n_blocks - 1, name=f"down_blocks_{i}", **kw)(x)
    x = VAEMidBlock(cfg.block_out_channels[-1], groups, cfg.act_fn, cfg.mid_block_add_attention,
                    self.attention_impl, name="mid_block", **kw)(x)
    x = layers.group_norm(groups, RESNET_EPS, name="conv_norm_out", **kw)(x)
    x = nn.silu(x)  # diffusers' conv_act is SiLU whatever act_fn says
    x = layers.conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)
    return constrain(x, ACTIVATION_AXES_NHWC)


class Decoder(nn.Module):
  """diffusers VAE `Decoder` (GroupNorm): (B, h, w, latent_channels) -> (B, H, W, out_channels)."""

  config: VAEConfig
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    groups, n_blocks = cfg.norm_num_groups, len(cfg.block_out_channels)
    x = layers.conv(cfg.block_out_channels[-1], 3, name="conv_in", **kw)(z)
    x = VAEMidBlock(cfg.block_out_channels[-1], groups, cfg.act_fn, cfg.mid_block_add_attention,
                    self.attention_impl, name="mid_block", **kw)(x)
    for i, channels in enumerate(reversed(cfg.block_out_channels)):
      x = UpDecoderBlock(channels, cfg.layers_per_block + 1, groups, cfg.act_fn,
                         add_upsample=i < n_blocks - 1, name=f"up_blocks_{i}", **kw)(x)
    x = layers.group_norm(groups, RESNET_EPS, name="conv_norm_out", **kw)(x)
    x = nn.silu(x)
    x = layers.conv(cfg.out_channels, 3, name="conv_out", **kw)(x)
    return constrain(x, ACTIVATION_AXES_NHWC)


class AutoencoderKL(nn.Module):
  """diffusers `AutoencoderKL` in Flax, NHWC.

  `encode(x)`: image (B, H, W, in_channels) in [-1, 1] -> (mean, logvar) of the posterior, each
  (B, H/f, W/f, latent_channels) with f = `config.downsample_factor`, logvar clipped to [-30, 20].
  `decode(z)`: unscaled latents -> image (B, H, W, out_channels). `__call__(x)` decodes the
  posterior mean (or a sample, given `rng`) and exists mostly for `init`. Outputs are in `dtype`.
  """

  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  def setup(self) -> None:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(cfg, self.attention_impl, **kw)
    self.decoder = Decoder(cfg, self.attention_impl, **kw)
    latent = cfg.latent_channels
    self.quant_conv = (layers.conv(2 * latent, 1, name="quant_conv", **kw)
                       if cfg.use_quant_conv else None)
    self.post_quant_conv = (layers.conv(latent, 1, name="post_quant_conv", **kw)
                            if cfg.use_post_quant_conv else None)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = self.encoder(x.astype(self.dtype))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    mean, logvar = self.encode(x)
    z = mean if rng is None else sample_latent(mean, logvar, rng)
    return self.decode(z)


# --------------------------------------------------------------------------------------------
# Latent helpers
# --------------------------------------------------------------------------------------------


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """`mean + exp(logvar / 2) * N(0, 1)` (computed in fp32, returned in mean's dtype)."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  std = jnp.exp(0.5 * logvar.astype(jnp.float32))
  return (mean.astype(jnp.float32) + std * eps).astype(mean.dtype)


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
  """VAE latents -> diffusion-model latents: `(z - shift_factor) * scaling_factor`."""
  if config.shift_factor is not None:
    z = z - config.shift_factor
  return z * config.scaling_factor


def unscale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
  """Inverse of `scale_latents`: `z / scaling_factor + shift_factor` (what `decode` takes)."""
  z = z / config.scaling_factor
  if config.shift_factor is not None:
    z = z + config.shift_factor
  return z


# --------------------------------------------------------------------------------------------
# Loading / saving (diffusers `vae/` folder layout, no torch)
# --------------------------------------------------------------------------------------------

_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                               "proj_attn": "to_out.0"}
_DEPRECATED_ATTENTION_KEY = re.compile(
    r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\."
    r"(weight|bias)$")


def rename_deprecated_attention_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Map the pre-0.14 diffusers attention names (query/key/value/proj_attn, still found in e.g. the
  SD 1.x VAE checkpoints) to the current ones, as diffusers does on load."""
  out = {}
  for key, value in state_dict.items():
    m = _DEPRECATED_ATTENTION_KEY.match(key)
    if m:
      key = f"{m.group(1)}.{_DEPRECATED_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}"
    out[key] = value
  return out


def abstract_variables(module: AutoencoderKL) -> Any:
  """`jax.eval_shape` of `module.init`: the boxed variable tree (shapes, dtypes, logical axis
  names) without allocating anything. `nn.get_partition_spec` of it gives the logical specs."""
  cfg = module.config
  side = cfg.downsample_factor
  dummy = jax.ShapeDtypeStruct((1, side, side, cfg.in_channels), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), dummy)


def load_vae_config(folder: str | os.PathLike) -> VAEConfig:
  """Read and validate `<folder>/config.json`; errors name the file."""
  path = io.require_dir(folder, "VAE") / CONFIG_NAME
  data = io.read_json(path, "VAE config")
  try:
    return VAEConfig.from_dict(data)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def load_vae(folder: str | os.PathLike, *, dtype: Dtype = jnp.float32,
             param_dtype: Dtype = jnp.float32, variant: str | None = None,
             attention_impl: str = "xla") -> tuple[AutoencoderKL, dict]:
  """Load a diffusers `vae/` folder (config.json + diffusion_pytorch_model[.variant].safetensors).

  Returns `(module, params)`; `params` is the unwrapped tree (no "params" key) of host NumPy
  arrays in `param_dtype`. Raises `io.CheckpointNotFoundError` for missing folders/files (with the
  safetensors conversion hint for .bin-only folders), `ValueError` for an unsupported config and
  `convert.CheckpointMismatchError` listing missing / unexpected / mis-shaped keys.
  """
  folder = io.require_dir(folder, "VAE")
  config = load_vae_config(folder)
  module = AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype,
                         attention_impl=attention_impl)
  state_dict = io.load_safetensors(folder, WEIGHTS_STEM, "VAE", variant=variant)
  target = abstract_variables(module)["params"]
  name = f"{WEIGHTS_STEM}.{variant}" if variant else WEIGHTS_STEM
  params = convert.torch_to_flax(rename_deprecated_attention_keys(state_dict), target,
                                 source=str(folder / f"{name}.safetensors"))
  return module, params


def save_vae(folder: str | os.PathLike, config: VAEConfig, params: Any, *,
             dtype: Any = None) -> None:
  """Write config.json + diffusion_pytorch_model.safetensors that diffusers'
  `AutoencoderKL.from_pretrained(folder)` loads unchanged.

  `params` may be boxed or not and wrapped in {"params": ...} or not; `dtype` optionally casts
  the saved weights (default: keep each array's dtype).
  """
  params = meta.unbox(params)
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  state_dict = convert.flax_to_torch(jax.device_get(params), dtype=dtype)
  io.save_safetensors(state_dict, folder / f"{WEIGHTS_STEM}.safetensors")
  io.write_json(folder / CONFIG_NAME, config.to_dict())
