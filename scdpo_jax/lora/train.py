"""The LoRA train step and export: Diffusion-DPO / SC-DPO on adapters over a frozen base.

The state's `params` are only the LoRA tree (so the optimizer state exists only for it); the
step's second argument, the frozen reference of the full fine-tune, is here the base itself:
the policy is `unet.apply(merge(base, lora))`, the reference `unet.apply(base)`, one copy of the
base in memory and no gradient with respect to it (it is an input of the jitted step, never
differentiated: `jax.value_and_grad` in `train.step` takes the LoRA tree only). The step is the
unchanged `train.step.make_train_step`, built inside the traced function around an `apply_fn`
that closes over the traced base argument (not a compile-time constant).

With text-encoder LoRA (`lora/text_encoder.py`) the state's params and the base are
{"unet", "text_encoder"} pairs: the reference is still `unet.apply(base["unet"])` on the
batch's precomputed text states, the policy's text states come from the adapted encoder inside
the step (`train.step`'s `policy_text_fn`), and the export adds the text-encoder LoRA keys and
`<export_dir>/text_encoder` (the base text encoder with its LoRA fused, transformers format).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from scdpo_jax.lora import adapters, io as lora_io, text_encoder as lora_text
from scdpo_jax.lora.adapters import TEXT_ENCODER, UNET
from scdpo_jax.models import clip_io, unet_io
from scdpo_jax.train.step import StepConfig, make_train_step


DROPOUT_SALT = 0x10AD  # the dropout key is fold_in(fold_in(state.rng, step), DROPOUT_SALT)


def make_lora_train_step(*, policy, reference, optimizer, schedule, cfg: StepConfig,
                         scale: float, dropout: float = 0.0, text_encoder=None,
                         text_layer: int = -1):
  """`train_step(state, base_params, batch, empty_states) -> (state, metrics)` (not jitted), with
  `state.params` the LoRA tree and `base_params` the frozen base (also the DPO reference).

  dropout 0: the policy is the UNet on `merge(base, lora)`. dropout > 0: peft's forward with
  dropout on the LoRA branch's input (`adapters.apply_with_dropout`); the masks are drawn per
  step (the same key for every micro-batch of a step, so with grad_accum > 1 the run is not
  the one-big-batch run exactly, unlike dropout 0).

  `text_encoder` (a `CLIPTextModel`; text-encoder LoRA, dropout 0): params and base are
  {"unet", "text_encoder"} pairs, the batch carries `input_ids` and `empty_states` is
  {"text_states", "input_ids"} of the empty prompt; the policy encodes the ids at `text_layer`."""
  cfg.validate()
  with_text = text_encoder is not None
  if with_text and dropout > 0:
    raise ValueError("LoRA dropout is not supported with text-encoder LoRA")

  def train_step(state, base_params, batch, empty_states):
    unet_base = base_params[UNET] if with_text else base_params

    def apply_fn(variables, *args):
      lora = variables["params"][UNET] if with_text else variables["params"]
      if dropout > 0:
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), DROPOUT_SALT)
        return adapters.apply_with_dropout(policy, unet_base, lora, scale, dropout, key, *args)
      return policy.apply({"params": adapters.merge(unet_base, lora, scale)}, *args)

    text_fn = (lora_text.policy_text_fn(text_encoder, base_params[TEXT_ENCODER], scale,
                                        text_layer) if with_text else None)
    step = make_train_step(apply_fn=apply_fn, ref_apply_fn=reference.apply, optimizer=optimizer,
                           schedule=schedule, cfg=cfg, policy_text_fn=text_fn)
    return step(state, unet_base, batch, empty_states)

  return train_step


def export(export_dir: str | Path, base_folder: str | Path, unet_config, lora_params: Any,
           spec: adapters.LoraSpec) -> dict[str, Path]:
  """`<export_dir>/lora/pytorch_lora_weights.safetensors` (diffusers' LoRA file) and
  `<export_dir>/unet` (the base UNet of `base_folder` with the LoRA fused, diffusers format);
  with text-encoder LoRA also `<export_dir>/text_encoder` (the base text encoder with its LoRA
  fused). The bases are read again from their folders (host, fp32), not taken from device
  memory."""
  export_dir = Path(export_dir)
  unet_lora, text_lora = lora_text.split(_host(lora_params), spec)
  lora_file = lora_io.save_lora(export_dir / "lora", unet_lora, rank=spec.rank,
                                alpha=spec.alpha, dropout=spec.dropout, init=spec.init,
                                text_encoder_lora=text_lora)
  _, base = unet_io.load_unet(Path(base_folder) / "unet")
  fused = adapters.fuse(base, unet_lora, spec.scale)
  out = {"lora": lora_file, "unet": unet_io.save_unet(export_dir / "unet", unet_config, fused)}
  if text_lora is not None:
    text_module, text_base = clip_io.load_clip_text(Path(base_folder) / "text_encoder")
    out["text_encoder"] = clip_io.save_clip_text(
        export_dir / "text_encoder", text_module.config,
        adapters.fuse(text_base, text_lora, spec.scale))
  return out


def _host(tree: Any) -> Any:
  return jax.tree.map(np.asarray, jax.device_get(tree))
