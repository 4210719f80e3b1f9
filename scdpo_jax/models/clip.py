"""CLIP text and vision towers in Flax (modules only: configs in `clip_config.py`, Hugging Face
folder IO in `clip_io.py`).

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
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import flax
import flax.linen as nn

from scdpo_jax.models import clip_config, layers
from scdpo_jax.models.layers import A, ACTIVATION_AXES_BTD

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


class CLIPAttention(layers.Module):
  """Multi-head self-attention with biased q/k/v/out projections (scale head_dim**-0.5)."""

  config: clip_config.TowerConfig
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
               is_causal: bool = False) -> jax.Array:
    d = self.config.hidden_size
    q = layers.dense(d, (A.EMBED, A.HEADS), name="q_proj", **self.dt)(x)
    k = layers.dense(d, (A.EMBED, A.HEADS), name="k_proj", **self.dt)(x)
    v = layers.dense(d, (A.EMBED, A.HEADS), name="v_proj", **self.dt)(x)
    q, k, v = (layers.constrain(t, (A.BATCH, A.LENGTH, A.HEADS)) for t in (q, k, v))
    out = layers.dot_product_attention(
        q, k, v, num_heads=self.config.num_attention_heads, mask=mask, is_causal=is_causal,
        implementation=self.attention_impl)
    return layers.dense(d, (A.HEADS, A.EMBED), name="out_proj", **self.dt)(out)


class CLIPMLP(layers.Module):
  config: clip_config.TowerConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.dense(self.config.intermediate_size, (A.EMBED, A.MLP), name="fc1", **self.dt)(x)
    h = layers.get_activation(self.config.hidden_act)(h)
    h = layers.constrain(h, (A.BATCH, A.LENGTH, A.MLP))
    return layers.dense(self.config.hidden_size, (A.MLP, A.EMBED), name="fc2", **self.dt)(h)


class CLIPEncoderLayer(layers.Module):
  """Pre-LN transformer block, shared by the text and vision towers."""

  config: clip_config.TowerConfig
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
               is_causal: bool = False) -> jax.Array:
    eps = self.config.layer_norm_eps
    h = layers.layer_norm(eps, name="layer_norm1", **self.dt)(x)
    h = CLIPAttention(self.config, attention_impl=self.attention_impl, name="self_attn",
                      **self.dt)(h, mask, is_causal)
    x = layers.constrain(x + h, ACTIVATION_AXES_BTD)
    h = layers.layer_norm(eps, name="layer_norm2", **self.dt)(x)
    h = CLIPMLP(self.config, name="mlp", **self.dt)(h)
    return layers.constrain(x + h, ACTIVATION_AXES_BTD)


class CLIPEncoder(layers.Module):
  """`num_hidden_layers` blocks named `layers_i`; can stop after the first `num_layers`."""

  config: clip_config.TowerConfig
  attention_impl: str = "xla"

  def setup(self):
    self.layers = [
        CLIPEncoderLayer(self.config, attention_impl=self.attention_impl, name=f"layers_{i}",
                         **self.dt)
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


class CLIPTextEmbeddings(layers.Module):
  config: clip_config.CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    tokens = layers.embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding",
                          **self.dt)(input_ids)
    positions = jnp.arange(input_ids.shape[1])[None]
    pos = layers.embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding",
                       **self.dt)(positions)
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


class CLIPTextTransformer(layers.Module):
  """transformers' `text_model`: embeddings, causal encoder, final LayerNorm, EOS pooling."""

  config: clip_config.CLIPTextConfig
  attention_impl: str = "xla"

  def setup(self):
    self.embeddings = CLIPTextEmbeddings(self.config, name="embeddings", **self.dt)
    self.encoder = CLIPEncoder(self.config, attention_impl=self.attention_impl, name="encoder",
                               **self.dt)
    self.final_layer_norm = layers.layer_norm(self.config.layer_norm_eps, name="final_layer_norm",
                                              **self.dt)

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


class CLIPTextModel(layers.Module):
  """CLIP text encoder; `with_projection=True` is transformers' `CLIPTextModelWithProjection`.

  Parameters: `text_model/...` and, with projection, `text_projection/kernel` (D, P).
  """

  config: clip_config.CLIPTextConfig
  with_projection: bool = False
  attention_impl: str = "xla"

  def setup(self):
    self.text_model = CLIPTextTransformer(self.config, attention_impl=self.attention_impl,
                                          name="text_model", **self.dt)
    if self.with_projection:
      self.text_projection = layers.dense(self.config.projection_dim, (A.EMBED, None),
                                          use_bias=False, name="text_projection", **self.dt)

  @nn.nowrap
  def dummy_inputs(self) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Input shapes for `layers.abstract_params` / `layers.init_params`."""
    return (jax.ShapeDtypeStruct((1, 1), jnp.int32),)

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


class CLIPVisionEmbeddings(layers.Module):
  """Patchify (conv, stride = patch, no bias), prepend the CLS embedding, add positions."""

  config: clip_config.CLIPVisionConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    cfg = self.config
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
                          use_bias=False, name="patch_embedding", **self.dt)(
                              pixel_values.astype(self.dtype))
    patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major over the patch grid
    cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    pos = layers.embed(cfg.num_positions, cfg.hidden_size, name="position_embedding", **self.dt)(
        jnp.arange(cfg.num_positions)[None])
    return layers.constrain(x + pos, ACTIVATION_AXES_BTD)


class CLIPVisionTransformer(layers.Module):
  """transformers' `vision_model`: embeddings, pre_layrnorm, encoder, post_layernorm(CLS)."""

  config: clip_config.CLIPVisionConfig
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False
               ) -> CLIPVisionOutput:
    eps = self.config.layer_norm_eps
    x = CLIPVisionEmbeddings(self.config, name="embeddings", **self.dt)(pixel_values)
    x = layers.layer_norm(eps, name="pre_layrnorm", **self.dt)(x)
    x, hidden = CLIPEncoder(self.config, attention_impl=self.attention_impl, name="encoder",
                            **self.dt)(x, output_hidden_states=output_hidden_states)
    pooled = layers.layer_norm(eps, name="post_layernorm", **self.dt)(x[:, 0])
    return CLIPVisionOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden)


class CLIPVisionModel(layers.Module):
  """CLIP image encoder; `with_projection=True` is `CLIPVisionModelWithProjection`.

  Input `pixel_values` is channels-last (B, H, W, C). Parameters: `vision_model/...` and, with
  projection, `visual_projection/kernel` (D, P).
  """

  config: clip_config.CLIPVisionConfig
  with_projection: bool = False
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False
               ) -> CLIPVisionOutput:
    out = CLIPVisionTransformer(self.config, attention_impl=self.attention_impl,
                                name="vision_model", **self.dt)(pixel_values, output_hidden_states)
    if self.with_projection:
      embeds = layers.dense(self.config.projection_dim, (A.EMBED, None), use_bias=False,
                            name="visual_projection", **self.dt)(out.pooler_output)
      out = out.replace(image_embeds=embeds)
    return out

  @nn.nowrap
  def dummy_inputs(self) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Input shapes for `layers.abstract_params` / `layers.init_params`."""
    cfg = self.config
    return (jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels),
                                 jnp.float32),)
