"""Flax UNet2DConditionModel for Stable Diffusion 1.x / 2.x, built from a diffusers config.json.

API layout (channels-last): `sample` (B, H, W, C_in) latents, `timesteps` (B,) or scalar,
`encoder_hidden_states` (B, T, cross_attention_dim); returns the model output (B, H, W, C_out),
epsilon or v depending on the checkpoint's `prediction_type` (that lives in the scheduler config;
the network itself does not care).

Module names mirror diffusers' state-dict keys (see `layers.py`), so `convert.py` maps weights
with no per-model table. diffusers' `attention_head_dim` is, for SD 1.x/2.x checkpoints, the
*number of heads* (a historical naming quirk that diffusers keeps); `UNetConfig.heads_per_block`
resolves it the same way diffusers does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from scdpo_jax.models import layers
from scdpo_jax.models.layers import A, Dtype

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
REMAT_POLICIES = ("none", "block", "dots_saveable", "nothing_saveable")

# Config options whose non-default values we do not implement; loading fails loudly on them.
_MUST_EQUAL = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
    "mid_block_scale_factor": 1.0,
    "act_fn": "silu",
    "downsample_padding": 1,
}


def _as_tuple(value: Any, n: int, key: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"UNet config: {key} has {len(value)} entries but there are {n} blocks")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The subset of diffusers' UNet2DConditionModel config that SD 1.x/2.x use."""

  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 768
  transformer_layers_per_block: Any = 1
  attention_head_dim: Any = 8
  num_attention_heads: Any = None
  use_linear_projection: bool = False
  upcast_attention: bool = False
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  extra: tuple = ()  # other keys of the source config, written back unchanged on export

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
    """Validate a diffusers config dict; unsupported options raise with the key named."""
    for key, default in _MUST_EQUAL.items():
      value = d.get(key, default)
      if isinstance(default, float) and value is not None:
        ok = float(value) == default
      else:
        ok = value == default
      if not ok:
        raise ValueError(f"UNet config option {key}={value!r} is not supported "
                         f"(supported: {default!r})")
    if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
      raise ValueError(f"UNet config _class_name={d['_class_name']!r} is not supported "
                       "(supported: 'UNet2DConditionModel')")
    fields = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
    if isinstance(kwargs.get("layers_per_block", 2), tuple):
      raise ValueError("UNet config: a per-block layers_per_block list is not supported "
                       "(SD 1.x/2.x use one int)")
    extra = tuple(sorted((k, v) for k, v in d.items()
                         if k not in fields and k not in _MUST_EQUAL
                         and not isinstance(v, (list, dict))))
    cfg = cls(**kwargs, extra=extra)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError("UNet config: down_block_types, up_block_types and block_out_channels "
                       f"must have the same length, got {len(self.down_block_types)}, "
                       f"{len(self.up_block_types)} and {n}")
    for key, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
      for t in types:
        if t not in allowed:
          raise ValueError(f"UNet config: {key} entry {t!r} is not supported "
                           f"(supported: {allowed})")
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(f"UNet config: mid_block_type={self.mid_block_type!r} is not supported "
                       f"(supported: {MID_BLOCK_TYPES})")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"UNet config: block_out_channels {self.block_out_channels} must be "
                         f"divisible by norm_num_groups={self.norm_num_groups}")
    _as_tuple(self.transformer_layers_per_block, n, "transformer_layers_per_block")
    for c, h in zip(self.block_out_channels, self.heads_per_block):
      if c % h:
        raise ValueError(f"UNet config: {c} channels do not split into {h} attention heads")

  @property
  def heads_per_block(self) -> tuple[int, ...]:
    # diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
    heads = self.num_attention_heads or self.attention_head_dim
    return _as_tuple(heads, len(self.block_out_channels), "attention_head_dim")

  @property
  def transformer_layers(self) -> tuple[int, ...]:
    return _as_tuple(self.transformer_layers_per_block, len(self.block_out_channels),
                     "transformer_layers_per_block")

  def to_dict(self) -> dict[str, Any]:
    """A config.json dict that diffusers' UNet2DConditionModel.from_pretrained accepts."""
    d = dict(self.extra)
    for f in dataclasses.fields(self):
      if f.name == "extra":
        continue
      v = getattr(self, f.name)
      d[f.name] = list(v) if isinstance(v, tuple) else v
    d.update({k: v for k, v in _MUST_EQUAL.items() if k not in ("reverse_transformer_layers_per_block",)})
    d["_class_name"] = "UNet2DConditionModel"
    d.setdefault("_diffusers_version", "0.42.1")
    return d


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


class _Module(nn.Module):
  """Fields every UNet submodule shares."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def dt(self) -> dict:
    return {"dtype": self.dtype, "param_dtype": self.param_dtype}


class TimestepEmbedding(_Module):
  features: int = 1280

  @nn.compact
  def __call__(self, x):
    x = layers.dense(self.features, (A.EMBED, A.MLP), name="linear_1", **self.dt)(x)
    x = nn.silu(x)
    return layers.dense(self.features, (A.MLP, A.EMBED), name="linear_2", **self.dt)(x)


class ResnetBlock2D(_Module):
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


class Attention(_Module):
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


class GEGLU(_Module):
  features: int = 1280

  @nn.compact
  def __call__(self, x):
    h = layers.dense(2 * self.features, (A.EMBED, A.MLP), name="proj", **self.dt)(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * layers.gelu_exact(gate)


class FeedForward(_Module):
  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    h = GEGLU(features=4 * dim, name="net_0", **self.dt)(x)
    return layers.dense(dim, (A.MLP, A.EMBED), name="net_2", **self.dt)(h)


class BasicTransformerBlock(_Module):
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


class _BlockModule(_Module):
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


class Transformer2DModel(_Module):
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
      h = layers.dense(c, (A.EMBED, A.EMBED), name="proj_in", **self.dt)(h)
    else:
      h = layers.conv(c, 1, name="proj_in", **self.dt)(h)
      h = h.reshape(b, hgt * wid, c)
    h = layers.constrain(h, layers.ACTIVATION_AXES_BTD)
    block_cls = remat_module(BasicTransformerBlock, self.remat_policy)
    for i in range(self.num_layers):
      h = block_cls(heads=self.heads, upcast=self.upcast, attention_impl=self.attention_impl,
                    name=f"transformer_blocks_{i}", **self.dt)(h, context)
    if self.use_linear_projection:
      h = layers.dense(c, (A.EMBED, A.EMBED), name="proj_out", **self.dt)(h)
      h = h.reshape(b, hgt, wid, c)
    else:
      h = h.reshape(b, hgt, wid, c)
      h = layers.conv(c, 1, name="proj_out", **self.dt)(h)
    return h + residual


class Downsample2D(_Module):
  channels: int = 320

  @nn.compact
  def __call__(self, x):
    return layers.conv(self.channels, 3, stride=2, padding=1, name="conv", **self.dt)(x)


class Upsample2D(_Module):
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
      x = self.resnet_cls(out_channels=self.channels, groups=self.groups, eps=self.eps, name=f"resnets_{j}",
                          **self.dt)(x, temb)
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
    x = self.resnet_cls(out_channels=self.channels, groups=self.groups, eps=self.eps, name="resnets_0", **self.dt)(x, temb)
    x = Transformer2DModel(heads=self.heads, num_layers=self.transformer_layers,
                           name="attentions_0", **self.attn_kw)(x, context)
    return self.resnet_cls(out_channels=self.channels, groups=self.groups, eps=self.eps, name="resnets_1",
                           **self.dt)(x, temb)


class UpBlock2D(_BlockModule):
  """`CrossAttnUpBlock2D` (with_attention) or `UpBlock2D`; consumes its skips last-first."""

  channels: int = 320
  num_layers: int = 3
  heads: int = 8
  transformer_layers: int = 1
  with_attention: bool = True
  add_upsample: bool = True

  @nn.compact
  def __call__(self, x, skips, temb, context):
    skips = list(skips)
    for j in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = self.resnet_cls(out_channels=self.channels, groups=self.groups, eps=self.eps, name=f"resnets_{j}",
                          **self.dt)(x, temb)
      if self.with_attention:
        x = Transformer2DModel(heads=self.heads, num_layers=self.transformer_layers,
                               name=f"attentions_{j}", **self.attn_kw)(x, context)
    if self.add_upsample:
      x = Upsample2D(channels=self.channels, name="upsamplers_0", **self.dt)(x)
    return x


class UNet2DConditionModel(nn.Module):
  """Stable Diffusion's conditional UNet. See the module docstring for the layout.

  `remat_policy`: "none"; "block" (recompute every resnet and transformer block in the backward
  pass); "dots_saveable" / "nothing_saveable" (the same, with that `jax.checkpoint_policies`
  policy). `attention_impl`: see `layers.dot_product_attention`.
  """

  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "xla"
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array,
               encoder_hidden_states: jax.Array) -> jax.Array:
    cfg = self.config
    dt = {"dtype": self.dtype, "param_dtype": self.param_dtype}
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
          name=f"up_blocks_{i}", **block_kw)(x, block_skips, temb, context)

    x = layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **dt)(x)
    x = layers.conv(cfg.out_channels, cfg.conv_out_kernel, name="conv_out", **dt)(nn.silu(x))
    return x

  def init_inputs(self, batch_size: int = 1, seq_len: int = 77):
    """Dummy inputs of the right shapes for `init` / `jax.eval_shape`."""
    cfg = self.config
    s = cfg.sample_size
    return (jnp.zeros((batch_size, s, s, cfg.in_channels), self.dtype),
            jnp.zeros((batch_size,), jnp.int32),
            jnp.zeros((batch_size, seq_len, cfg.cross_attention_dim), self.dtype))


# ----------------------------------------------------------------------------- loading / export

WEIGHTS_STEM = "diffusion_pytorch_model"


def unet_param_shapes(model: UNet2DConditionModel) -> Any:
  """Parameter tree of `model` as ShapeDtypeStructs (boxed with logical names), no compute."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *model.init_inputs(1, 8)))["params"]


def load_unet(folder, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
              variant: str | None = None, attention_impl: str = "xla",
              remat_policy: str = "none") -> tuple[UNet2DConditionModel, dict]:
  """Load a diffusers `unet/` folder (config.json + safetensors) without torch.

  Returns (module, params) with params as NumPy arrays in `param_dtype`; put them on devices
  (or shard them) with `jax.device_put`.
  """
  from scdpo_jax.models import convert, io

  folder = io.require_dir(folder, "UNet")
  config = UNetConfig.from_dict(io.read_json(folder / "config.json", "UNet config"))
  model = UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype,
                               attention_impl=attention_impl, remat_policy=remat_policy)
  state = io.load_safetensors(folder, WEIGHTS_STEM, "UNet", variant=variant)
  params = convert.torch_to_flax(state, unet_param_shapes(model), source=str(folder),
                                 dtype=param_dtype)
  return model, params


def save_unet(folder, config: UNetConfig, params: Any, *, dtype: Any = None) -> None:
  """Write `params` as a diffusers `unet/` folder that `UNet2DConditionModel.from_pretrained` loads."""
  from scdpo_jax.models import convert, io

  io.write_json(f"{folder}/config.json", config.to_dict())
  io.save_safetensors(convert.flax_to_torch(params, dtype=dtype),
                      f"{folder}/{WEIGHTS_STEM}.safetensors")
