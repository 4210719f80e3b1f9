"""LoRA on the CLIP text encoder as well as the UNet (`config.lora.text_encoder_targets`).

With text-encoder targets, the train state's `params` are {"unet": <UNet LoRA>, "text_encoder":
<text-encoder LoRA>} and the frozen base the step receives is {"unet": ..., "text_encoder": ...}
(without them both are the UNet's trees alone, as before: `tree`). The policy's text states are
the adapted encoder's states of the batch's `input_ids`, computed inside the jitted step
(`policy_text_fn`), so the text-encoder adapters get gradients; caption-dropped pairs take the
empty prompt's ids (`empty_states["input_ids"]`) through the same adapted encoder. The DPO
reference keeps the batch's precomputed `text_states` of the base encoder.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import ml_collections

from scdpo_jax.data.batch import TOKEN_KEY
from scdpo_jax.lora import adapters
from scdpo_jax.lora.adapters import TEXT_ENCODER, UNET
from scdpo_jax.models import clip


def enabled(config: ml_collections.ConfigDict) -> bool:
  """True when the run trains LoRA adapters on the text encoder too."""
  return adapters.enabled(config) and adapters.spec_from_config(config.lora).adapts_text_encoder


def make_text_encoder(model_config: ml_collections.ConfigDict,
                      loaded: clip.CLIPTextModel) -> clip.CLIPTextModel:
  """The policy's text encoder: the loaded base's architecture (projection or not), computing in
  `model.dtype` on fp32 params with XLA attention (cuDNN's backward rejects the 77-token
  sequence, `models/clip.py`)."""
  return loaded.clone(parent=None, dtype=jnp.dtype(model_config.dtype), param_dtype=jnp.float32,
                      attention_impl="xla")


def tree(unet: Any, text_encoder: Any = None) -> Any:
  """The pair {"unet", "text_encoder"}, or `unet` alone when there is no text-encoder part."""
  return unet if text_encoder is None else {UNET: unet, TEXT_ENCODER: text_encoder}


def split(params: Any, spec: adapters.LoraSpec) -> tuple[Any, Any]:
  """(UNet part, text-encoder part or None) of a `tree`."""
  if spec.adapts_text_encoder:
    return params[UNET], params[TEXT_ENCODER]
  return params, None


def abstract_tree(boxed_unet: Any, spec: adapters.LoraSpec, boxed_text_encoder: Any = None) -> Any:
  """The abstract LoRA `tree` of `spec` (the text encoder's params needed for its targets)."""
  unet = adapters.abstract_lora(boxed_unet, spec)
  if not spec.adapts_text_encoder:
    return unet
  if boxed_text_encoder is None:
    raise ValueError("lora.text_encoder_targets is set: the text encoder's params are needed")
  return tree(unet, adapters.abstract_lora(boxed_text_encoder, spec, component=TEXT_ENCODER))


def init_tree(abstract: Any, spec: adapters.LoraSpec, seed: int) -> Any:
  """`adapters.init_lora` per component (the UNet's adapters start as in a UNet-only run)."""
  unet, text = split(abstract, spec)
  return tree(adapters.init_lora(unet, spec, seed),
              None if text is None else adapters.init_lora(text, spec, seed))


def policy_text_fn(text_encoder: clip.CLIPTextModel, base_params: Any, scale: float,
                   layer: int) -> Callable:
  """`fn(params, batch, empty_states) -> text states (B, T, D)` for `train.step`'s
  `policy_text_fn`: the prompt ids (the empty prompt's where `drop_caption`) through the base
  text encoder with `params["text_encoder"]` merged, at `layer` (`model.text_layer`, as the
  precomputed states)."""

  def fn(params, batch, empty_states):
    ids = jnp.where(batch["drop_caption"][:, None], empty_states[TOKEN_KEY], batch[TOKEN_KEY])
    merged = adapters.merge(base_params, params[TEXT_ENCODER], scale)
    return text_encoder.apply({"params": merged}, ids, layer=layer,
                              method=clip.CLIPTextModel.encode_prompt_states)

  return fn
