"""Sampling for the ShapeWorld study: the base pipeline, any UNet of its shapes, every guard.

One `TextToImage` (one compiled sampler) per guard and batch size; another UNet (a fine-tune)
goes through `TextToImage.with_unet_params`, so every fine-tune reuses the compiled sampler of
plain CFG. A request runs in equal batches of at most `sampling.batch_size` (`balanced_batch`):
the evaluation's 426 images run as 4 x 107, not 4 x 128 with 86 padded images.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import ml_collections
import numpy as np

from scdpo_jax.data.images import to_uint8


def balanced_batch(n: int, max_batch: int) -> int:
  """The smallest batch that runs `n` images in as few batches of <= `max_batch` as possible."""
  if n <= 0 or max_batch <= 0:
    raise ValueError(f"need n > 0 and max_batch > 0, got {n}, {max_batch}")
  batches = -(-n // max_batch)
  return -(-n // batches)


def persistently_cached(config: ml_collections.ConfigDict, guard: str) -> bool:
  """Whether the sampler of `guard` comes from JAX's persistent compilation cache (else it is
  compiled in every process: TraSCE's unrolled program loads slower than it compiles, README
  "ShapeWorld")."""
  return guard != "trasce" or bool(config.sampling.get("trasce_persistent_cache", True))


class Generator:
  """Pixel-space text-to-image for the base pipeline and any UNet of its shapes.

  One `TextToImage` (one compiled sampler) per guard and batch size; another UNet (a fine-tune)
  goes through `TextToImage.with_unet_params`, so the fine-tunes reuse the compiled function.
  """

  def __init__(self, config: ml_collections.ConfigDict, sd):
    from scdpo_jax.sampling import generate, guards, safree

    s = config.sampling
    self.sd = sd
    self.guidance = float(s.guidance_scale)
    concepts = tuple(config.guards.concepts)  # the plain unsafe phrase(s), never held-out ones
    # [I] Both guards count sampler steps from presets made for 50 steps (SLD's warm-up, SAFREE's
    # up_t of filtered steps): scaled to this sampler's steps so each acts on the same share.
    steps_scale = int(s.num_steps) / 50.0
    sld = guards.sld_config(str(config.guards.sld_preset), concept=", ".join(concepts))
    sld = sld.replace(warmup_steps=float(sld.warmup_steps) * steps_scale)
    self.guards = {"none": guards.GuardConfig.make("none"),
                   "negative_prompt": guards.GuardConfig.make("standard"),
                   "trasce": guards.trasce_guard("nudity"),
                   "sld": guards.GuardConfig.make("none", sld=sld),
                   "safree": guards.GuardConfig.make("standard", safree=safree.SafreeConfig(
                       concepts=concepts, lra="released",
                       up_t=10.0 * steps_scale).check())}
    # The negative prompt each guard samples with (None: plain CFG with ""). SLD takes its
    # concept from its config and runs with "" as diffusers' pipeline does by default; SAFREE's
    # negative prompt is its concept phrases, as the official script's.
    self.negatives = {"none": None, "negative_prompt": str(s.negative_prompt),
                      "trasce": str(s.negative_prompt), "sld": None,
                      "safree": safree.negative_prompt(concepts)}
    unroll = {"trasce": int(s.get("trasce_scan_unroll", 1))}
    self.max_batch = int(s.batch_size)
    self._make = lambda name, batch: generate.TextToImage(
        sd, generate.SamplingSettings(sampler="ddim", num_steps=int(s.num_steps),
                                      guard=self.guards[name], scan_unroll=unroll.get(name, 1),
                                      persistent_cache=persistently_cached(config, name)),
        batch_size=batch)
    self._t2i: dict[str, Any] = {}
    self._lock = threading.Lock()  # the study's workers share one Generator (tasks.py)

  def __call__(self, prompts: Sequence[str], seeds: Sequence[int], indices: Sequence[int],
               unet_params: Any = None, guard: str = "none", batch_of: int | None = None
               ) -> np.ndarray:
    """uint8 (N, S, S, 3) images. `batch_of`: run the batches of a request of this many images
    (a part of a longer request cut at its batch boundaries: the same batches, the same images);
    None = `len(prompts)`."""
    n = len(prompts) if batch_of is None else int(batch_of)
    if n < len(prompts):
      raise ValueError(f"batch_of={batch_of} is less than the {len(prompts)} images asked for")
    key = (guard, balanced_batch(n, self.max_batch))
    with self._lock:
      if key not in self._t2i:
        self._t2i[key] = self._make(*key)
      t2i = self._t2i[key]
    if unet_params is not None:
      t2i = t2i.with_unet_params(unet_params)
    negative = self.negatives[guard]
    negatives = None if negative is None else [negative] * len(prompts)
    return to_uint8(t2i(list(prompts), list(seeds), list(indices),
                        [self.guidance] * len(prompts), negatives))
