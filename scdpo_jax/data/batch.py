"""The preference-pair batch format every data source yields and the trainer consumes.

A batch is a dict of NumPy arrays whose leading axis is the pair index:

  latents_w, latents_l  float32 (B, h, w, c)  winner / loser VAE latents, already multiplied by
                                              the VAE scaling factor (what the UNet sees as x_0)
  text_states           float32 (B, T, D)     text-encoder states of the prompt (as the UNet
                                              consumes them: last or penultimate layer)
  is_harmful            int32   (B,)          1 = harmful prompt, 0 = clean prompt
  cost_w, cost_l        float32 (B,)          safety cost of winner / loser (0 when unknown)
  reward_w, reward_l    float32 (B,)          preference reward of winner / loser (0 when unknown)

SDXL batches carry two more keys (`XL_KEYS`; absent for SD 1.x/2.x, whose batches are unchanged):

  text_states           float32 (B, T, D1+D2) both encoders' penultimate states, concatenated
                                              (diffusers' `prompt_embeds`)
  pooled_text           float32 (B, P)        text_encoder_2's pooled projection
                                              (`added_cond_kwargs["text_embeds"]`)
  time_ids              float32 (B, 6)        micro-conditioning: original (h, w), crop (top,
                                              left), target (h, w) (`added_cond_kwargs["time_ids"]`)

Runs with text-encoder LoRA (`config.lora.text_encoder_targets`) also need the prompt's tokens
(`TOKEN_KEY`; absent otherwise), which the policy's adapted encoder encodes inside the step:

  input_ids             int32   (B, T)        the prompt's token ids (the base tokenizer's)

A *pair source* is any object with

  num_pairs: int                        pairs per epoch
  batch(step: int, global_batch: int) -> dict
      this process's rows (global_batch / process_count of them) of the global batch for `step`;
      a pure function of (seed, step), so resuming at any step is O(1).

The trainer does not care where batches come from (memory, ArrayRecord files, ...).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

PAIR_KEYS = ("latents_w", "latents_l", "text_states", "is_harmful", "cost_w", "cost_l",
             "reward_w", "reward_l")
FLOAT_KEYS = ("cost_w", "cost_l", "reward_w", "reward_l")
XL_KEYS = ("pooled_text", "time_ids")
TOKEN_KEY = "input_ids"


def batch_keys(batch) -> tuple[str, ...]:
  """The trainer's keys of `batch`: `PAIR_KEYS`, plus `XL_KEYS` when it has them (SDXL) and
  `TOKEN_KEY` when it has it (text-encoder LoRA)."""
  present = [k for k in XL_KEYS if k in batch]
  if present and len(present) != len(XL_KEYS):
    raise KeyError(f"pair batch has {present} but not all of {XL_KEYS} (SDXL batches carry both)")
  return PAIR_KEYS + tuple(present) + ((TOKEN_KEY,) if TOKEN_KEY in batch else ())


class PairSource(Protocol):
  num_pairs: int

  def batch(self, step: int, global_batch: int) -> dict[str, np.ndarray]:
    ...


def validate_batch(batch: dict[str, np.ndarray]) -> None:
  """Raise a clear error if a batch does not follow the format above."""
  missing = [k for k in PAIR_KEYS if k not in batch]
  if missing:
    raise KeyError(f"pair batch is missing {missing}; expected keys {PAIR_KEYS}")
  b = batch["latents_w"].shape[0]
  for k in batch_keys(batch):
    if batch[k].shape[0] != b:
      raise ValueError(f"pair batch: {k} has {batch[k].shape[0]} rows, latents_w has {b}")
  if batch["latents_w"].shape != batch["latents_l"].shape:
    raise ValueError(f"pair batch: latents_w {batch['latents_w'].shape} and latents_l "
                     f"{batch['latents_l'].shape} differ")
