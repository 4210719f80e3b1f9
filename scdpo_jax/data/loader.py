"""Step-indexed pair loader over a tfds ArrayRecord pair dataset, built on grain.

`PairLoader` is a *pair source* in the sense of `batch.py`:

  loader.batch(step, global_batch) -> this process's rows of global batch `step` (batch.py keys)

Mapping (identical to `memory.InMemoryPairs`, so both sources give the same batches of the same
pairs): the global batch of `step` is the records `memory.global_indices(step, global_batch,
num_pairs, seed, shuffle)` (computed by `step_indices`, which caches the permutations) (positions step*B ... step*B + B - 1 of an endless stream; each epoch
its own permutation seeded by (seed, epoch)); process p of P reads only rows
[p*B/P, (p+1)*B/P) of it. Random horizontal flips, when enabled, are decided per global row by
`np.random.default_rng([seed, step, 1]).random(B) < 0.5` (as in `InMemoryPairs`), and applied
only to pairs whose `hflip_ok` is 1; winner and loser of a pair flip together (latents are
mirrored along the width axis; for image datasets the images are mirrored before encoding).
Every batch is a pure function of (dataset, seed, step, global_batch, process), so resuming at
any step is O(1): nothing is replayed.

grain does the work: `dataset(global_batch)` is a `grain.MapDataset` whose element k is the
batch of step k (random access, `ds[k]`); `iterator(start_step, global_batch)` turns its tail
into a prefetching `IterDataset` (`ReadOptions(num_threads, prefetch_buffer_size)`).

Latents vs images: the trainer consumes latents. A cached dataset (`cache.py`) is read as is.
An image dataset (converters, pair builder) needs `encoder=cache.PairEncoder(...)`: each batch
is then decoded and encoded on the fly (correct, but slower than caching once).
Unknown rewards/costs (NaN in the dataset): with `nan_cost="zero"` (the default, as batch.py
specifies) they become 0 (no cost margin for that pair) and the first batch holding one logs a
warning; `nan_cost="error"` refuses them (`data.nan_cost` in the trainer's config).

Token ids: `PairLoader(..., tokenizer=tok)` adds `input_ids` (each record's prompt tokenised by
`tok`), which text-encoder LoRA training needs (`batch.TOKEN_KEY`); without a tokenizer batches
have no ids.

Subsets: `PairLoader(..., records=ids)` (or `loader.subset(positions, label)`) reads only those
records, as if the dataset held just them in that order (SafetyDPO's per-category experts,
`lora/safetydpo.py`); `record_categories()` gives each record's `category` field.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from absl import logging

from scdpo_jax import files
from scdpo_jax.data import tfds_pairs
from scdpo_jax.data.batch import FLOAT_KEYS, PAIR_KEYS, TOKEN_KEY, XL_KEYS
from scdpo_jax.data.memory import global_indices

MAX_STEPS = 2 ** 40  # length of the endless step-indexed dataset
NAN_COST_POLICIES = ("zero", "error")


def step_indices(step: int, global_batch: int, num: int, seed: int, shuffle: bool = True
                 ) -> np.ndarray:
  """Record indices of the global batch of `step`: exactly `memory.global_indices`."""
  return global_indices(step, global_batch, num, seed, shuffle)


class PairLoader:
  """Deterministic, step-indexed pair batches from a tfds pair dataset (see module docstring)."""

  def __init__(self, path: str | Path, *, split: str = "train", seed: int = 0,
               shuffle: bool = True, hflip: bool = False, encoder: Any = None,
               process_index: int | None = None, process_count: int | None = None,
               read_threads: int = 4, prefetch_batches: int = 2, nan_cost: str = "zero",
               records: Sequence[int] | None = None, label: str = "", tokenizer: Any = None):
    import jax

    if nan_cost not in NAN_COST_POLICIES:
      raise ValueError(f"data.nan_cost={nan_cost!r}; supported: {NAN_COST_POLICIES}")
    self.nan_cost = nan_cost
    self._nan_warned = False

    self.dataset_info = tfds_pairs.open_pairs(path)
    self.schema = self.dataset_info.schema
    self.source = self.dataset_info.source(split)
    self.num_pairs = len(self.source)
    if self.num_pairs == 0:
      raise ValueError(f"{self.dataset_info.path} split {split!r} is empty")
    self.records = None if records is None else np.asarray(records, np.int64)
    self.label = label
    if self.records is not None:
      if self.records.size == 0:
        raise ValueError(f"subset {label!r} of {self.dataset_info.path} holds no records")
      if self.records.min() < 0 or self.records.max() >= self.num_pairs:
        raise ValueError(f"subset {label!r}: record ids outside [0, {self.num_pairs})")
      self.num_pairs = int(self.records.size)
    self._kwargs = dict(path=path, split=split, seed=seed, shuffle=shuffle, hflip=hflip,
                        encoder=encoder, process_index=process_index,
                        process_count=process_count, read_threads=read_threads,
                        prefetch_batches=prefetch_batches, nan_cost=nan_cost,
                        tokenizer=tokenizer)
    self.tokenizer = tokenizer
    if not self.schema.has_latents and encoder is None:
      raise ValueError(
          f"{self.dataset_info.path} holds images, not latents. The trainer needs latents: cache "
          "them once with `python -m scdpo_jax.data.cache --input <this dataset> --output <new> "
          "--pretrained <SD folder>`, or pass encoder=cache.PairEncoder.from_pretrained(...) to "
          "encode each batch on the fly")
    self.encoder = encoder if not self.schema.has_latents else None
    self.seed, self.shuffle, self.hflip = int(seed), bool(shuffle), bool(hflip)
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
    self.read_threads, self.prefetch_batches = int(read_threads), int(prefetch_batches)
    self._datasets: dict[int, grain.MapDataset] = {}

  def identity(self) -> dict[str, Any]:
    """What identifies the data (recorded in the trainer's resume fingerprint)."""
    info = Path(self.dataset_info.path) / "dataset_info.json"
    out = {"path": str(Path(self.dataset_info.path).resolve()), "num_pairs": self.num_pairs,
           "dataset_info": files.file_identity(info) if info.is_file() else "missing"}
    if self.records is not None:
      out.update(subset=self.label, subset_sha1=hashlib.sha1(self.records.tobytes()).hexdigest())
    return out

  # -- subsets and categories ----------------------------------------------------------------

  def record_ids(self, positions) -> np.ndarray:
    """Dataset record ids of positions 0 .. num_pairs - 1 of this source."""
    pos = np.asarray(positions, np.int64)
    return pos if self.records is None else self.records[pos]

  def record_categories(self, chunk: int = 256) -> np.ndarray:
    """The `category` field of every record of this source (object array of str)."""
    ids = self.record_ids(np.arange(self.num_pairs))
    out = []
    for lo in range(0, ids.size, chunk):
      out += [tfds_pairs.text(r["category"])
              for r in self.source.__getitems__([int(i) for i in ids[lo:lo + chunk]])]
    return np.asarray(out, dtype=object)

  def records_batch(self, positions) -> dict[str, np.ndarray]:
    """The records at `positions` in that order (no shuffle, no flip, every process the same)."""
    ids = self.record_ids(positions)
    return self._collate({"records": self.source.__getitems__([int(i) for i in ids]),
                          "indices": ids, "flips": np.zeros((ids.size,), bool)})

  def subset(self, positions, label: str = "") -> "PairLoader":
    """A loader over the records at `positions` of this one (same seed, flips and options)."""
    return PairLoader(**self._kwargs, records=self.record_ids(positions), label=label)

  # -- index arithmetic ----------------------------------------------------------------------

  def _rows(self, global_batch: int) -> slice:
    if global_batch <= 0 or global_batch % self.process_count:
      raise ValueError(f"global_batch {global_batch} must be a positive multiple of the "
                       f"{self.process_count} processes")
    per = global_batch // self.process_count
    return slice(self.process_index * per, (self.process_index + 1) * per)

  def indices(self, step: int, global_batch: int) -> np.ndarray:
    """Record indices of this process's rows of global batch `step`."""
    idx = step_indices(int(step), global_batch, self.num_pairs, self.seed, self.shuffle)
    return self.record_ids(idx[self._rows(global_batch)])

  def flips(self, step: int, global_batch: int) -> np.ndarray:
    """Per-row flip decisions (before `hflip_ok`) for this process's rows of `step`."""
    if not self.hflip:
      per = global_batch // self.process_count
      return np.zeros((per,), bool)
    draws = np.random.default_rng([self.seed, int(step), 1]).random(global_batch)
    return draws[self._rows(global_batch)] < 0.5

  # -- grain pipeline ------------------------------------------------------------------------

  def dataset(self, global_batch: int) -> grain.MapDataset:
    """`grain.MapDataset` whose element k is this process's batch of step k."""
    self._rows(global_batch)  # validate
    if global_batch not in self._datasets:
      self._datasets[global_batch] = (
          grain.MapDataset.range(MAX_STEPS)
          .map(lambda step: self._read(int(step), global_batch))
          .map(self._collate))
    return self._datasets[global_batch]

  def batch(self, step: int, global_batch: int) -> dict[str, np.ndarray]:
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    return self.dataset(global_batch)[int(step)]

  def iterator(self, start_step: int, global_batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of steps start_step, start_step + 1, ... prefetched by grain threads."""
    ds = self.dataset(global_batch)[int(start_step):]
    return iter(ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self.read_threads, prefetch_buffer_size=self.prefetch_batches)))

  def _read(self, step: int, global_batch: int) -> dict[str, Any]:
    idx = self.indices(step, global_batch)
    records = self.source.__getitems__([int(i) for i in idx])
    return {"step": step, "indices": idx, "records": records,
            "flips": self.flips(step, global_batch)}

  def _collate(self, item: dict[str, Any]) -> dict[str, np.ndarray]:
    records: Sequence[dict] = item["records"]
    allowed = np.array([int(r["hflip_ok"]) == 1 for r in records], bool)
    flips = item["flips"] & allowed
    out: dict[str, np.ndarray] = {}
    if self.schema.has_latents:
      for k in ("latents_w", "latents_l"):
        lat = np.stack([np.asarray(r[k], np.float32) for r in records])
        out[k] = np.where(flips[:, None, None, None], lat[:, :, ::-1], lat)
      for k in ("text_states",) + (XL_KEYS if self.schema.pooled_dim else ()):
        out[k] = np.stack([np.asarray(r[k], np.float32) for r in records])
    else:
      out.update({k: v for k, v in self.encoder.encode_records(
          records, item["indices"], flips).items() if k in PAIR_KEYS + XL_KEYS})
    out["is_harmful"] = np.array([int(r["is_harmful"]) for r in records], np.int32)
    for k in FLOAT_KEYS:
      v = np.array([float(r[k]) for r in records], np.float32)
      if k.startswith("cost") and np.isnan(v).any():
        self._unknown_costs(k, records, v)
      out[k] = np.nan_to_num(v, nan=0.0)
    if self.tokenizer is not None:
      from scdpo_jax.models import tokenizer as tok
      out[TOKEN_KEY] = tok.tokenize(self.tokenizer, [tfds_pairs.text(r["prompt"]) for r in records])
    return {k: out[k] for k in PAIR_KEYS + tuple(k for k in XL_KEYS + (TOKEN_KEY,) if k in out)}

  def _unknown_costs(self, key: str, records, values: np.ndarray) -> None:
    ids = [tfds_pairs.text(r["pair_id"]) for r, v in zip(records, values) if np.isnan(v)]
    if self.nan_cost == "error":
      raise ValueError(f"{self.dataset_info.path}: pairs {ids[:5]} have unknown (NaN) {key} and "
                       "data.nan_cost='error'; score them (data/pairs_build.py) or set "
                       "data.nan_cost='zero' to train them without a cost margin")
    if not self._nan_warned:
      self._nan_warned = True
      logging.warning("%s: some pairs (first: %s) have unknown (NaN) costs; they count as 0, "
                      "i.e. no cost margin (data.nan_cost='zero'; 'error' refuses them)",
                      self.dataset_info.path, ids[:3])


def resolve_dataset_path(name: str, data_dir: str = "") -> Path:
  """The pair dataset folder from the trainer's `data.name` / `data.data_dir`.

  `name` may be a folder (a dataset or a folder holding exactly one), or a name under
  `data_dir`; with only `data_dir`, it must hold exactly one dataset.
  """
  candidates = []
  if data_dir and name:
    candidates.append(Path(data_dir) / name)
  if name:
    candidates.append(Path(name))
  if data_dir:
    candidates.append(Path(data_dir))
  if not candidates:
    raise ValueError("no pair dataset configured: set data.name (a folder) and/or data.data_dir")
  for c in candidates:
    if c.exists():
      return tfds_pairs.find_dataset_dir(c)
  raise FileNotFoundError(f"pair dataset not found: tried {', '.join(map(str, candidates))}")


def check_pair_dataset(data_config, model_folder=None, text_layer: int | None = None,
                       sdxl: bool = False) -> None:
  """Fail early (before models are loaded) unless the configured dataset exists and holds the
  latents and text states the trainer consumes (for an SDXL model, `sdxl`, also pooled text and
  time ids), cached with the model being trained (`check_cache_matches_model`, when
  `model_folder` is given). `data_config` has name, data_dir, split."""
  ds = tfds_pairs.open_pairs(resolve_dataset_path(data_config.name, data_config.data_dir))
  if data_config.split not in ds.splits:
    raise KeyError(f"{ds.path} has no split {data_config.split!r}; splits: {sorted(ds.splits)}")
  if not ds.schema.has_latents:
    raise ValueError(f"{ds.path} holds images, not latents: cache it first with "
                     f"`python -m scdpo_jax.data.cache --input {ds.path} --output <new folder> "
                     "--pretrained <the SD folder you train>`")
  if bool(ds.schema.pooled_dim) != sdxl:
    raise CacheMismatchError(
        f"{ds.path} holds {'SDXL' if ds.schema.pooled_dim else 'SD 1.x/2.x'} conditioning "
        f"(schema {ds.schema.config_name!r}) but the model being trained is "
        f"{'SDXL' if sdxl else 'SD 1.x/2.x'}: cache the pairs with the pipeline you train "
        "(`python -m scdpo_jax.data.cache --pretrained <that folder>`)")
  if model_folder is not None:
    check_cache_matches_model(ds, Path(model_folder), text_layer)


class CacheMismatchError(ValueError):
  """A latent dataset was cached with another VAE, text encoder or text layer."""


def check_cache_matches_model(ds, model_folder: Path, text_layer: int | None) -> None:
  """Refuse latents and text states cached with another pipeline than the one being trained.

  The cache records (data/cache.py) the identity of the VAE and text encoder weights that made
  it and the text-encoder layer; the model folder's must be the same. Datasets cached before
  these were recorded are accepted with a warning.
  """
  cache = ((ds.metadata or {}).get("cache") or {}).get("encoder")  # PairEncoder.fingerprint()
  if not cache:
    logging.warning("%s records no cache settings; cannot check that it was cached with %s",
                    ds.path, model_folder)
    return
  problems = []
  if text_layer is not None and "text_layer" in cache and int(cache["text_layer"]) != text_layer:
    problems.append(f"text_layer: cached {cache['text_layer']}, trainer model.text_layer "
                    f"{text_layer}")
  components = ["text_encoder"] + (["text_encoder_2"] if "text_encoder_2_identity" in cache
                                   else [])
  if cache.get("vae_folder"):  # an external VAE (SDXL's fp16-fix): the trainer does not use it
    logging.info("%s was cached with the VAE of %s; not compared with %s/vae", ds.path,
                 cache["vae_folder"], model_folder)
  else:
    components.insert(0, "vae")
  for component in components:
    key = f"{component}_identity"
    if key not in cache:
      logging.warning("%s does not record its %s weights; not checked", ds.path, component)
      continue
    ours = files.folder_identity(model_folder / component)
    if cache[key] != ours:
      problems.append(f"{component}: cached with {cache.get('pretrained', '?')}/{component} "
                      f"({cache[key]}), training {model_folder / component} ({ours})")
  if problems:
    raise CacheMismatchError(
        f"{ds.path} was cached with another pipeline than model.pretrained={model_folder}: "
        + "; ".join(problems) + ". Cache the pairs again with `python -m scdpo_jax.data.cache "
        f"--pretrained {model_folder} ...`")


CATEGORY_BALANCES = ("none", "equal")


def category_balanced_positions(categories: Sequence[str]) -> np.ndarray:
  """Positions that give every non-empty category as many records as the largest one.

  Records of a category with n of the largest count N are taken cyclically in record order until
  there are N (each floor(N/n) or ceil(N/n) times: repeat-factor sampling); records with an empty
  category (clean pairs) are taken once. The result is in no particular order: the loader shuffles
  every epoch."""
  cats = np.asarray([str(c) for c in categories], dtype=object)
  named = sorted({c for c in cats if c})
  if not named:
    raise ValueError("category balance: no record has a category (the `category` field is "
                     "empty everywhere)")
  groups = {c: np.flatnonzero(cats == c) for c in named}
  target = max(g.size for g in groups.values())
  parts = [np.flatnonzero(cats == "")] + [np.resize(groups[c], target) for c in named]
  return np.concatenate(parts).astype(np.int64)


def open_pair_source(data_config, **kwargs) -> PairLoader:
  """The trainer's tfds pair source: a `PairLoader` over data.name/data_dir[split], shuffled by
  data.seed, with data.hflip; with data.category_balance="equal" over the records of
  `category_balanced_positions` instead. Extra keyword arguments go to `PairLoader`."""
  balance = data_config.get("category_balance", "none")
  if balance not in CATEGORY_BALANCES:
    raise ValueError(f"data.category_balance={balance!r}; supported: {CATEGORY_BALANCES}")
  path = resolve_dataset_path(data_config.name, data_config.data_dir)
  src = PairLoader(path, split=data_config.split, seed=data_config.seed,
                   hflip=data_config.hflip, nan_cost=data_config.get("nan_cost", "zero"),
                   **kwargs)
  if balance == "equal":
    src = src.subset(category_balanced_positions(src.record_categories()),
                     label="category_balance=equal")
  return src


def load_all(path: str | Path, split: str = "train") -> dict[str, np.ndarray]:
  """Every record of a latent pair dataset as arrays in batch.py format, in record order
  (NaN reward/cost -> 0). Meant for small datasets (e.g. to build an `InMemoryPairs`)."""
  ds = tfds_pairs.open_pairs(path)
  if not ds.schema.has_latents:
    raise ValueError(f"{ds.path} holds images, not latents; cache it first (cache.py)")
  src = ds.source(split)
  records = src.__getitems__(list(range(len(src))))
  out = {k: np.stack([np.asarray(r[k], np.float32) for r in records])
         for k in ("latents_w", "latents_l", "text_states")
         + (XL_KEYS if ds.schema.pooled_dim else ())}
  out["is_harmful"] = np.array([int(r["is_harmful"]) for r in records], np.int32)
  for k in FLOAT_KEYS:
    out[k] = np.nan_to_num(np.array([float(r[k]) for r in records], np.float32), nan=0.0)
  return out
