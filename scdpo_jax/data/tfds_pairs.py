"""The preference-pair dataset on tensorflow-datasets ArrayRecord files (no TensorFlow needed).

One record is one preference pair (winner `_w`, loser `_l`) under one prompt:

  pair_id      Text                   stable id of the pair in its source (`<file>:<row>`, ...)
  prompt       Text                   the conditioning prompt (UTF-8)
  category     Text                   harm category ("" for clean prompts / unknown)
  is_harmful   int32 scalar           1 = harmful prompt, 0 = clean prompt
  hflip_ok     int32 scalar           1 = a horizontal flip keeps the pair valid (0 when the prompt
                                      says left/right, or the source says so)
  reward_w/_l  float32 scalar         preference reward of each image, NaN when unknown
  cost_w/_l    float32 scalar         safety cost of each image, NaN when unknown
  input_ids    int32 (T,)             token ids of the prompt             [when schema.token_length]
  image_w/_l   bytes                  encoded image (PNG/JPEG/... as in the source) [schema.images]
  latents_w/_l latent_dtype (h, w, c) VAE latents x scaling_factor, NHWC  [schema.latent_shape]
  text_states  states_dtype (T, D)    text-encoder states of the prompt   [schema.text_states_shape]
  pooled_text  states_dtype (P,)      SDXL: text_encoder_2's pooled output [schema.pooled_dim]
  time_ids     float32 (6,)           SDXL: original (h, w), crop (top, left), target (h, w)
                                      of the cached images                [schema.pooled_dim]

The optional fields make two kinds of datasets: *image pairs* (what the converters and the pair
builder write) and *latent pairs* (what `cache.py` writes; the trainer's input). SDXL latent pairs
(config name "latents_xl") also hold `pooled_text` and `time_ids`, and their `text_states` are
both encoders' states concatenated; SD 1.x/2.x datasets are unchanged. Images are stored
as encoded bytes in a `Tensor(shape=(), dtype=object)` feature because `tfds.features.Image`
needs TensorFlow to encode; ArrayRecord (not TFRecord) is the only format tfds writes without TF.

Layout on disk: `write_pairs(output_dir, ...)` uses `output_dir` as the tfds `data_dir`, so the
files land in `output_dir/scdpo_pairs/<config>/1.0.0/`. Readers take either that folder or any
folder above it that holds exactly one dataset (`find_dataset_dir`). Records are written in
generation order (`disable_shuffling=True`): record i of a split is the i-th example written.
Read with `open_pairs(path).source(split)`: random access (`len`, `[i]`, `__getitems__`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

DATASET_NAME = "scdpo_pairs"
VERSION = "1.0.0"
SCALAR_FLOAT_KEYS = ("reward_w", "reward_l", "cost_w", "cost_l")
TEXT_KEYS = ("pair_id", "prompt", "category")
WORK_DIR_NAMES = ("_cache_work",)  # scratch folders that `find_dataset_dir` ignores


@dataclasses.dataclass(frozen=True)
class PairSchema:
  """Which optional fields a pair dataset holds and their shapes (see the module docstring)."""

  token_length: int = 0  # 0 = no input_ids
  images: bool = True
  latent_shape: tuple[int, int, int] | None = None
  text_states_shape: tuple[int, int] | None = None
  latent_dtype: str = "float32"
  states_dtype: str = "float32"
  pooled_dim: int = 0  # SDXL: width of pooled_text (and time_ids are stored); 0 = SD, neither

  def __post_init__(self):
    for name in ("latent_dtype", "states_dtype"):
      if getattr(self, name) not in ("float32", "float16"):
        raise ValueError(f"PairSchema.{name} must be 'float32' or 'float16', "
                         f"got {getattr(self, name)!r}")
    if not self.images and self.latent_shape is None:
      raise ValueError("a pair dataset needs images or latents (schema has neither)")
    if (self.latent_shape is None) != (self.text_states_shape is None):
      raise ValueError("latents and text states are cached together: give both shapes or none")
    if self.pooled_dim and self.latent_shape is None:
      raise ValueError("pooled_dim (SDXL) needs cached latents and text states")

  @property
  def config_name(self) -> str:
    if self.latent_shape is None:
      return "images"
    return "latents_xl" if self.pooled_dim else "latents"

  @property
  def has_latents(self) -> bool:
    return self.latent_shape is not None

  def features(self) -> tfds.features.FeaturesDict:
    f: dict[str, Any] = {k: tfds.features.Text() for k in TEXT_KEYS}
    f["is_harmful"] = tfds.features.Scalar(dtype=np.int32)
    f["hflip_ok"] = tfds.features.Scalar(dtype=np.int32)
    for k in SCALAR_FLOAT_KEYS:
      f[k] = tfds.features.Scalar(dtype=np.float32)
    if self.token_length:
      f["input_ids"] = tfds.features.Tensor(shape=(self.token_length,), dtype=np.int32)
    if self.images:
      for k in ("image_w", "image_l"):
        f[k] = tfds.features.Tensor(shape=(), dtype=np.object_)
    if self.latent_shape is not None:
      for k in ("latents_w", "latents_l"):
        f[k] = tfds.features.Tensor(shape=tuple(self.latent_shape),
                                    dtype=np.dtype(self.latent_dtype))
      f["text_states"] = tfds.features.Tensor(shape=tuple(self.text_states_shape),
                                              dtype=np.dtype(self.states_dtype))
    if self.pooled_dim:
      f["pooled_text"] = tfds.features.Tensor(shape=(self.pooled_dim,),
                                              dtype=np.dtype(self.states_dtype))
      f["time_ids"] = tfds.features.Tensor(shape=(6,), dtype=np.float32)
    return tfds.features.FeaturesDict(f)

  @classmethod
  def from_features(cls, features: Mapping[str, Any]) -> "PairSchema":
    """Recover the schema of a written dataset from its tfds FeaturesDict."""
    def shape(key):
      return tuple(int(d) for d in features[key].shape)

    kw: dict[str, Any] = {"images": "image_w" in features}
    if "input_ids" in features:
      kw["token_length"] = shape("input_ids")[0]
    if "latents_w" in features:
      kw["latent_shape"] = shape("latents_w")
      kw["text_states_shape"] = shape("text_states")
      kw["latent_dtype"] = np.dtype(features["latents_w"].np_dtype).name
      kw["states_dtype"] = np.dtype(features["text_states"].np_dtype).name
    if "pooled_text" in features:
      kw["pooled_dim"] = shape("pooled_text")[0]
    return cls(**kw)


class DuplicatePairIdError(ValueError):
  """Two examples of one split share a pair_id."""


class EmptySplitError(ValueError):
  """A split to write holds no examples."""


class ScdpoPairsConfig(tfds.core.BuilderConfig):
  """Builder config carrying the schema (the config name is `schema.config_name`)."""

  def __init__(self, schema: PairSchema, **kwargs):
    super().__init__(name=schema.config_name, version=VERSION, **kwargs)
    self.schema = schema


class ScdpoPairs(tfds.core.GeneratorBasedBuilder):
  """Writes preference pairs from Python iterables of example dicts, one iterable per split.

  Not meant to be constructed directly: use `write_pairs`. The generator runs once, inside
  `download_and_prepare`; an exception from it aborts the write (tfds leaves no finished dataset).
  """

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, splits: Mapping[str, Iterable[dict]], description: str = "",
               metadata: Mapping[str, Any] | None = None, **kwargs):
    self._split_examples = dict(splits)
    self._description = description
    self._metadata = dict(metadata or {})
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self._description,
        features=self.builder_config.schema.features(),
        metadata=tfds.core.MetadataDict(self._metadata), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {name: self._generate_examples(examples)
            for name, examples in self._split_examples.items()}

  def _generate_examples(self, examples: Iterable[dict]) -> Iterator[tuple[int, dict]]:
    schema = self.builder_config.schema
    seen: dict[str, int] = {}
    i = -1
    for i, ex in enumerate(examples):
      out = complete_example(ex, schema)
      pid = str(out["pair_id"])
      if pid in seen:
        raise DuplicatePairIdError(f"pair_id {pid!r} occurs twice (examples {seen[pid]} and {i}); "
                                   "pair ids must be unique within a split")
      seen[pid] = i
      yield i, out
    if i < 0:
      raise EmptySplitError("no pairs to write: the input yielded no usable rows (is the CSV "
                            "only a header, or were all rows dropped? see the conversion report)")


def complete_example(ex: Mapping[str, Any], schema: PairSchema) -> dict[str, Any]:
  """Fill defaults (NaN reward/cost, empty category, hflip_ok=1) and drop fields the schema lacks.

  Raises KeyError naming a required field that is missing.
  """
  out: dict[str, Any] = {"category": "", "hflip_ok": 1}
  out.update({k: math.nan for k in SCALAR_FLOAT_KEYS})
  required = ["pair_id", "prompt", "is_harmful"]
  if schema.token_length:
    required.append("input_ids")
  if schema.images:
    required += ["image_w", "image_l"]
  if schema.has_latents:
    required += ["latents_w", "latents_l", "text_states"]
  if schema.pooled_dim:
    required += ["pooled_text", "time_ids"]
  missing = [k for k in required if k not in ex or ex[k] is None]
  if missing:
    raise KeyError(f"pair example {ex.get('pair_id', '?')!r} lacks {missing}")
  keep = _feature_keys(schema)
  for k, v in ex.items():
    if k in keep and v is not None:
      out[k] = v
  for k in SCALAR_FLOAT_KEYS:
    out[k] = float(out[k])
  out["is_harmful"] = int(out["is_harmful"])
  out["hflip_ok"] = int(out["hflip_ok"])
  if schema.images:
    for k in ("image_w", "image_l"):
      out[k] = bytes(out[k])
  return out


@functools.lru_cache(maxsize=16)
def _feature_keys(schema: PairSchema) -> frozenset[str]:
  return frozenset(schema.features().keys())


def write_pairs(output_dir: str | Path, splits: Mapping[str, Iterable[dict]], schema: PairSchema,
                *, description: str = "", metadata: Mapping[str, Any] | None = None) -> Path:
  """Write a pair dataset (one ArrayRecord split per entry of `splits`); returns its folder.

  `metadata` (JSON-serialisable) is stored in the dataset's `metadata.json` and comes back as
  `PairsDataset.metadata`. Fails if a dataset of the same kind already exists in `output_dir`.
  """
  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  tfds.disable_progress_bar()
  json.dumps(dict(metadata or {}))  # fail now, not after writing, on non-JSON metadata
  builder = ScdpoPairs(splits=splits, description=description, metadata=metadata,
                       data_dir=str(output_dir), config=ScdpoPairsConfig(schema),
                       file_format="array_record")
  if Path(builder.data_dir).joinpath("dataset_info.json").is_file():
    raise FileExistsError(f"a pair dataset already exists in {builder.data_dir}; "
                          "choose another output folder or delete it")
  with tempfile.TemporaryDirectory() as downloads:
    builder.download_and_prepare(download_dir=downloads)
  return Path(builder.data_dir)


def find_dataset_dir(path: str | Path) -> Path:
  """The folder holding `dataset_info.json`: `path` itself or the single dataset below it."""
  path = Path(path)
  if (path / "dataset_info.json").is_file():
    return path
  if not path.is_dir():
    raise FileNotFoundError(f"pair dataset {path} does not exist")
  found = sorted(p.parent for p in path.rglob("dataset_info.json")
                 if not any(part.startswith("incomplete.") or part in WORK_DIR_NAMES
                            for part in p.relative_to(path).parts))
  if len(found) != 1:
    what = ("no tfds dataset" if not found
            else f"{len(found)} datasets ({', '.join(map(str, found))})")
    raise FileNotFoundError(f"expected one pair dataset under {path}, found {what}; pass the "
                            "folder that holds dataset_info.json")
  return found[0]


class PairsDataset:
  """A written pair dataset: schema, splits, metadata and random-access sources per split."""

  def __init__(self, path: str | Path):
    self.path = find_dataset_dir(path)
    self.builder = tfds.builder_from_directory(str(self.path))
    self.schema = PairSchema.from_features(self.builder.info.features)
    self.metadata: dict[str, Any] = dict(self.builder.info.metadata or {})
    self._sources: dict[str, Any] = {}

  @property
  def splits(self) -> dict[str, int]:
    return {name: int(info.num_examples) for name, info in self.builder.info.splits.items()}

  def source(self, split: str = "train"):
    """tfds ArrayRecord data source: `len(src)`, `src[i]`, `src.__getitems__(indices)`; items are
    dicts of NumPy values (Text comes back as bytes, scalars as 0-d arrays)."""
    if split not in self.splits:
      raise KeyError(f"{self.path} has no split {split!r}; splits: {sorted(self.splits)}")
    if split not in self._sources:
      self._sources[split] = self.builder.as_data_source(split=split)
    return self._sources[split]

  def __repr__(self) -> str:
    return f"PairsDataset({self.path}, {self.schema}, splits={self.splits})"


def open_pairs(path: str | Path) -> PairsDataset:
  return PairsDataset(path)


def text(value: Any) -> str:
  """A Text field as str (tfds returns bytes)."""
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)
