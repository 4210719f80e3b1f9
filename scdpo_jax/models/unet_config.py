"""The UNet2DConditionModel config of Stable Diffusion 1.x / 2.x and SDXL, parsed from diffusers'
`unet/config.json`.

SDXL's UNet is the same model with `addition_embed_type="text_time"` (pooled text embeddings and
micro-conditioning time ids added to the timestep embedding, `addition_time_embed_dim`,
`projection_class_embeddings_input_dim`), per-block `transformer_layers_per_block` and heads,
and a first block without attention (`DownBlock2D`).

diffusers' `attention_head_dim` is, for SD 1.x/2.x checkpoints, the *number of heads* (a
historical naming quirk that diffusers keeps); `UNetConfig.heads_per_block` resolves it the same
way diffusers does. Options whose non-default values we do not implement raise `ValueError`
naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
ADDITION_EMBED_TYPES = (None, "text_time")
# Config options whose non-default values we do not implement; loading fails loudly on them.
_MUST_EQUAL = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "class_embeddings_concat": False,
    "time_embedding_act_fn": None,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
    "mid_block_scale_factor": 1.0,
    "act_fn": "silu",
    "downsample_padding": 1,
}


def _as_tuple(value: Any, n: int, key: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"UNet config: {key} has {len(value)} entries but there are {n} blocks")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The subset of diffusers' UNet2DConditionModel config that SD 1.x/2.x and SDXL use."""

  sample_size: int | tuple[int, int] = 64  # latent side, or [height, width] (diffusers accepts both)
  in_channels: int = 4
  out_channels: int = 4
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 768
  transformer_layers_per_block: Any = 1
  attention_head_dim: Any = 8
  num_attention_heads: Any = None
  use_linear_projection: bool = False
  upcast_attention: bool = False
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  # SDXL: "text_time" adds add_embedding(concat(text_embeds, sinusoid(time_ids))) to the
  # timestep embedding; the two dims are then required.
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  extra: tuple = ()  # other keys of the source config, written back unchanged on export

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
    """Validate a diffusers config dict; unsupported options raise with the key named."""
    for key, default in _MUST_EQUAL.items():
      value = d.get(key, default)
      if isinstance(default, float) and value is not None:
        ok = float(value) == default
      else:
        ok = value == default
      if not ok:
        raise ValueError(f"UNet config option {key}={value!r} is not supported "
                         f"(supported: {default!r})")
    if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
      raise ValueError(f"UNet config _class_name={d['_class_name']!r} is not supported "
                       "(supported: 'UNet2DConditionModel')")
    fields = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
    if isinstance(kwargs.get("layers_per_block", 2), tuple):
      raise ValueError("UNet config: a per-block layers_per_block list is not supported "
                       "(SD 1.x/2.x use one int)")
    extra = tuple(sorted((k, v) for k, v in d.items()
                         if k not in fields and k not in _MUST_EQUAL
                         and not isinstance(v, (list, dict))))
    cfg = cls(**kwargs, extra=extra)
    cfg.validate()
    return cfg

  @property
  def sample_hw(self) -> tuple[int, int]:
    """(height, width) of the default latent: `sample_size` as a square side or [h, w]."""
    s = self.sample_size
    return (int(s[0]), int(s[1])) if isinstance(s, (tuple, list)) else (int(s), int(s))

  def validate(self) -> None:
    s = self.sample_size
    sides = tuple(s) if isinstance(s, (tuple, list)) else (s,)
    if len(sides) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                       for v in sides):
      raise ValueError(f"UNet config: sample_size={s!r} must be a positive integer or "
                       "[height, width]")
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError("UNet config: down_block_types, up_block_types and block_out_channels "
                       f"must have the same length, got {len(self.down_block_types)}, "
                       f"{len(self.up_block_types)} and {n}")
    for key, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
      for t in types:
        if t not in allowed:
          raise ValueError(f"UNet config: {key} entry {t!r} is not supported "
                           f"(supported: {allowed})")
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(f"UNet config: mid_block_type={self.mid_block_type!r} is not supported "
                       f"(supported: {MID_BLOCK_TYPES})")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"UNet config: block_out_channels {self.block_out_channels} must be "
                         f"divisible by norm_num_groups={self.norm_num_groups}")
    for depth in self.transformer_layers:
      if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError("UNet config: transformer_layers_per_block entries must be positive "
                         f"integers (one per block), got {self.transformer_layers_per_block!r}")
    if self.addition_embed_type not in ADDITION_EMBED_TYPES:
      raise ValueError(f"UNet config option addition_embed_type={self.addition_embed_type!r} is "
                       f"not supported (supported: {ADDITION_EMBED_TYPES})")
    if self.addition_embed_type == "text_time":
      for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        v = getattr(self, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
          raise ValueError(f"UNet config: addition_embed_type='text_time' needs a positive "
                           f"integer {key}, got {v!r}")
      if self.projection_class_embeddings_input_dim <= self.addition_time_embed_dim:
        raise ValueError(
            "UNet config: projection_class_embeddings_input_dim="
            f"{self.projection_class_embeddings_input_dim} must exceed addition_time_embed_dim="
            f"{self.addition_time_embed_dim} (pooled text dim + time ids x time embed dim)")
    for c, h in zip(self.block_out_channels, self.heads_per_block):
      if c % h:
        raise ValueError(f"UNet config: {c} channels do not split into {h} attention heads")

  @property
  def heads_per_block(self) -> tuple[int, ...]:
    # diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
    heads = self.num_attention_heads or self.attention_head_dim
    return _as_tuple(heads, len(self.block_out_channels), "attention_head_dim")

  @property
  def transformer_layers(self) -> tuple[int, ...]:
    return _as_tuple(self.transformer_layers_per_block, len(self.block_out_channels),
                     "transformer_layers_per_block")

  def to_dict(self) -> dict[str, Any]:
    """A config.json dict that diffusers' UNet2DConditionModel.from_pretrained accepts."""
    d = dict(self.extra)
    for f in dataclasses.fields(self):
      if f.name == "extra":
        continue
      v = getattr(self, f.name)
      d[f.name] = list(v) if isinstance(v, tuple) else v
    d.update({k: v for k, v in _MUST_EQUAL.items()
              if k != "reverse_transformer_layers_per_block"})
    d["_class_name"] = "UNet2DConditionModel"
    d.setdefault("_diffusers_version", "0.42.1")
    return d
