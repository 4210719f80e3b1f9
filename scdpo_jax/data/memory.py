"""An in-memory pair source: step-indexed, seeded shuffling per epoch, per-process slicing.

Optional per-pair harm categories (`categories`, strings; "" = none) ride along outside the batch
keys: `record_categories()` returns them and `subset(indices)` makes a pair source over some of
the records (SafetyDPO's per-category experts, `lora/safetydpo.py`), whose `identity()` names the
subset for the trainer's resume fingerprint."""

from __future__ import annotations

import functools
import hashlib

import jax
import numpy as np

from scdpo_jax.data.batch import FLOAT_KEYS, batch_keys, validate_batch


@functools.lru_cache(maxsize=4)
def epoch_permutation(num: int, seed: int, epoch: int) -> np.ndarray:
  """The record order of one epoch (cached: a permutation of 1M records costs ~17 ms and a step
  needs at most two epochs'). Read-only."""
  perm = np.random.default_rng([seed, epoch]).permutation(num)
  perm.flags.writeable = False
  return perm


def global_indices(step: int, global_batch: int, num: int, seed: int,
                   shuffle: bool = True) -> np.ndarray:
  """Record indices of the global batch at `step` (epochs wrap; each epoch its own shuffle)."""
  start = step * global_batch
  idx = np.arange(start, start + global_batch)
  epochs, pos = np.divmod(idx, num)
  if not shuffle:
    return pos
  out = np.empty_like(pos)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = epoch_permutation(num, seed, int(e))[pos[sel]]
  return out


class InMemoryPairs:
  """Pairs held as NumPy arrays (see `batch.py` for the keys; SDXL's `XL_KEYS` are kept when
  given)."""

  def __init__(self, arrays: dict[str, np.ndarray], seed: int = 0, shuffle: bool = True,
               hflip: bool = False, categories=None):
    arrays = dict(arrays)
    n = arrays["latents_w"].shape[0]
    if categories is not None:
      categories = np.asarray([str(c) for c in categories], dtype=object)
      if categories.shape != (n,):
        raise ValueError(f"categories: {categories.shape[0]} entries for {n} pairs")
    self.categories = categories
    self._identity: dict = {}
    for k in FLOAT_KEYS:
      arrays.setdefault(k, np.zeros((n,), np.float32))
    arrays = {k: np.asarray(arrays[k]) for k in batch_keys(arrays)}
    validate_batch(arrays)
    self.arrays = arrays
    self.num_pairs = n
    self.seed = seed
    self.shuffle = shuffle
    self.hflip = hflip

  def batch(self, step: int, global_batch: int) -> dict[str, np.ndarray]:
    idx = global_indices(step, global_batch, self.num_pairs, self.seed, self.shuffle)
    per = global_batch // jax.process_count()
    mine = idx[jax.process_index() * per:(jax.process_index() + 1) * per]
    out = {k: v[mine] for k, v in self.arrays.items()}
    if self.hflip:  # flip winner and loser of a pair together, decided per pair by (seed, index)
      flip = np.random.default_rng([self.seed, step, 1]).random(global_batch)
      flip = flip[jax.process_index() * per:(jax.process_index() + 1) * per] < 0.5
      for k in ("latents_w", "latents_l"):
        out[k] = np.where(flip[:, None, None, None], out[k][:, :, ::-1], out[k])
    return out

  def record_categories(self) -> np.ndarray:
    """The category of every pair (object array of str; "" = none)."""
    if self.categories is None:
      raise ValueError("these in-memory pairs carry no categories (InMemoryPairs(categories=...))")
    return self.categories

  def records_batch(self, indices) -> dict[str, np.ndarray]:
    """The given records in that order (no shuffle, no flip, every process the same)."""
    idx = np.asarray(indices, np.int64)
    return {k: v[idx] for k, v in self.arrays.items()}

  def subset(self, indices, label: str = "") -> "InMemoryPairs":
    """A pair source over records `indices` (in that order before shuffling), same seed and
    flips; its `identity()` records `label` and a hash of the indices."""
    idx = np.asarray(indices, np.int64)
    if idx.size == 0:
      raise ValueError(f"subset {label!r} holds no pairs")
    out = InMemoryPairs(self.records_batch(idx), seed=self.seed, shuffle=self.shuffle,
                        hflip=self.hflip,
                        categories=None if self.categories is None else self.categories[idx])
    out._identity = {"subset": label, "subset_pairs": int(idx.size),
                     "subset_sha1": hashlib.sha1(idx.tobytes()).hexdigest()}
    return out

  def identity(self) -> dict:
    """What identifies the data beyond the config (a subset's label and records; else {})."""
    return dict(self._identity)
