"""The LoRA train step and export: Diffusion-DPO / SC-DPO on adapters over a frozen base.

The state's `params` are only the LoRA tree (so the optimizer state exists only for it); the
step's second argument, the frozen reference of the full fine-tune, is here the base itself:
the policy is `unet.apply(merge(base, lora))`, the reference `unet.apply(base)`, one copy of the
base in memory and no gradient with respect to it (it is an input of the jitted step, never
differentiated: `jax.value_and_grad` in `train.step` takes the LoRA tree only). The step is the
unchanged `train.step.make_train_step`, built inside the traced function around an `apply_fn`
that closes over the traced base argument (not a compile-time constant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from scdpo_jax.lora import adapters, io as lora_io
from scdpo_jax.models import unet_io
from scdpo_jax.train.step import StepConfig, make_train_step


DROPOUT_SALT = 0x10AD  # the dropout key is fold_in(fold_in(state.rng, step), DROPOUT_SALT)


def make_lora_train_step(*, policy, reference, optimizer, schedule, cfg: StepConfig,
                         scale: float, dropout: float = 0.0):
  """`train_step(state, base_params, batch, empty_states) -> (state, metrics)` (not jitted), with
  `state.params` the LoRA tree and `base_params` the frozen base (also the DPO reference).

  dropout 0: the policy is the UNet on `merge(base, lora)`. dropout > 0: peft's forward with
  dropout on the LoRA branch's input (`adapters.apply_with_dropout`); the masks are drawn per
  step (the same key for every micro-batch of a step, so with grad_accum > 1 the run is not
  the one-big-batch run exactly, unlike dropout 0)."""
  cfg.validate()

  def train_step(state, base_params, batch, empty_states):
    def apply_fn(variables, *args):
      if dropout > 0:
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), DROPOUT_SALT)
        return adapters.apply_with_dropout(policy, base_params, variables["params"], scale,
                                           dropout, key, *args)
      return policy.apply({"params": adapters.merge(base_params, variables["params"], scale)},
                          *args)

    step = make_train_step(apply_fn=apply_fn, ref_apply_fn=reference.apply, optimizer=optimizer,
                           schedule=schedule, cfg=cfg)
    return step(state, base_params, batch, empty_states)

  return train_step


def export(export_dir: str | Path, base_folder: str | Path, unet_config, lora_params: Any,
           spec: adapters.LoraSpec) -> dict[str, Path]:
  """`<export_dir>/lora/pytorch_lora_weights.safetensors` (diffusers' LoRA file) and
  `<export_dir>/unet` (the base UNet of `base_folder` with the LoRA fused, diffusers format).
  The base is read again from its folder (host, fp32), not taken from device memory."""
  export_dir = Path(export_dir)
  lora_host = _host(lora_params)
  lora_file = lora_io.save_lora(export_dir / "lora", lora_host, rank=spec.rank,
                                alpha=spec.alpha, dropout=spec.dropout, init=spec.init)
  _, base = unet_io.load_unet(Path(base_folder) / "unet")
  fused = adapters.fuse(base, lora_host, spec.scale)
  unet_dir = unet_io.save_unet(export_dir / "unet", unet_config, fused)
  return {"lora": lora_file, "unet": unet_dir}


def _host(tree: Any) -> Any:
  return jax.tree.map(np.asarray, jax.device_get(tree))
