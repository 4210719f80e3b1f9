"""CLIP text / vision tower hyper-parameters, parsed from Hugging Face config.json dicts.

`CLIPTextConfig` / `CLIPVisionConfig` mirror transformers' classes of the same names (defaults
included) for the options our towers implement; anything else raises `ValueError` naming the key.
`text_config_from_hf` / `vision_config_from_hf` also read a full `CLIPModel` config (nested
`text_config` / `vision_config`, top-level `projection_dim`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")

TEXT_ARCHITECTURE = "CLIPTextModel"
TEXT_PROJ_ARCHITECTURE = "CLIPTextModelWithProjection"
VISION_ARCHITECTURE = "CLIPVisionModel"
VISION_PROJ_ARCHITECTURE = "CLIPVisionModelWithProjection"
FULL_ARCHITECTURE = "CLIPModel"

TEXT_MODEL_TYPE = "clip_text_model"
VISION_MODEL_TYPE = "clip_vision_model"
FULL_MODEL_TYPE = "clip"


def _check_choice(key: str, value: Any, supported: Sequence[Any]) -> None:
  if value not in supported:
    raise ValueError(f"unsupported CLIP config value {key}={value!r}; supported: {list(supported)}")


def _check_positive(cfg: Any, keys: Iterable[str]) -> None:
  for key in keys:
    value = getattr(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"CLIP config {key} must be a positive int, got {value!r}")


def _square_size(key: str, value: Any) -> int:
  """HF allows `image_size` / `patch_size` as an int or an (h, w) pair; we support squares."""
  if isinstance(value, (list, tuple)):
    if len(value) == 2 and value[0] == value[1]:
      return int(value[0])
    raise ValueError(f"unsupported CLIP config value {key}={value!r}; supported: an int or a "
                     "square [n, n] pair")
  return value


def _known_fields(cls: type, d: Mapping[str, Any], nullable: Iterable[str] = ()) -> dict:
  """The entries of `d` that are fields of `cls`; `None` means "default" unless nullable."""
  names = {f.name for f in dataclasses.fields(cls)}
  nullable = set(nullable)
  return {k: v for k, v in d.items() if k in names and (v is not None or k in nullable)}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The CLIP text tower hyper-parameters (transformers' `CLIPTextConfig`, defaults included).

  `eos_token_id` picks the pooled token: 2 is the legacy value of old OpenAI configs (pool at
  `argmax(input_ids)`, i.e. the highest token id, which is EOS for the original vocabulary);
  anything else pools at the first position holding `eos_token_id`.
  """

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  pad_token_id: Optional[int] = 1
  bos_token_id: Optional[int] = 49406
  eos_token_id: int = 49407

  def __post_init__(self):
    _check_choice("hidden_act", self.hidden_act, SUPPORTED_ACTIVATIONS)
    _check_positive(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "max_position_embeddings", "projection_dim"))
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIP config hidden_size={self.hidden_size} is not a multiple of "
                       f"num_attention_heads={self.num_attention_heads}")
    if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int):
      raise ValueError(f"unsupported CLIP config value eos_token_id={self.eos_token_id!r}; "
                       "supported: a single int token id")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
    """From a transformers `clip_text_model` config dict; unknown keys are ignored."""
    kw = _known_fields(cls, d, nullable=("pad_token_id", "bos_token_id", "eos_token_id"))
    eos = kw.get("eos_token_id")
    if isinstance(eos, (list, tuple)) and len(eos) == 1:
      kw["eos_token_id"] = eos[0]
    return cls(**kw)

  def to_dict(self) -> dict[str, Any]:
    """A transformers-compatible `CLIPTextConfig` dict (without "architectures")."""
    return {**dataclasses.asdict(self), "model_type": TEXT_MODEL_TYPE}

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """CLIP vision tower hyper-parameters (transformers' `CLIPVisionConfig` and its defaults)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512

  def __post_init__(self):
    _check_choice("hidden_act", self.hidden_act, SUPPORTED_ACTIVATIONS)
    _check_positive(self, ("hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "num_channels", "image_size", "patch_size",
                           "projection_dim"))
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIP config hidden_size={self.hidden_size} is not a multiple of "
                       f"num_attention_heads={self.num_attention_heads}")
    if self.patch_size > self.image_size:
      raise ValueError(f"CLIP config patch_size={self.patch_size} exceeds "
                       f"image_size={self.image_size}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
    """From a transformers `clip_vision_model` config dict; unknown keys are ignored."""
    kw = _known_fields(cls, d)
    for key in ("image_size", "patch_size"):
      if key in kw:
        kw[key] = _square_size(key, kw[key])
    return cls(**kw)

  def to_dict(self) -> dict[str, Any]:
    """A transformers-compatible `CLIPVisionConfig` dict (without "architectures")."""
    return {**dataclasses.asdict(self), "model_type": VISION_MODEL_TYPE}

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    """Sequence length of the vision tower: CLS + patches."""
    return self.num_patches + 1


TowerConfig = Union[CLIPTextConfig, CLIPVisionConfig]


def is_full_clip_config(d: Mapping[str, Any]) -> bool:
  """True for a full `CLIPModel` config.json (nested `text_config` / `vision_config`)."""
  return (d.get("model_type") == FULL_MODEL_TYPE or "text_config" in d or "vision_config" in d
          or FULL_ARCHITECTURE in (d.get("architectures") or ()))


def _sub_config(d: Mapping[str, Any], name: str) -> dict[str, Any]:
  sub = dict(d.get(name) or {})
  sub.update(d.get(f"{name}_dict") or {})  # old configs also carry `text_config_dict`
  if d.get("projection_dim") is not None:
    # CLIPModel's projections use the top-level projection_dim, not the towers' own value.
    sub["projection_dim"] = d["projection_dim"]
  return sub


def text_config_from_hf(d: Mapping[str, Any]) -> CLIPTextConfig:
  """A `CLIPTextConfig` from a text-tower config.json or a full `CLIPModel` one."""
  if is_full_clip_config(d):
    return CLIPTextConfig.from_dict(_sub_config(d, "text_config"))
  if d.get("model_type") == VISION_MODEL_TYPE:
    raise ValueError("expected a CLIP text config, got a CLIP vision config "
                     f"(model_type={VISION_MODEL_TYPE!r})")
  return CLIPTextConfig.from_dict(d)


def vision_config_from_hf(d: Mapping[str, Any]) -> CLIPVisionConfig:
  """A `CLIPVisionConfig` from a vision-tower config.json or a full `CLIPModel` one."""
  if is_full_clip_config(d):
    return CLIPVisionConfig.from_dict(_sub_config(d, "vision_config"))
  if d.get("model_type") == TEXT_MODEL_TYPE:
    raise ValueError("expected a CLIP vision config, got a CLIP text config "
                     f"(model_type={TEXT_MODEL_TYPE!r})")
  return CLIPVisionConfig.from_dict(d)
