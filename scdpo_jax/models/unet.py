"""Flax UNet2DConditionModel for Stable Diffusion 1.x / 2.x and SDXL (modules only: the config
is in `unet_config.py`, diffusers folder IO in `unet_io.py`).

API layout (channels-last): `sample` (B, H, W, C_in) latents, `timesteps` (B,) or scalar,
`encoder_hidden_states` (B, T, cross_attention_dim); returns the model output (B, H, W, C_out),
epsilon or v depending on the checkpoint's `prediction_type` (that lives in the scheduler config;
the network itself does not care). SDXL (`addition_embed_type="text_time"`) also takes
`added_cond_kwargs={"text_embeds": (B, P), "time_ids": (B, K)}` as diffusers does: the pooled
text embeddings and the micro-conditioning ids (K = 6 for SDXL base: original size, crop
top-left, target size), see `conditioning_xl.py`.

Module names mirror diffusers' state-dict keys (see `layers.py`), so `convert.py` maps weights
with no per-model table.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from scdpo_jax.models import layers, unet_config
from scdpo_jax.models.layers import A

REMAT_POLICIES = ("none", "block", "dots_saveable", "nothing_saveable")

# skip_transform(hidden (B, H, W, C_h), skip (B, H, W, C_s)) -> (hidden, skip): applied in every
# up-block resnet between popping the skip activation and concatenating it (FreeU's and SAFREE's
# latent re-attention injection point).
SkipTransform = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (B,) timesteps, as diffusers' `get_timestep_embedding`."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(layers.Module):
  features: int = 1280

  @nn.compact
  def __call__(self, x):
    x = layers.dense(self.features, (A.EMBED, A.MLP), name="linear_1", **self.dt)(x)
    x = nn.silu(x)
    return layers.dense(self.features, (A.MLP, A.EMBED), name="linear_2", **self.dt)(x)


class ResnetBlock2D(layers.Module):
  out_channels: int = 320
  groups: int = 32
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x, temb):
    h = layers.group_norm(self.groups, self.eps, name="norm1", **self.dt)(x)
    h = layers.conv(self.out_channels, 3, name="conv1", **self.dt)(nn.silu(h))
    t = layers.dense(self.out_channels, (A.EMBED, A.CONV_OUT), name="time_emb_proj",
                     **self.dt)(nn.silu(temb))
    h = h + t[:, None, None, :]
    h = layers.group_norm(self.groups, self.eps, name="norm2", **self.dt)(h)
    h = layers.conv(self.out_channels, 3, name="conv2", **self.dt)(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, name="conv_shortcut", **self.dt)(x)
    return layers.constrain(x + h, layers.ACTIVATION_AXES_NHWC)


class Attention(layers.Module):
  """diffusers `Attention` (to_q/to_k/to_v without bias, to_out.0 with bias)."""

  heads: int = 8
  upcast: bool = False
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, context=None):
    inner = x.shape[-1]
    context = x if context is None else context
    q = layers.dense(inner, (A.EMBED, A.HEADS), use_bias=False, name="to_q", **self.dt)(x)
    k = layers.dense(inner, (A.EMBED, A.HEADS), use_bias=False, name="to_k", **self.dt)(context)
    v = layers.dense(inner, (A.EMBED, A.HEADS), use_bias=False, name="to_v", **self.dt)(context)
    out = layers.dot_product_attention(q, k, v, num_heads=self.heads,
                                       implementation=self.attention_impl, upcast=self.upcast)
    return layers.dense(x.shape[-1], (A.HEADS, A.EMBED), name="to_out_0", **self.dt)(out)


class GEGLU(layers.Module):
  features: int = 1280

  @nn.compact
  def __call__(self, x):
    h = layers.dense(2 * self.features, (A.EMBED, A.MLP), name="proj", **self.dt)(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * layers.gelu_exact(gate)


class FeedForward(layers.Module):
  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    h = GEGLU(features=4 * dim, name="net_0", **self.dt)(x)
    return layers.dense(dim, (A.MLP, A.EMBED), name="net_2", **self.dt)(h)


class BasicTransformerBlock(layers.Module):
  heads: int = 8
  upcast: bool = False
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, context):
    attn = dict(heads=self.heads, upcast=self.upcast, attention_impl=self.attention_impl, **self.dt)
    h = layers.layer_norm(1e-5, name="norm1", **self.dt)(x)
    x = x + Attention(name="attn1", **attn)(h)
    h = layers.layer_norm(1e-5, name="norm2", **self.dt)(x)
    x = x + Attention(name="attn2", **attn)(h, context)
    h = layers.layer_norm(1e-5, name="norm3", **self.dt)(x)
    x = x + FeedForward(name="ff", **self.dt)(h)
    return layers.constrain(x, layers.ACTIVATION_AXES_BTD)


def remat_module(cls, policy: str):
  """Wrap a block class in `nn.remat` according to a `REMAT_POLICIES` name."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {policy!r}")
  if policy == "none":
    return cls
  jax_policy = None if policy == "block" else getattr(jax.checkpoint_policies, policy)
  return nn.remat(cls, policy=jax_policy)


class _BlockModule(layers.Module):
  """Fields shared by the blocks that hold attention."""

  groups: int = 32
  eps: float = 1e-5
  use_linear_projection: bool = False
  upcast: bool = False
  attention_impl: str = "xla"
  remat_policy: str = "none"

  @property
  def attn_kw(self) -> dict:
    return dict(groups=self.groups, use_linear_projection=self.use_linear_projection,
                upcast=self.upcast, attention_impl=self.attention_impl,
                remat_policy=self.remat_policy, **self.dt)

  @property
  def resnet_cls(self):
    return remat_module(ResnetBlock2D, self.remat_policy)

  @property
  def resnet_kw(self) -> dict:
    return dict(out_channels=self.channels, groups=self.groups, eps=self.eps, **self.dt)


class Transformer2DModel(layers.Module):
  """Spatial transformer: GroupNorm, proj_in (1x1 conv or linear), blocks, proj_out, residual."""

  heads: int = 8
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  upcast: bool = False
  attention_impl: str = "xla"
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x, context):
    b, hgt, wid, c = x.shape
    residual = x
    h = layers.group_norm(self.groups, 1e-6, name="norm", **self.dt)(x)
    if self.use_linear_projection:
      h = h.reshape(b, hgt * wid, c)
      # The logical axes of the 1x1 conv this replaces (a kernel cannot name `embed` twice).
      h = layers.dense(c, (A.CONV_IN, A.CONV_OUT), name="proj_in", **self.dt)(h)
    else:
      h = layers.conv(c, 1, name="proj_in", **self.dt)(h)
      h = h.reshape(b, hgt * wid, c)
    h = layers.constrain(h, layers.ACTIVATION_AXES_BTD)
    block_cls = remat_module(BasicTransformerBlock, self.remat_policy)
    for i in range(self.num_layers):
      h = block_cls(heads=self.heads, upcast=self.upcast, attention_impl=self.attention_impl,
                    name=f"transformer_blocks_{i}", **self.dt)(h, context)
    if self.use_linear_projection:
      h = layers.dense(c, (A.CONV_IN, A.CONV_OUT), name="proj_out", **self.dt)(h)
      h = h.reshape(b, hgt, wid, c)
    else:
      h = h.reshape(b, hgt, wid, c)
      h = layers.conv(c, 1, name="proj_out", **self.dt)(h)
    return h + residual


class Downsample2D(layers.Module):
  channels: int = 320

  @nn.compact
  def __call__(self, x):
    return layers.conv(self.channels, 3, stride=2, padding=1, name="conv", **self.dt)(x)


class Upsample2D(layers.Module):
  channels: int = 320

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
    return layers.conv(self.channels, 3, name="conv", **self.dt)(x)


class DownBlock2D(_BlockModule):
  """`CrossAttnDownBlock2D` (with_attention) or `DownBlock2D`; returns (x, skip activations)."""

  channels: int = 320
  num_layers: int = 2
  heads: int = 8
  transformer_layers: int = 1
  with_attention: bool = True
  add_downsample: bool = True

  @nn.compact
  def __call__(self, x, temb, context):
    skips = []
    for j in range(self.num_layers):
      x = self.resnet_cls(name=f"resnets_{j}", **self.resnet_kw)(x, temb)
      if self.with_attention:
        x = Transformer2DModel(heads=self.heads, num_layers=self.transformer_layers,
                               name=f"attentions_{j}", **self.attn_kw)(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(channels=self.channels, name="downsamplers_0", **self.dt)(x)
      skips.append(x)
    return x, skips


class MidBlock2DCrossAttn(_BlockModule):
  channels: int = 1280
  heads: int = 8
  transformer_layers: int = 1

  @nn.compact
  def __call__(self, x, temb, context):
    x = self.resnet_cls(name="resnets_0", **self.resnet_kw)(x, temb)
    x = Transformer2DModel(heads=self.heads, num_layers=self.transformer_layers,
                           name="attentions_0", **self.attn_kw)(x, context)
    return self.resnet_cls(name="resnets_1", **self.resnet_kw)(x, temb)


class UpBlock2D(_BlockModule):
  """`CrossAttnUpBlock2D` (with_attention) or `UpBlock2D`; consumes its skips last-first."""

  channels: int = 320
  num_layers: int = 3
  heads: int = 8
  transformer_layers: int = 1
  with_attention: bool = True
  add_upsample: bool = True

  @nn.compact
  def __call__(self, x, skips, temb, context, skip_transform: Optional[SkipTransform] = None):
    skips = list(skips)
    for j in range(self.num_layers):
      skip = skips.pop()
      if skip_transform is not None:
        x, skip = skip_transform(x, skip)
      x = jnp.concatenate([x, skip], axis=-1)
      x = self.resnet_cls(name=f"resnets_{j}", **self.resnet_kw)(x, temb)
      if self.with_attention:
        x = Transformer2DModel(heads=self.heads, num_layers=self.transformer_layers,
                               name=f"attentions_{j}", **self.attn_kw)(x, context)
    if self.add_upsample:
      x = Upsample2D(channels=self.channels, name="upsamplers_0", **self.dt)(x)
    return x


class UNet2DConditionModel(layers.Module):
  """Stable Diffusion's conditional UNet (SD 1.x / 2.x, and SDXL with `added_cond_kwargs`). See
  the module docstring for the layout.

  `remat_policy`: "none"; "block" (recompute every resnet and transformer block in the backward
  pass); "dots_saveable" / "nothing_saveable" (the same, with that `jax.checkpoint_policies`
  policy). `attention_impl`: see `layers.dot_product_attention`.
  """

  config: unet_config.UNetConfig
  attention_impl: str = "xla"
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
               added_cond_kwargs: Optional[Mapping[str, jax.Array]] = None,
               skip_transform: Optional[SkipTransform] = None) -> jax.Array:
    cfg = self.config
    dt = self.dt
    channels, heads, tlayers = cfg.block_out_channels, cfg.heads_per_block, cfg.transformer_layers
    n = len(channels)
    block_kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                    use_linear_projection=cfg.use_linear_projection,
                    upcast=cfg.upcast_attention, attention_impl=self.attention_impl,
                    remat_policy=self.remat_policy, **dt)

    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim == 0:
      timesteps = jnp.broadcast_to(timesteps, (sample.shape[0],))
    t_emb = timestep_embedding(timesteps, channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                               freq_shift=cfg.freq_shift).astype(self.dtype)
    temb = TimestepEmbedding(features=4 * channels[0], name="time_embedding", **dt)(t_emb)
    if cfg.addition_embed_type == "text_time":
      temb = temb + TimestepEmbedding(features=4 * channels[0], name="add_embedding",
                                      **dt)(self._text_time_inputs(added_cond_kwargs))
    elif added_cond_kwargs is not None:
      raise ValueError("added_cond_kwargs given to a UNet without addition embeddings "
                       f"(addition_embed_type={cfg.addition_embed_type!r})")
    context = layers.constrain(encoder_hidden_states.astype(self.dtype),
                               (A.BATCH, A.KV_LENGTH, A.EMBED))

    x = layers.conv(channels[0], cfg.conv_in_kernel, name="conv_in",
                    **dt)(sample.astype(self.dtype))
    skips = [x]
    for i, block_type in enumerate(cfg.down_block_types):
      x, block_skips = DownBlock2D(
          channels=channels[i], num_layers=cfg.layers_per_block, heads=heads[i],
          transformer_layers=tlayers[i], with_attention=block_type == "CrossAttnDownBlock2D",
          add_downsample=i < n - 1, name=f"down_blocks_{i}", **block_kw)(x, temb, context)
      skips.extend(block_skips)

    x = MidBlock2DCrossAttn(channels=channels[-1], heads=heads[-1], transformer_layers=tlayers[-1],
                            name="mid_block", **block_kw)(x, temb, context)

    per_up = cfg.layers_per_block + 1
    for i, block_type in enumerate(cfg.up_block_types):
      block_skips, skips = skips[-per_up:], skips[:-per_up]
      x = UpBlock2D(
          channels=channels[n - 1 - i], num_layers=per_up, heads=heads[n - 1 - i],
          transformer_layers=tlayers[n - 1 - i],
          with_attention=block_type == "CrossAttnUpBlock2D", add_upsample=i < n - 1,
          name=f"up_blocks_{i}", **block_kw)(x, block_skips, temb, context, skip_transform)

    x = layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **dt)(x)
    x = layers.conv(cfg.out_channels, cfg.conv_out_kernel, name="conv_out", **dt)(nn.silu(x))
    return x

  @nn.nowrap
  def _text_time_inputs(self, added_cond_kwargs: Optional[Mapping[str, jax.Array]]
                        ) -> jax.Array:
    """diffusers' "text_time" input of `add_embedding`: concat(text_embeds, sinusoidal
    embedding of each time id (`add_time_proj`, addition_time_embed_dim each)), (B, P + K*E)."""
    cfg = self.config
    missing = [k for k in ("text_embeds", "time_ids") if k not in (added_cond_kwargs or {})]
    if missing:
      raise ValueError(f"a UNet with addition_embed_type='text_time' (SDXL) needs "
                       f"added_cond_kwargs with {missing} (pooled text embeddings (B, P) and "
                       "micro-conditioning time ids (B, K))")
    text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"])
    time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
    batch = text_embeds.shape[0]
    time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                     flip_sin_to_cos=cfg.flip_sin_to_cos,
                                     freq_shift=cfg.freq_shift).reshape(batch, -1)
    add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
    if add_embeds.shape[-1] != cfg.projection_class_embeddings_input_dim:
      raise ValueError(
          f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape} give "
          f"{text_embeds.shape[-1]} + {time_ids.shape[-1]} x {cfg.addition_time_embed_dim} = "
          f"{add_embeds.shape[-1]} add_embedding inputs; the config's "
          f"projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}")
    return add_embeds.astype(self.dtype)

  @nn.nowrap
  def dummy_inputs(self) -> tuple:
    """Input shapes for `layers.abstract_params` / `layers.init_params`: one latent of the
    smallest side the blocks accept, one timestep, 8 context tokens; with "text_time" also
    `added_cond_kwargs` (6 time ids when the dims allow it: only their total width, the
    config's projection_class_embeddings_input_dim, shapes the parameters)."""
    cfg = self.config
    side = 2 ** (len(cfg.block_out_channels) - 1)
    inputs = (jax.ShapeDtypeStruct((1, side, side, cfg.in_channels), jnp.float32),
              jax.ShapeDtypeStruct((1,), jnp.int32),
              jax.ShapeDtypeStruct((1, 8, cfg.cross_attention_dim), jnp.float32))
    if cfg.addition_embed_type != "text_time":
      return inputs
    total, per_id = cfg.projection_class_embeddings_input_dim, cfg.addition_time_embed_dim
    n_ids = 6 if total > 6 * per_id else 1
    return inputs + ({"text_embeds": jax.ShapeDtypeStruct((1, total - n_ids * per_id),
                                                          jnp.float32),
                      "time_ids": jax.ShapeDtypeStruct((1, n_ids), jnp.float32)},)
