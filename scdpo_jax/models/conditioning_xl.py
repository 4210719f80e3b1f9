"""SDXL prompt conditioning: both text encoders' states, the pooled embeddings and the
micro-conditioning time ids, as diffusers' `StableDiffusionXLPipeline` builds them.

* `encode_prompt`: `prompt_embeds` (B, T, D1 + D2) = concat of the *penultimate* hidden states
  (no final LayerNorm) of the CLIP ViT-L text model (`text_encoder/`, D1 = 768) and of the
  OpenCLIP-bigG text model with projection (`text_encoder_2/`, D2 = 1280), and
  `pooled_prompt_embeds` (B, P = 1280), the second encoder's projected EOS embedding
  (`text_embeds`). `clip_skip=k` takes `hidden_states[-(k + 2)]` instead, as diffusers does.
* `add_time_ids`: (B, 6) float rows `original_size + crops_coords_top_left + target_size`, each
  (height, width) / (top, left), diffusers' `_get_add_time_ids`; `check_add_time_ids` is its
  consistency check against the UNet config.
* `added_cond_kwargs`: the UNet's extra input, `{"text_embeds": pooled, "time_ids": ids}`.

Classifier-free guidance: with `force_zeros_for_empty_prompt` (the SDXL default, kept on the
loaded pipeline) and no negative prompt, diffusers' unconditional inputs are zeros of the same
shapes; otherwise they are `encode_prompt` of the negative prompt. Everything here is a pure
function of arrays (jit it, or call it eagerly), except `encode_prompt_texts`, which tokenizes
on the host.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from scdpo_jax.models import tokenizer as tokenizer_lib
from scdpo_jax.models.clip import CLIPTextModel
from scdpo_jax.models.unet_config import UNetConfig


@flax.struct.dataclass
class XLPromptEmbeds:
  """`prompt_embeds` (B, T, D1 + D2): the UNet's `encoder_hidden_states`;
  `pooled_prompt_embeds` (B, P): its `added_cond_kwargs["text_embeds"]`."""

  prompt_embeds: jax.Array
  pooled_prompt_embeds: jax.Array


def _hidden_index(clip_skip: Optional[int]) -> int:
  return -2 if clip_skip is None else -(clip_skip + 2)


def encode_prompt(text_encoder: CLIPTextModel, text_encoder_params: Any,
                  text_encoder_2: CLIPTextModel, text_encoder_2_params: Any,
                  input_ids: jax.Array, input_ids_2: jax.Array, *,
                  clip_skip: Optional[int] = None) -> XLPromptEmbeds:
  """SDXL prompt states from token ids of `tokenizer` / `tokenizer_2` (each (B, T) int).

  `text_encoder_2` must have its projection (`CLIPTextModelWithProjection`, what SDXL's
  `text_encoder_2/` holds): the pooled embedding is its `text_embeds`."""
  if not text_encoder_2.with_projection:
    raise ValueError("SDXL's text_encoder_2 must be a CLIPTextModelWithProjection "
                     "(load_clip_text found no text_projection)")
  index = _hidden_index(clip_skip)
  out_1 = text_encoder.apply({"params": text_encoder_params}, input_ids,
                             output_hidden_states=True)
  out_2 = text_encoder_2.apply({"params": text_encoder_2_params}, input_ids_2,
                               output_hidden_states=True)
  states = jnp.concatenate([out_1.hidden_states[index], out_2.hidden_states[index]], axis=-1)
  return XLPromptEmbeds(prompt_embeds=states, pooled_prompt_embeds=out_2.text_embeds)


def encode_prompt_texts(sdxl: Any, prompts: Sequence[str],
                        prompts_2: Optional[Sequence[str]] = None, *,
                        clip_skip: Optional[int] = None) -> XLPromptEmbeds:
  """`encode_prompt` of strings with a loaded `pipeline_xl.StableDiffusionXL` (tokenized as
  diffusers does: padded / truncated to each tokenizer's `model_max_length`); `prompts_2`
  (for `tokenizer_2` / `text_encoder_2`) defaults to `prompts`."""
  prompts = list(prompts)
  prompts_2 = prompts if prompts_2 is None else list(prompts_2)
  ids = tokenizer_lib.tokenize(sdxl.tokenizer, prompts)
  ids_2 = tokenizer_lib.tokenize(sdxl.tokenizer_2, prompts_2)
  return encode_prompt(sdxl.text_encoder, sdxl.text_encoder_params, sdxl.text_encoder_2,
                       sdxl.text_encoder_2_params, ids, ids_2, clip_skip=clip_skip)


def add_time_ids(original_size: Sequence[int], crops_coords_top_left: Sequence[int],
                 target_size: Sequence[int], batch_size: int = 1,
                 dtype: Any = np.float32) -> np.ndarray:
  """(batch_size, 6) micro-conditioning ids: `original_size + crops_coords_top_left +
  target_size` (sizes as (height, width), the crop as (top, left)), one row per sample, as
  diffusers' `_get_add_time_ids` then `.repeat(batch_size, 1)`. SDXL's default for an H x W
  image: original = target = (H, W), crop (0, 0)."""
  row = [*original_size, *crops_coords_top_left, *target_size]
  if len(row) != 6:
    raise ValueError(f"time ids need (h, w) sizes and a (top, left) crop, got original_size="
                     f"{original_size}, crops_coords_top_left={crops_coords_top_left}, "
                     f"target_size={target_size}")
  return np.tile(np.asarray([row], dtype), (batch_size, 1))


def check_add_time_ids(unet_config: UNetConfig, num_time_ids: int,
                       text_encoder_projection_dim: int) -> None:
  """diffusers' check that `addition_time_embed_dim * num_time_ids + projection_dim` is the
  UNet's `add_embedding` input width (`projection_class_embeddings_input_dim`)."""
  if unet_config.addition_embed_type != "text_time":
    raise ValueError("the UNet takes no time ids (addition_embed_type="
                     f"{unet_config.addition_embed_type!r}, SDXL's is 'text_time')")
  passed = unet_config.addition_time_embed_dim * num_time_ids + text_encoder_projection_dim
  expected = unet_config.projection_class_embeddings_input_dim
  if passed != expected:
    raise ValueError(
        f"the UNet expects an added time embedding vector of length {expected}, but "
        f"{num_time_ids} time ids x {unet_config.addition_time_embed_dim} + "
        f"{text_encoder_projection_dim} (text_encoder_2 projection_dim) = {passed}: check the "
        "UNet's addition_time_embed_dim and text_encoder_2's projection_dim")


def added_cond_kwargs(pooled_prompt_embeds: jax.Array, time_ids: jax.Array
                      ) -> dict[str, jax.Array]:
  """The SDXL UNet's `added_cond_kwargs`."""
  return {"text_embeds": pooled_prompt_embeds, "time_ids": time_ids}
