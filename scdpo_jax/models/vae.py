"""Flax port of diffusers' `AutoencoderKL` (the Stable Diffusion VAE); modules and latent helpers
only: the config is in `vae_config.py`, diffusers folder IO in `vae_io.py`.

Conventions (see `layers.py`):

* Layout is channels-last: images are (B, H, W, in_channels) in [-1, 1], latents are
  (B, H / 2**(n_blocks - 1), W / 2**(n_blocks - 1), latent_channels). PyTorch is NCHW; callers
  comparing with diffusers transpose at the boundary.
* Module names mirror the diffusers state-dict keys (`encoder.down_blocks.0.resnets.1.conv1` <->
  `encoder/down_blocks_0/resnets_1/conv1`), so `convert.torch_to_flax` / `convert.flax_to_torch`
  move the weights with no per-model table.
* `AutoencoderKL.decode` takes *unscaled* latents (what `encode` produces); the diffusion model
  works on scaled latents: `scale_latents(z) = (z - shift_factor) * scaling_factor`, undone by
  `unscale_latents` before decoding. Apply with `module.apply({"params": params}, x,
  method="encode")`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from scdpo_jax.models import layers, vae_config
from scdpo_jax.models.layers import A, ACTIVATION_AXES_NHWC, constrain

RESNET_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class VAEResnetBlock(layers.Module):
  """diffusers `ResnetBlock2D` without time embedding: norm1, act, conv1, norm2, act, conv2, plus a
  1x1 `conv_shortcut` on the residual when the channel count changes. NHWC."""

  out_channels: int
  groups: int
  act_fn: str = "silu"
  eps: float = RESNET_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = layers.get_activation(self.act_fn)
    h = layers.group_norm(self.groups, self.eps, name="norm1", **self.dt)(x)
    h = layers.conv(self.out_channels, 3, name="conv1", **self.dt)(act(h))
    h = layers.group_norm(self.groups, self.eps, name="norm2", **self.dt)(h)
    h = layers.conv(self.out_channels, 3, name="conv2", **self.dt)(act(h))  # dropout is 0 here
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, name="conv_shortcut", **self.dt)(x)
    return x + h


class VAEAttention(layers.Module):
  """diffusers `Attention` as built by the VAE mid block: GroupNorm, single-head self-attention
  over the H*W positions (head_dim = channels), `to_out_0`, residual connection. NHWC.

  The softmax runs in fp32 (diffusers' `upcast_softmax=True`), except with
  `attention_impl="cudnn"`, whose fused kernel needs fp16/bf16 inputs (it accumulates in fp32).
  """

  groups: int
  eps: float = RESNET_EPS
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    h = layers.group_norm(self.groups, self.eps, name="group_norm", **self.dt)(x)
    h = h.reshape(batch, height * width, channels)
    q = layers.dense(channels, (A.EMBED, A.HEADS), name="to_q", **self.dt)(h)
    k = layers.dense(channels, (A.EMBED, A.HEADS), name="to_k", **self.dt)(h)
    v = layers.dense(channels, (A.EMBED, A.HEADS), name="to_v", **self.dt)(h)
    h = layers.dot_product_attention(q, k, v, num_heads=1, implementation=self.attention_impl,
                                     upcast=self.attention_impl != "cudnn")
    h = layers.dense(channels, (A.HEADS, A.EMBED), name="to_out_0", **self.dt)(h)
    return x + h.reshape(batch, height, width, channels)


class VAEMidBlock(layers.Module):
  """diffusers `UNetMidBlock2D` (no temb): resnets_0, [attentions_0], resnets_1."""

  channels: int
  groups: int
  act_fn: str
  add_attention: bool = True
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = VAEResnetBlock(self.channels, self.groups, self.act_fn, name="resnets_0", **self.dt)(x)
    if self.add_attention:
      x = VAEAttention(self.groups, attention_impl=self.attention_impl, name="attentions_0",
                       **self.dt)(x)
    return VAEResnetBlock(self.channels, self.groups, self.act_fn, name="resnets_1", **self.dt)(x)


class Downsample(layers.Module):
  """diffusers `Downsample2D(padding=0)`: pad right/bottom by one, then a stride-2 3x3 `conv`."""

  channels: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.conv(self.channels, 3, stride=2, padding=((0, 1), (0, 1)), name="conv",
                       **self.dt)(x)


class Upsample(layers.Module):
  """diffusers `Upsample2D`: nearest-neighbour 2x, then a 3x3 `conv`."""

  channels: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return layers.conv(self.channels, 3, name="conv", **self.dt)(x)



class DownEncoderBlock(layers.Module):
  """diffusers `DownEncoderBlock2D`: `num_layers` resnets, then an optional `downsamplers_0`."""

  channels: int
  num_layers: int
  groups: int
  act_fn: str
  add_downsample: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = VAEResnetBlock(self.channels, self.groups, self.act_fn, name=f"resnets_{j}", **self.dt)(x)
    if self.add_downsample:
      x = Downsample(self.channels, name="downsamplers_0", **self.dt)(x)
    return constrain(x, ACTIVATION_AXES_NHWC)


class UpDecoderBlock(layers.Module):
  """diffusers `UpDecoderBlock2D`: `num_layers` resnets, then an optional `upsamplers_0`."""

  channels: int
  num_layers: int
  groups: int
  act_fn: str
  add_upsample: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = VAEResnetBlock(self.channels, self.groups, self.act_fn, name=f"resnets_{j}", **self.dt)(x)
    if self.add_upsample:
      x = Upsample(self.channels, name="upsamplers_0", **self.dt)(x)
    return constrain(x, ACTIVATION_AXES_NHWC)


class Encoder(layers.Module):
  """diffusers VAE `Encoder` (double_z=True): (B, H, W, in_channels) -> (B, h, w, 2*latent)."""

  config: vae_config.VAEConfig
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    groups, n_blocks = cfg.norm_num_groups, len(cfg.block_out_channels)
    x = layers.conv(cfg.block_out_channels[0], 3, name="conv_in", **self.dt)(x)
    for i, channels in enumerate(cfg.block_out_channels):
      x = DownEncoderBlock(channels, cfg.layers_per_block, groups, cfg.act_fn,
                           add_downsample=i < n_blocks - 1, name=f"down_blocks_{i}", **self.dt)(x)
    x = VAEMidBlock(cfg.block_out_channels[-1], groups, cfg.act_fn, cfg.mid_block_add_attention,
                    self.attention_impl, name="mid_block", **self.dt)(x)
    x = layers.group_norm(groups, RESNET_EPS, name="conv_norm_out", **self.dt)(x)
    x = nn.silu(x)  # diffusers' conv_act is SiLU whatever act_fn says
    x = layers.conv(2 * cfg.latent_channels, 3, name="conv_out", **self.dt)(x)
    return constrain(x, ACTIVATION_AXES_NHWC)


class Decoder(layers.Module):
  """diffusers VAE `Decoder` (GroupNorm): (B, h, w, latent_channels) -> (B, H, W, out_channels)."""

  config: vae_config.VAEConfig
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.config
    groups, n_blocks = cfg.norm_num_groups, len(cfg.block_out_channels)
    x = layers.conv(cfg.block_out_channels[-1], 3, name="conv_in", **self.dt)(z)
    x = VAEMidBlock(cfg.block_out_channels[-1], groups, cfg.act_fn, cfg.mid_block_add_attention,
                    self.attention_impl, name="mid_block", **self.dt)(x)
    for i, channels in enumerate(reversed(cfg.block_out_channels)):
      x = UpDecoderBlock(channels, cfg.layers_per_block + 1, groups, cfg.act_fn,
                         add_upsample=i < n_blocks - 1, name=f"up_blocks_{i}", **self.dt)(x)
    x = layers.group_norm(groups, RESNET_EPS, name="conv_norm_out", **self.dt)(x)
    x = nn.silu(x)
    x = layers.conv(cfg.out_channels, 3, name="conv_out", **self.dt)(x)
    return constrain(x, ACTIVATION_AXES_NHWC)


class AutoencoderKL(layers.Module):
  """diffusers `AutoencoderKL` in Flax, NHWC.

  `encode(x)`: image (B, H, W, in_channels) in [-1, 1] -> (mean, logvar) of the posterior, each
  (B, H/f, W/f, latent_channels) with f = `config.downsample_factor`, logvar clipped to [-30, 20].
  `decode(z)`: unscaled latents -> image (B, H, W, out_channels). `__call__(x)` decodes the
  posterior mean (or a sample, given `rng`) and exists mostly for `init`. Outputs are in `dtype`.
  """

  config: vae_config.VAEConfig
  attention_impl: str = "xla"

  def setup(self) -> None:
    cfg = self.config
    self.encoder = Encoder(cfg, self.attention_impl, **self.dt)
    self.decoder = Decoder(cfg, self.attention_impl, **self.dt)
    latent = cfg.latent_channels
    self.quant_conv = (layers.conv(2 * latent, 1, name="quant_conv", **self.dt)
                       if cfg.use_quant_conv else None)
    self.post_quant_conv = (layers.conv(latent, 1, name="post_quant_conv", **self.dt)
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

  @nn.nowrap
  def dummy_inputs(self) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Input shapes for `layers.abstract_params` / `layers.init_params`: one image of the
    smallest side the blocks accept."""
    cfg = self.config
    side = cfg.downsample_factor
    return (jax.ShapeDtypeStruct((1, side, side, cfg.in_channels), jnp.float32),)


# --------------------------------------------------------------------------------------------
# Latent helpers
# --------------------------------------------------------------------------------------------


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """`mean + exp(logvar / 2) * N(0, 1)` (computed in fp32, returned in mean's dtype)."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  std = jnp.exp(0.5 * logvar.astype(jnp.float32))
  return (mean.astype(jnp.float32) + std * eps).astype(mean.dtype)


def scale_latents(z: jax.Array, config: vae_config.VAEConfig) -> jax.Array:
  """VAE latents -> diffusion-model latents: `(z - shift_factor) * scaling_factor`."""
  if config.shift_factor is not None:
    z = z - config.shift_factor
  return z * config.scaling_factor


def unscale_latents(z: jax.Array, config: vae_config.VAEConfig) -> jax.Array:
  """Inverse of `scale_latents`: `z / scaling_factor + shift_factor` (what `decode` takes)."""
  z = z / config.scaling_factor
  if config.shift_factor is not None:
    z = z + config.shift_factor
  return z
