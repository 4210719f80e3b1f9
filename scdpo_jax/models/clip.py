"""CLIP text and vision towers in Flax, loaded from Hugging Face folders without torch.

Layout and conventions (see `layers.py` for the shared ones):

* Text input is `input_ids` (B, T) int with T <= `max_position_embeddings`; activations are
  (B, T, D). Image input is `pixel_values` **channels-last** (B, H, W, C) with H = W =
  `image_size`, already normalised the way CLIPImageProcessor does it (transpose PyTorch's NCHW
  with `x.transpose(0, 2, 3, 1)`). The vision token sequence is [CLS, patches in row-major
  order], like transformers.
* Module names mirror transformers' state-dict keys: `CLIPTextModel` holds `text_model`
  (`embeddings`, `encoder/layers_i`, `final_layer_norm`) and, with projection, `text_projection`;
  `CLIPVisionModel` holds `vision_model` (`embeddings`, `pre_layrnorm` (HF's spelling),
  `encoder/layers_i`, `post_layernorm`) and, with projection, `visual_projection`. Both towers share
  `CLIPEncoderLayer`.
* Numerics follow transformers 5: pre-LN blocks, attention scaled by head_dim**-0.5, the text
  tower always causal (combined with an optional padding mask), text pooling at the EOS token
  (`_pool_eos`), vision pooling = `post_layernorm` of the CLS token, projections without bias.
* `attention_impl="cudnn"` / `"auto"` (bf16/fp16 on GPU) runs the fused kernel in the forward
  pass (checked on an H100), but cuDNN's backward rejects odd sequence lengths (77 text tokens,
  257 ViT-L/14 tokens), so take gradients through these towers with `attention_impl="xla"`.
* Parameters come back from the loaders as the plain (unboxed) `params` collection, to be used as
  `module.apply({"params": params}, ...)`; `abstract_params(module)` gives the same tree as
  shape/dtype structs boxed with logical axis names, for building shardings.

Checkpoints: transformers >= 5 saves a bare `CLIPTextModel` / `CLIPVisionModel` without the
`text_model.` / `vision_model.` key prefix, older versions (and the `text_encoder/` folders of
Stable Diffusion repos) with it; the loaders accept both, plus `*WithProjection` folders and full
`CLIPModel` folders (the other tower and `logit_scale` are skipped). The savers always write the
prefixed layout, which transformers 4 and 5 both load.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import flax
import flax.linen as nn
from flax.core import meta

from scdpo_jax.models import convert, io, layers
from scdpo_jax.models.layers import A, ACTIVATION_AXES_BTD, Dtype

SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")

TEXT_ARCHITECTURE = "CLIPTextModel"
TEXT_PROJ_ARCHITECTURE = "CLIPTextModelWithProjection"
VISION_ARCHITECTURE = "CLIPVisionModel"
VISION_PROJ_ARCHITECTURE = "CLIPVisionModelWithProjection"
FULL_ARCHITECTURE = "CLIPModel"

TEXT_MODEL_TYPE = "clip_text_model"
VISION_MODEL_TYPE = "clip_vision_model"
FULL_MODEL_TYPE = "clip"


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def _check_choice(key: str, value: Any, supported: Sequence[Any]) -> None:
  if value not in supported:
    raise ValueError(f"unsupported CLIP config value {key}={value!r}; supported: {list(supported)}")


def _check_positive(cfg: Any, keys: Iterable[str]) -> None:
  for key in keys:
    value = getattr(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"CLIP config {key} must be a positive int, got {value!r}")


def _square_size(key: str, value: Any) -> int:
  """HF allows `image_size` / `patch_size` as an int or an (h, w) pair; we support squares."""
  if isinstance(value, (list, tuple)):
    if len(value) == 2 and value[0] == value[1]:
      return int(value[0])
    raise ValueError(f"unsupported CLIP config value {key}={value!r}; supported: an int or a "
                     "square [n, n] pair")
  return value


def _known_fields(cls: type, d: Mapping[str, Any], nullable: Iterable[str] = ()) -> dict:
  """The entries of `d` that are fields of `cls`; `None` means "default" unless nullable."""
  names = {f.name for f in dataclasses.fields(cls)}
  nullable = set(nullable)
  return {k: v for k, v in d.items() if k in names and (v is not None or k in nullable)}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The CLIP text tower hyper-parameters (transformers' `CLIPTextConfig`, defaults included).

  `eos_token_id` picks the pooled token: 2 is the legacy value of old OpenAI configs (pool at
  `argmax(input_ids)`, i.e. the highest token id, which is EOS for the original vocabulary);
  anything else pools at the first position holding `eos_token_id`.
  """

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  pad_token_id: Optional[int] = 1
  bos_token_id: Optional[int] = 49406
  eos_token_id: int = 49407

  def __post_init__(self):
    _check_choice("hidden_act", self.hidden_act, SUPPORTED_ACTIVATIONS)
    _check_positive(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "max_position_embeddings", "projection_dim"))
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIP config hidden_size={self.hidden_size} is not a multiple of "
                       f"num_attention_heads={self.num_attention_heads}")
    if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int):
      raise ValueError(f"unsupported CLIP config value eos_token_id={self.eos_token_id!r}; "
                       "supported: a single int token id")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
    """From a transformers `clip_text_model` config dict; unknown keys are ignored."""
    kw = _known_fields(cls, d, nullable=("pad_token_id", "bos_token_id", "eos_token_id"))
    eos = kw.get("eos_token_id")
    if isinstance(eos, (list, tuple)) and len(eos) == 1:
      kw["eos_token_id"] = eos[0]
    return cls(**kw)

  def to_dict(self) -> dict[str, Any]:
    """A transformers-compatible `CLIPTextConfig` dict (without "architectures")."""
    return {**dataclasses.asdict(self), "model_type": TEXT_MODEL_TYPE}

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """CLIP vision tower hyper-parameters (transformers' `CLIPVisionConfig` and its defaults)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512

  def __post_init__(self):
    _check_choice("hidden_act", self.hidden_act, SUPPORTED_ACTIVATIONS)
    _check_positive(self, ("hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "num_channels", "image_size", "patch_size",
                           "projection_dim"))
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIP config hidden_size={self.hidden_size} is not a multiple of "
                       f"num_attention_heads={self.num_attention_heads}")
    if self.patch_size > self.image_size:
      raise ValueError(f"CLIP config patch_size={self.patch_size} exceeds "
                       f"image_size={self.image_size}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
    """From a transformers `clip_vision_model` config dict; unknown keys are ignored."""
    kw = _known_fields(cls, d)
    for key in ("image_size", "patch_size"):
      if key in kw:
        kw[key] = _square_size(key, kw[key])
    return cls(**kw)

  def to_dict(self) -> dict[str, Any]:
    """A transformers-compatible `CLIPVisionConfig` dict (without "architectures")."""
    return {**dataclasses.asdict(self), "model_type": VISION_MODEL_TYPE}

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    """Sequence length of the vision tower: CLS + patches."""
    return self.num_patches + 1


TowerConfig = Union[CLIPTextConfig, CLIPVisionConfig]


def is_full_clip_config(d: Mapping[str, Any]) -> bool:
  """True for a full `CLIPModel` config.json (nested `text_config` / `vision_config`)."""
  return (d.get("model_type") == FULL_MODEL_TYPE or "text_config" in d or "vision_config" in d
          or FULL_ARCHITECTURE in (d.get("architectures") or ()))


def _sub_config(d: Mapping[str, Any], name: str) -> dict[str, Any]:
  sub = dict(d.get(name) or {})
  sub.update(d.get(f"{name}_dict") or {})  # old configs also carry `text_config_dict`
  if d.get("projection_dim") is not None:
    # CLIPModel's projections use the top-level projection_dim, not the towers' own value.
    sub["projection_dim"] = d["projection_dim"]
  return sub


def text_config_from_hf(d: Mapping[str, Any]) -> CLIPTextConfig:
  """A `CLIPTextConfig` from a text-tower config.json or a full `CLIPModel` one."""
  if is_full_clip_config(d):
    return CLIPTextConfig.from_dict(_sub_config(d, "text_config"))
  if d.get("model_type") == VISION_MODEL_TYPE:
    raise ValueError("expected a CLIP text config, got a CLIP vision config "
                     f"(model_type={VISION_MODEL_TYPE!r})")
  return CLIPTextConfig.from_dict(d)


def vision_config_from_hf(d: Mapping[str, Any]) -> CLIPVisionConfig:
  """A `CLIPVisionConfig` from a vision-tower config.json or a full `CLIPModel` one."""
  if is_full_clip_config(d):
    return CLIPVisionConfig.from_dict(_sub_config(d, "vision_config"))
  if d.get("model_type") == TEXT_MODEL_TYPE:
    raise ValueError("expected a CLIP vision config, got a CLIP text config "
                     f"(model_type={TEXT_MODEL_TYPE!r})")
  return CLIPVisionConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class CLIPTextOutput:
  """`last_hidden_state` (B, T, D) is after `final_layer_norm`; `pooler_output` (B, D) is its EOS
  row; `hidden_states` (when requested) is (embeddings, layer 1 output, ..., layer L output), the
  last one *before* the final LayerNorm, as in transformers; `text_embeds` (B, P) with projection.
  """

  last_hidden_state: jax.Array
  pooler_output: jax.Array
  hidden_states: Optional[tuple[jax.Array, ...]] = None
  text_embeds: Optional[jax.Array] = None


@flax.struct.dataclass
class CLIPVisionOutput:
  """`last_hidden_state` (B, 1 + N, D) is the last layer's output (no LayerNorm after it);
  `pooler_output` (B, D) is `post_layernorm` of the CLS row; `hidden_states` (when requested) is
  (pre_layrnorm(embeddings), layer 1 output, ..., layer L output); `image_embeds` (B, P) with
  projection.
  """

  last_hidden_state: jax.Array
  pooler_output: jax.Array
  hidden_states: Optional[tuple[jax.Array, ...]] = None
  image_embeds: Optional[jax.Array] = None


# ---------------------------------------------------------------------------------------------
# Shared transformer blocks
# ---------------------------------------------------------------------------------------------


class CLIPAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections (scale head_dim**-0.5)."""

  config: TowerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
               is_causal: bool = False) -> jax.Array:
    d = self.config.hidden_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = layers.dense(d, (A.EMBED, A.HEADS), name="q_proj", **kw)(x)
    k = layers.dense(d, (A.EMBED, A.HEADS), name="k_proj", **kw)(x)
    v = layers.dense(d, (A.EMBED, A.HEADS), name="v_proj", **kw)(x)
    q, k, v = (layers.constrain(t, (A.BATCH, A.LENGTH, A.HEADS)) for t in (q, k, v))
    out = layers.dot_product_attention(
        q, k, v, num_heads=self.config.num_attention_heads, mask=mask, is_causal=is_causal,
        implementation=self.attention_impl)
    return layers.dense(d, (A.HEADS, A.EMBED), name="out_proj", **kw)(out)


class CLIPMLP(nn.Module):
  config: TowerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.dense(self.config.intermediate_size, (A.EMBED, A.MLP), name="fc1", **kw)(x)
    h = layers.get_activation(self.config.hidden_act)(h)
    h = layers.constrain(h, (A.BATCH, A.LENGTH, A.MLP))
    return layers.dense(self.config.hidden_size, (A.MLP, A.EMBED), name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN transformer block, shared by the text and vision towers."""

  config: TowerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
               is_causal: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.config.layer_norm_eps
    h = layers.layer_norm(eps, name="layer_norm1", **kw)(x)
    h = CLIPAttention(self.config, attention_impl=self.attention_impl, name="self_attn", **kw)(
        h, mask, is_causal)
    x = layers.constrain(x + h, ACTIVATION_AXES_BTD)
    h = layers.layer_norm(eps, name="layer_norm2", **kw)(x)
    h = CLIPMLP(self.config, name="mlp", **kw)(h)
    return layers.constrain(x + h, ACTIVATION_AXES_BTD)


class CLIPEncoder(nn.Module):
  """`num_hidden_layers` blocks named `layers_i`; can stop after the first `num_layers`."""

  config: TowerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  def setup(self):
    self.layers = [
        CLIPEncoderLayer(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                         attention_impl=self.attention_impl, name=f"layers_{i}")
        for i in range(self.config.num_hidden_layers)
    ]

  def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None, is_causal: bool = False,
               output_hidden_states: bool = False, num_layers: Optional[int] = None
               ) -> tuple[jax.Array, Optional[tuple[jax.Array, ...]]]:
    """Returns (output, hidden_states); hidden_states = (input, each layer's output) or None."""
    hidden = [x] if output_hidden_states else None
    for layer in self.layers[:num_layers]:
      x = layer(x, mask, is_causal)
      if hidden is not None:
        hidden.append(x)
    return x, (tuple(hidden) if hidden is not None else None)


# ---------------------------------------------------------------------------------------------
# Text tower
# ---------------------------------------------------------------------------------------------


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = layers.embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding", **kw)(input_ids)
    positions = jnp.arange(input_ids.shape[1])[None]
    pos = layers.embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding",
                       **kw)(positions)
    return layers.constrain(tokens + pos, ACTIVATION_AXES_BTD)


def _pool_eos(x: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """The row of `x` (B, T, D) at each sequence's EOS token, exactly as transformers 5 picks it."""
  if eos_token_id == 2:
    # Legacy configs: EOS is the highest id of the original vocabulary.
    idx = jnp.argmax(input_ids, axis=-1)
  else:
    # First position holding EOS (the pad token may equal EOS); 0 when a row has none.
    idx = jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)
  return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]


class CLIPTextTransformer(nn.Module):
  """transformers' `text_model`: embeddings, causal encoder, final LayerNorm, EOS pooling."""

  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embeddings = CLIPTextEmbeddings(self.config, name="embeddings", **kw)
    self.encoder = CLIPEncoder(self.config, attention_impl=self.attention_impl, name="encoder",
                               **kw)
    self.final_layer_norm = layers.layer_norm(self.config.layer_norm_eps, name="final_layer_norm",
                                              **kw)

  def _encode(self, input_ids: jax.Array, attention_mask: Optional[jax.Array],
              output_hidden_states: bool, num_layers: Optional[int] = None):
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    if input_ids.shape[1] > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                       f"{self.config.max_position_embeddings}")
    mask = None
    if attention_mask is not None:
      # (B, 1, T, S), True for keys to attend; the causal part comes from `is_causal`. cuDNN's
      # fused kernel turns the mask into a bias that must have the full (T, S) extent.
      b, t = input_ids.shape
      mask = jnp.broadcast_to(attention_mask.astype(jnp.bool_)[:, None, None, :], (b, 1, t, t))
    x = self.embeddings(input_ids)
    return self.encoder(x, mask=mask, is_causal=True, output_hidden_states=output_hidden_states,
                        num_layers=num_layers)

  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
               output_hidden_states: bool = False) -> CLIPTextOutput:
    x, hidden = self._encode(input_ids, attention_mask, output_hidden_states)
    x = self.final_layer_norm(x)
    return CLIPTextOutput(last_hidden_state=x,
                          pooler_output=_pool_eos(x, input_ids, self.config.eos_token_id),
                          hidden_states=hidden)

  def hidden_state_at(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None, *,
                      layer: int = -1, apply_final_layer_norm: bool = True) -> jax.Array:
    """`hidden_states[layer]` (optionally through `final_layer_norm`), running only the layers
    needed. See `CLIPTextModel.encode_prompt_states`."""
    n = self.config.num_hidden_layers
    if not -(n + 1) <= layer <= n:
      raise ValueError(f"layer must be in [{-(n + 1)}, {n}] for a {n}-layer text encoder, "
                       f"got {layer}")
    index = layer % (n + 1)  # index into (embeddings, layer 1, ..., layer n)
    x, _ = self._encode(input_ids, attention_mask, False, num_layers=index)
    return self.final_layer_norm(x) if apply_final_layer_norm else x


class CLIPTextModel(nn.Module):
  """CLIP text encoder; `with_projection=True` is transformers' `CLIPTextModelWithProjection`.

  Parameters: `text_model/...` and, with projection, `text_projection/kernel` (D, P).
  """

  config: CLIPTextConfig
  with_projection: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  def setup(self):
    self.text_model = CLIPTextTransformer(
        self.config, dtype=self.dtype, param_dtype=self.param_dtype,
        attention_impl=self.attention_impl, name="text_model")
    if self.with_projection:
      self.text_projection = layers.dense(
          self.config.projection_dim, (A.EMBED, None), use_bias=False, dtype=self.dtype,
          param_dtype=self.param_dtype, name="text_projection")

  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
               output_hidden_states: bool = False) -> CLIPTextOutput:
    """`input_ids` (B, T) int; `attention_mask` (B, T), 1/True for real tokens (padding mask,
    combined with the always-on causal mask). Rows of padded *query* positions are only
    meaningful with right padding (transformers' convention for CLIP)."""
    out = self.text_model(input_ids, attention_mask, output_hidden_states)
    if self.with_projection:
      out = out.replace(text_embeds=self.text_projection(out.pooler_output))
    return out

  def encode_prompt_states(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                           *, layer: int = -1, apply_final_layer_norm: bool = True) -> jax.Array:
    """Prompt states (B, T, D) for a diffusion model's cross-attention.

    `layer` indexes `hidden_states` = (embeddings, layer 1, ..., layer L): -1 is the last layer,
    -2 the penultimate one, etc.; only the layers up to it are run. With
    `apply_final_layer_norm=True` the result goes through `final_layer_norm`, so:

    * `layer=-1` (default) is `last_hidden_state` - what SD 1.x and diffusers' SD 2.x use (SD 2's
      `text_encoder/` config already drops OpenCLIP's last layer, so -1 *is* its penultimate);
    * `layer=-(clip_skip + 1)` reproduces diffusers' `clip_skip` (hidden_states[-(k+1)] then
      final_layer_norm);
    * `layer=-2, apply_final_layer_norm=False` is the raw penultimate state (SDXL-style).

    Use with `module.apply(variables, ids, method=CLIPTextModel.encode_prompt_states, layer=-2)`.
    """
    return self.text_model.hidden_state_at(input_ids, attention_mask, layer=layer,
                                           apply_final_layer_norm=apply_final_layer_norm)


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------


class CLIPVisionEmbeddings(nn.Module):
  """Patchify (conv, stride = patch, no bias), prepend the CLS embedding, add positions."""

  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = pixel_values.shape
    if (h, w) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
      raise ValueError(
          f"pixel_values must be channels-last (B, {cfg.image_size}, {cfg.image_size}, "
          f"{cfg.num_channels}), got {pixel_values.shape}")
    class_embedding = self.param(
        "class_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (A.EMBED,)),
        (cfg.hidden_size,), self.param_dtype)
    patches = layers.conv(cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, padding=0,
                          use_bias=False, name="patch_embedding", **kw)(
                              pixel_values.astype(self.dtype))
    patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major over the patch grid
    cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    pos = layers.embed(cfg.num_positions, cfg.hidden_size, name="position_embedding", **kw)(
        jnp.arange(cfg.num_positions)[None])
    return layers.constrain(x + pos, ACTIVATION_AXES_BTD)


class CLIPVisionTransformer(nn.Module):
  """transformers' `vision_model`: embeddings, pre_layrnorm, encoder, post_layernorm(CLS)."""

  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False
               ) -> CLIPVisionOutput:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.config.layer_norm_eps
    x = CLIPVisionEmbeddings(self.config, name="embeddings", **kw)(pixel_values)
    x = layers.layer_norm(eps, name="pre_layrnorm", **kw)(x)
    x, hidden = CLIPEncoder(self.config, attention_impl=self.attention_impl, name="encoder",
                            **kw)(x, output_hidden_states=output_hidden_states)
    pooled = layers.layer_norm(eps, name="post_layernorm", **kw)(x[:, 0])
    return CLIPVisionOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden)


class CLIPVisionModel(nn.Module):
  """CLIP image encoder; `with_projection=True` is `CLIPVisionModelWithProjection`.

  Input `pixel_values` is channels-last (B, H, W, C). Parameters: `vision_model/...` and, with
  projection, `visual_projection/kernel` (D, P).
  """

  config: CLIPVisionConfig
  with_projection: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False
               ) -> CLIPVisionOutput:
    out = CLIPVisionTransformer(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                                attention_impl=self.attention_impl, name="vision_model")(
                                    pixel_values, output_hidden_states)
    if self.with_projection:
      embeds = layers.dense(self.config.projection_dim, (A.EMBED, None), use_bias=False,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            name="visual_projection")(out.pooler_output)
      out = out.replace(image_embeds=embeds)
    return out


# ---------------------------------------------------------------------------------------------
# Parameter trees, loading and saving
# ---------------------------------------------------------------------------------------------

CLIPModule = Union[CLIPTextModel, CLIPVisionModel]


def _dummy_inputs(module: CLIPModule) -> tuple[jax.ShapeDtypeStruct, ...]:
  cfg = module.config
  if isinstance(module, CLIPTextModel):
    return (jax.ShapeDtypeStruct((1, 1), jnp.int32),)
  return (jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels),
                               jnp.float32),)


def abstract_params(module: CLIPModule) -> Any:
  """The module's `params` as `jax.ShapeDtypeStruct`s boxed with logical axis names (no init)."""
  return jax.eval_shape(module.init, jax.random.key(0), *_dummy_inputs(module))["params"]


def _unwrap_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
  if set(params) == {"params"}:
    return params["params"]
  return params


def _drop_buffers(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drop non-persistent buffers old transformers versions saved (`*.position_ids`)."""
  return {k: v for k, v in state_dict.items()
          if not (k == "position_ids" or k.endswith(".position_ids"))}


def _add_tower_prefix(state_dict: Mapping[str, np.ndarray], tower: str,
                      bare_roots: Sequence[str]) -> dict[str, np.ndarray]:
  """transformers >= 5 saves bare CLIPTextModel / CLIPVisionModel keys without `<tower>.`."""
  roots = tuple(f"{r}." for r in bare_roots)
  return {(f"{tower}.{k}" if k.startswith(roots) else k): v for k, v in state_dict.items()}


def _check_model_type(cfg: Mapping[str, Any], allowed: Sequence[str], folder: Path,
                      hint: str) -> None:
  model_type = cfg.get("model_type")
  if model_type is not None and model_type not in allowed:
    raise ValueError(f"{folder}/config.json has model_type={model_type!r}; expected one of "
                     f"{list(allowed)}. {hint}")


def _load_tower(folder: str | os.PathLike, what: str, variant: Optional[str]
                ) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
  path = io.require_dir(folder, what)
  cfg = io.read_json(path / "config.json", f"{what} config")
  state = _drop_buffers(io.load_safetensors(path, "model", what, variant=variant))
  return path, cfg, state


def _to_device(tree: Any) -> Any:
  return jax.tree.map(jnp.asarray, tree)


def load_clip_text(folder: str | os.PathLike, *, dtype: Dtype = jnp.float32,
                   param_dtype: Dtype = jnp.float32, attention_impl: str = "xla",
                   with_projection: Optional[bool] = None, variant: Optional[str] = None
                   ) -> tuple[CLIPTextModel, dict]:
  """(module, params) from a HF folder holding config.json + model[.variant].safetensors.

  The folder may hold a `CLIPTextModel`, a `CLIPTextModelWithProjection` (e.g. SD's
  `text_encoder/` or SDXL's `text_encoder_2/`) or a full `CLIPModel` (the vision tower and
  `logit_scale` are skipped). `with_projection=None` decides from the checkpoint (a
  `text_projection.weight` key or a *WithProjection / CLIPModel architecture); False drops the
  projection even if present. Parameters are cast to `param_dtype`.
  """
  path, cfg, state = _load_tower(folder, "CLIP text encoder", variant)
  _check_model_type(cfg, (TEXT_MODEL_TYPE, FULL_MODEL_TYPE), path,
                    "Use load_clip_vision for a CLIP vision tower.")
  config = text_config_from_hf(cfg)
  state = _add_tower_prefix(state, "text_model", ("embeddings", "encoder", "final_layer_norm"))
  if with_projection is None:
    archs = cfg.get("architectures") or ()
    with_projection = ("text_projection.weight" in state
                       or any(a in (TEXT_PROJ_ARCHITECTURE, FULL_ARCHITECTURE) for a in archs))
  ignore = ["vision_model.", "visual_projection.", "logit_scale"]
  if not with_projection:
    ignore.append("text_projection.")
  module = CLIPTextModel(config, with_projection=with_projection, dtype=dtype,
                         param_dtype=param_dtype, attention_impl=attention_impl)
  params = convert.torch_to_flax(state, abstract_params(module), source=str(path),
                                 ignore_prefixes=ignore)
  return module, _to_device(params)


def load_clip_vision(folder: str | os.PathLike, *, dtype: Dtype = jnp.float32,
                     param_dtype: Dtype = jnp.float32, attention_impl: str = "xla",
                     with_projection: Optional[bool] = None, variant: Optional[str] = None
                     ) -> tuple[CLIPVisionModel, dict]:
  """(module, params) from a HF `CLIPVisionModel[WithProjection]` or full `CLIPModel` folder.

  Same rules as `load_clip_text`, with `visual_projection.weight` deciding `with_projection`.
  """
  path, cfg, state = _load_tower(folder, "CLIP image encoder", variant)
  _check_model_type(cfg, (VISION_MODEL_TYPE, FULL_MODEL_TYPE), path,
                    "Use load_clip_text for a CLIP text tower.")
  config = vision_config_from_hf(cfg)
  state = _add_tower_prefix(state, "vision_model",
                            ("embeddings", "pre_layrnorm", "encoder", "post_layernorm"))
  if with_projection is None:
    archs = cfg.get("architectures") or ()
    with_projection = ("visual_projection.weight" in state
                       or any(a in (VISION_PROJ_ARCHITECTURE, FULL_ARCHITECTURE) for a in archs))
  ignore = ["text_model.", "text_projection.", "logit_scale"]
  if not with_projection:
    ignore.append("visual_projection.")
  module = CLIPVisionModel(config, with_projection=with_projection, dtype=dtype,
                           param_dtype=param_dtype, attention_impl=attention_impl)
  params = convert.torch_to_flax(state, abstract_params(module), source=str(path),
                                 ignore_prefixes=ignore)
  return module, _to_device(params)


def _check_params(module: CLIPModule, params: Mapping[str, Any], what: str) -> None:
  """Raise `CheckpointMismatchError` if `params` is not shaped like `module`'s tree."""
  want = {p: tuple(s.shape) for p, s in
          flax.traverse_util.flatten_dict(meta.unbox(abstract_params(module))).items()}
  got = {p: tuple(np.shape(v)) for p, v in
         flax.traverse_util.flatten_dict(meta.unbox(dict(params))).items()}
  if want != got:
    bad = sorted("/".join(p) for p in set(want) ^ set(got))
    bad += sorted(f"{'/'.join(p)}: params {got[p]} vs config {want[p]}"
                  for p in set(want) & set(got) if want[p] != got[p])
    raise convert.CheckpointMismatchError(
        f"cannot save {what}: params do not match the config: {', '.join(bad[:10])}")


def _save_tower(folder: str | os.PathLike, config_dict: dict[str, Any], module: CLIPModule,
                params: Mapping[str, Any], what: str, dtype: Optional[Any]) -> Path:
  _check_params(module, params, what)
  path = Path(folder)
  state = convert.flax_to_torch(params, dtype=dtype)
  config_dict["dtype"] = str(next(iter(state.values())).dtype)
  io.write_json(path / "config.json", config_dict)
  io.save_safetensors(state, path / "model.safetensors")
  return path


def save_clip_text(folder: str | os.PathLike, config: CLIPTextConfig, params: Mapping[str, Any],
                   *, dtype: Optional[Any] = None) -> Path:
  """Write config.json + model.safetensors that transformers' `CLIPTextModel[WithProjection]
  .from_pretrained` loads (keys prefixed `text_model.`; projection iff `params` has one).
  `params` is the `params` collection (or `{"params": ...}`); `dtype` optionally casts."""
  params = _unwrap_params(params)
  with_projection = "text_projection" in params
  module = CLIPTextModel(config, with_projection=with_projection)
  cfg = config.to_dict()
  cfg["architectures"] = [TEXT_PROJ_ARCHITECTURE if with_projection else TEXT_ARCHITECTURE]
  return _save_tower(folder, cfg, module, params, "CLIP text encoder", dtype)


def save_clip_vision(folder: str | os.PathLike, config: CLIPVisionConfig,
                     params: Mapping[str, Any], *, dtype: Optional[Any] = None) -> Path:
  """Write config.json + model.safetensors for `CLIPVisionModel[WithProjection].from_pretrained`
  (keys prefixed `vision_model.`; projection iff `params` has one)."""
  params = _unwrap_params(params)
  with_projection = "visual_projection" in params
  module = CLIPVisionModel(config, with_projection=with_projection)
  cfg = config.to_dict()
  cfg["architectures"] = [VISION_PROJ_ARCHITECTURE if with_projection else VISION_ARCHITECTURE]
  return _save_tower(folder, cfg, module, params, "CLIP image encoder", dtype)
