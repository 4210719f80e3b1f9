"""The diffusers `AutoencoderKL` config (the Stable Diffusion VAE), parsed from `vae/config.json`.

`VAEConfig.from_dict` takes diffusers' defaults for missing keys, ignores unknown ones and raises
`ValueError` naming the key, value and what is supported for a value this port cannot reproduce.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_DOWN_BLOCKS = ("DownEncoderBlock2D",)
SUPPORTED_UP_BLOCKS = ("UpDecoderBlock2D",)
# Activations both diffusers' `get_activation` and ours implement identically.
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu")


def _unsupported(key: str, value: Any, supported: str) -> ValueError:
  return ValueError(f"VAE config {key}={value!r} is not supported; supported: {supported}")


def _positive_int(d: Mapping[str, Any], key: str, default: int) -> int:
  value = d.get(key, default)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise _unsupported(key, value, "a positive integer")
  return value


def _bool(d: Mapping[str, Any], key: str, default: bool) -> bool:
  value = d.get(key, default)
  if not isinstance(value, bool):
    raise _unsupported(key, value, "true or false")
  return value


def _float(d: Mapping[str, Any], key: str, default: float | None, *,
           optional: bool = False) -> float | None:
  value = d.get(key, default)
  if value is None and optional:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _unsupported(key, value, "a number" + (" or null" if optional else ""))
  return float(value)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The subset of diffusers' `AutoencoderKL` config this port implements (diffusers' defaults).
  """

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, ...] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self) -> None:
    # Direct construction skips from_dict's checks; catch the inconsistencies that would make
    # to_dict() write a config diffusers builds differently.
    n = len(self.block_out_channels)
    for key in ("down_block_types", "up_block_types"):
      if len(getattr(self, key)) != n:
        raise ValueError(f"VAEConfig {key} has {len(getattr(self, key))} entries but "
                         f"block_out_channels has {n}")
    if any(c % self.norm_num_groups for c in self.block_out_channels):
      raise ValueError(f"VAEConfig block_out_channels={list(self.block_out_channels)} must be "
                       f"divisible by norm_num_groups={self.norm_num_groups}")

  @property
  def downsample_factor(self) -> int:
    """Image side / latent side."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
    """Parse a diffusers `AutoencoderKL` config.json dict.

    Keys starting with "_" (`_class_name`, `_diffusers_version`, ...) and keys this port does not
    know are ignored; missing keys take diffusers' defaults. A value this port cannot reproduce
    exactly raises `ValueError` naming the key, the value and what is supported.
    """
    defaults = cls()
    class_name = d.get("_class_name", "AutoencoderKL")
    if class_name not in ("AutoencoderKL", "FlaxAutoencoderKL"):
      raise _unsupported("_class_name", class_name, "'AutoencoderKL'")

    channels = d.get("block_out_channels", defaults.block_out_channels)
    if (not isinstance(channels, (list, tuple)) or not channels
        or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels)):
      raise _unsupported("block_out_channels", channels, "a non-empty list of positive integers")
    channels = tuple(channels)
    groups = _positive_int(d, "norm_num_groups", defaults.norm_num_groups)
    if any(c % groups for c in channels):
      raise _unsupported("block_out_channels", list(channels),
                         f"channel counts divisible by norm_num_groups={groups}")

    def block_types(key: str, supported: tuple[str, ...]) -> tuple[str, ...]:
      value = d.get(key, (supported[0],) * len(channels))
      if (not isinstance(value, (list, tuple)) or len(value) != len(channels)
          or any(v not in supported for v in value)):
        raise _unsupported(key, value, f"a list of {len(channels)} (len(block_out_channels)) "
                           f"entries, each one of {list(supported)}")
      return tuple(value)

    act_fn = d.get("act_fn", defaults.act_fn)
    if act_fn not in SUPPORTED_ACTIVATIONS:
      raise _unsupported("act_fn", act_fn, f"one of {list(SUPPORTED_ACTIVATIONS)}")

    sample_size = d.get("sample_size", defaults.sample_size)
    if isinstance(sample_size, (list, tuple)):
      if len(sample_size) != 2 or any(
          isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sample_size):
        raise _unsupported("sample_size", sample_size, "a positive integer or [height, width]")
      sample_size = tuple(sample_size)
    else:
      sample_size = _positive_int(d, "sample_size", defaults.sample_size)

    for key in ("latents_mean", "latents_std"):
      if d.get(key) is not None:
        raise _unsupported(key, d[key], "null (per-channel latent statistics are not implemented)")

    scaling_factor = _float(d, "scaling_factor", defaults.scaling_factor)
    if not scaling_factor > 0:
      raise _unsupported("scaling_factor", d.get("scaling_factor"), "a positive number")

    return cls(
        in_channels=_positive_int(d, "in_channels", defaults.in_channels),
        out_channels=_positive_int(d, "out_channels", defaults.out_channels),
        down_block_types=block_types("down_block_types", SUPPORTED_DOWN_BLOCKS),
        up_block_types=block_types("up_block_types", SUPPORTED_UP_BLOCKS),
        block_out_channels=channels,
        layers_per_block=_positive_int(d, "layers_per_block", defaults.layers_per_block),
        act_fn=act_fn,
        latent_channels=_positive_int(d, "latent_channels", defaults.latent_channels),
        norm_num_groups=groups,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        shift_factor=_float(d, "shift_factor", None, optional=True),
        force_upcast=_bool(d, "force_upcast", defaults.force_upcast),
        use_quant_conv=_bool(d, "use_quant_conv", defaults.use_quant_conv),
        use_post_quant_conv=_bool(d, "use_post_quant_conv", defaults.use_post_quant_conv),
        mid_block_add_attention=_bool(d, "mid_block_add_attention",
                                      defaults.mid_block_add_attention),
    )

  def to_dict(self) -> dict[str, Any]:
    """A config.json dict that diffusers' `AutoencoderKL.from_pretrained` accepts."""
    out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      out[field.name] = list(value) if isinstance(value, tuple) else value
    out["latents_mean"] = None
    out["latents_std"] = None
    return out
