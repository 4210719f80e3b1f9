"""LoRA adapters over our parameter trees, as pure functions (no forked model definitions).

A LoRA tree mirrors the module paths of the base `params` tree it adapts: for every adapted
kernel `<module path>/kernel` it holds `<module path>/lora_A` and `<module path>/lora_B`, in
Flax kernel layouts so that `convert.torch_layout` turns them into peft's `lora_A.weight` /
`lora_B.weight`:

* Dense kernel (in, out): A (in, r), B (r, out); logical axes (in_axis, None) and (None,
  out_axis), mirroring the base kernel's;
* Conv kernel (kh, kw, in, out): A (kh, kw, in, r) (peft's lora_A is a conv with the base
  kernel size, stride and padding), B (1, 1, r, out) (a 1x1 conv).

The adapted weight is `W + scale * A @ B` with `scale = alpha / rank` (peft's `lora_alpha / r`).
`merge(base, lora, scale)` returns that tree; the LoRA train step applies the unchanged UNet to
it, so the base is an argument (frozen, shared with the DPO reference) and only the LoRA tree
is differentiated.

Which kernels are adapted: `config.lora.targets`, regular expressions matched with
`re.fullmatch` against the module path joined by '/', e.g.
`down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q` (`TARGET_PRESETS` names the usual
sets). Only 2-D (Dense) and 4-D (Conv) kernels can be adapted. The CLIP text encoder can carry
adapters too: `config.lora.text_encoder_targets`, the same kind of rules over its module paths
(`text_model/encoder/layers_0/self_attn/q_proj`; `TEXT_ENCODER_PRESETS`), empty by default
(UNet only); `lora/text_encoder.py` combines both trees for training.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from flax.core import meta

from scdpo_jax.errors import ConfigError

INITS = ("gaussian", "kaiming")

# Named sets of target rules (module paths of our UNet; `config.lora.targets` may list preset
# names and regular expressions side by side).
TARGET_PRESETS = {
    # diffusers' Diffusion-DPO / SafetyDPO recipe: to_q, to_k, to_v, to_out.0 of every block
    "attention": (r".*transformer_blocks_\d+/attn[12]/(to_q|to_k|to_v|to_out_0)",),
    "feed_forward": (r".*transformer_blocks_\d+/ff/(net_0/proj|net_2)",),
    "proj": (r".*attentions_\d+/(proj_in|proj_out)",),
    "resnet_conv": (r".*resnets_\d+/(conv1|conv2|conv_shortcut)",),
}
# The same for our CLIP text encoder's module paths (`config.lora.text_encoder_targets`).
TEXT_ENCODER_PRESETS = {
    # diffusers' train_dreambooth_lora text-encoder targets: q/k/v/out_proj of every layer
    "attention": (r"text_model/encoder/layers_\d+/self_attn/(q_proj|k_proj|v_proj|out_proj)",),
    "mlp": (r"text_model/encoder/layers_\d+/mlp/(fc1|fc2)",),
}
UNET, TEXT_ENCODER = "unet", "text_encoder"  # the components LoRA can adapt


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What `config.lora` asks for."""

  rank: int = 4
  alpha: float = 4.0
  init: str = "gaussian"
  dropout: float = 0.0
  targets: tuple[str, ...] = ("attention",)
  text_encoder_targets: tuple[str, ...] = ()  # empty: no text-encoder LoRA

  @property
  def scale(self) -> float:
    return float(self.alpha) / float(self.rank)

  @property
  def patterns(self) -> tuple[str, ...]:
    return self.component_patterns(UNET)

  @property
  def adapts_text_encoder(self) -> bool:
    return bool(self.text_encoder_targets)

  def component_patterns(self, component: str) -> tuple[str, ...]:
    """The regular expressions of `component` ("unet" | "text_encoder"), presets expanded."""
    targets, presets = self._targets(component)
    out = []
    for t in targets:
      out.extend(presets.get(t, (t,)))
    return tuple(out)

  def _targets(self, component: str) -> tuple[tuple[str, ...], dict]:
    if component == UNET:
      return self.targets, TARGET_PRESETS
    if component == TEXT_ENCODER:
      return self.text_encoder_targets, TEXT_ENCODER_PRESETS
    raise ValueError(f"LoRA component {component!r}; known: {UNET!r}, {TEXT_ENCODER!r}")

  def validate(self) -> None:
    if not (isinstance(self.rank, int) and self.rank >= 1):
      raise ConfigError(f"lora.rank must be an integer >= 1, got {self.rank!r}")
    if not self.alpha > 0:
      raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
    if self.init not in INITS:
      raise ConfigError(f"lora.init={self.init!r}; supported: {INITS}")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
    if not self.targets:
      raise ConfigError("lora.targets is empty: name at least one rule or preset "
                        f"({sorted(TARGET_PRESETS)})")
    if self.adapts_text_encoder and self.dropout > 0:
      # the dropout branch (`apply_with_dropout`) is wired for the UNet call only
      raise ConfigError("lora.dropout > 0 is not supported with lora.text_encoder_targets (set "
                        "lora.dropout=0 or lora.text_encoder_targets=())")
    for key, component in (("lora.targets", UNET), ("lora.text_encoder_targets", TEXT_ENCODER)):
      for p in self.component_patterns(component):
        try:
          re.compile(p)
        except re.error as e:
          raise ConfigError(f"{key}: bad regular expression {p!r}: {e}") from None


def _rules(value) -> tuple[str, ...]:
  """A config's target rules: a sequence, or one comma-separated string (command line)."""
  if isinstance(value, str):
    return tuple(t.strip() for t in value.split(",") if t.strip())
  return tuple(value)


def spec_from_config(lora_config: ml_collections.ConfigDict) -> LoraSpec:
  return LoraSpec(rank=int(lora_config.rank), alpha=float(lora_config.alpha),
                  init=str(lora_config.init), dropout=float(lora_config.dropout),
                  targets=_rules(lora_config.targets),
                  text_encoder_targets=_rules(lora_config.get("text_encoder_targets", ())))


def enabled(config: ml_collections.ConfigDict) -> bool:
  """True when the run trains LoRA adapters (`config.lora.enabled`)."""
  return "lora" in config and bool(config.lora.enabled)


def module_key(path: Sequence[str]) -> str:
  return "/".join(path)


def target_modules(base_params: Any, patterns: Sequence[str]) -> list[tuple[str, ...]]:
  """Module paths (without the `kernel` leaf) of the base kernels matched by `patterns`, sorted."""
  flat = traverse_util.flatten_dict(meta.unbox(base_params))
  compiled = [re.compile(p) for p in patterns]
  out = []
  for path, leaf in flat.items():
    if path[-1] != "kernel" or len(leaf.shape) not in (2, 4):
      continue
    key = module_key(path[:-1])
    if any(c.fullmatch(key) for c in compiled):
      out.append(path[:-1])
  return sorted(out)


def _axes_of(boxed_leaf: Any, ndim: int) -> tuple:
  if isinstance(boxed_leaf, meta.AxisMetadata):
    names = tuple(boxed_leaf.names)
  else:
    names = (None,) * ndim
  return names


def lora_shapes(kernel_shape: Sequence[int], rank: int) -> tuple[tuple, tuple]:
  if len(kernel_shape) == 2:
    fan_in, fan_out = kernel_shape
    return (fan_in, rank), (rank, fan_out)
  kh, kw, fan_in, fan_out = kernel_shape
  return (kh, kw, fan_in, rank), (1, 1, rank, fan_out)


_EXAMPLE_PATHS = {UNET: "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q",
                  TEXT_ENCODER: "text_model/encoder/layers_0/self_attn/q_proj"}


def abstract_lora(boxed_base: Any, spec: LoraSpec, dtype=jnp.float32,
                  component: str = UNET) -> Any:
  """The LoRA tree of `component` ("unet": `spec.targets`, "text_encoder":
  `spec.text_encoder_targets`; `boxed_base` is that model's params) as `nn.LogicallyPartitioned`
  ShapeDtypeStructs (the base's logical axes on the in / out dimensions, none on the rank)."""
  import flax.linen as nn

  flat = traverse_util.flatten_dict(boxed_base)  # boxes are not dicts: they stay leaves
  modules = target_modules(boxed_base, spec.component_patterns(component))
  if not modules:
    key = "lora.targets" if component == UNET else "lora.text_encoder_targets"
    raise ConfigError(f"{key} {spec._targets(component)[0]} match no Dense / Conv kernel of the "
                      "model (rules are matched with re.fullmatch against module paths such as "
                      f"'{_EXAMPLE_PATHS[component]}')")
  out = {}
  for module in modules:
    leaf = flat[module + ("kernel",)]
    shape = tuple(meta.unbox(leaf).shape)
    names = _axes_of(leaf, len(shape))
    a_shape, b_shape = lora_shapes(shape, spec.rank)
    if len(shape) == 2:
      a_names, b_names = (names[0], None), (None, names[1])
    else:
      a_names, b_names = (None, None, names[2], None), (None, None, None, names[3])
    out[module + ("lora_A",)] = nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct(a_shape, dtype), a_names)
    out[module + ("lora_B",)] = nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct(b_shape, dtype), b_names)
  return traverse_util.unflatten_dict(out)


def init_lora(abstract: Any, spec: LoraSpec, seed: int) -> Any:
  """Host NumPy LoRA params: B = 0; A ~ N(0, (1/r)^2) (`gaussian`, peft's
  `init_lora_weights="gaussian"`: std 1/r) or U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (`kaiming`,
  peft's default: kaiming_uniform with a = sqrt(5); fan_in = in * kh * kw). Each module draws
  from its own key, fold_in(seed, crc32(path)), so the init does not depend on which other
  modules are adapted."""
  flat = traverse_util.flatten_dict(meta.unbox(abstract))
  out = {}
  for path, s in flat.items():
    if path[-1] == "lora_B":
      out[path] = np.zeros(s.shape, s.dtype)
      continue
    key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(module_key(path).encode()))
    fan_in = math.prod(s.shape[:-1])
    if spec.init == "gaussian":
      a = jax.random.normal(key, s.shape, jnp.float32) / spec.rank
    else:
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(key, s.shape, jnp.float32, -bound, bound)
    out[path] = np.asarray(a, s.dtype)
  return traverse_util.unflatten_dict(out)


def delta(lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
  """A @ B in the base kernel's layout: (in, out) for Dense, (kh, kw, in, out) for Conv."""
  if lora_a.ndim == 2:
    return lora_a @ lora_b
  return jnp.einsum("hwir,ro->hwio", lora_a, lora_b[0, 0])


def merge(base_params: Any, lora_params: Any, scale: float) -> Any:
  """base + scale * A @ B on every adapted kernel (a new tree; the inputs are not changed).

  Pure and traceable: the train step calls it on its arguments. An adapted kernel comes out in
  the promoted dtype of base and LoRA (fp32 for fp32 adapters); other leaves are the base's."""
  flat_lora = traverse_util.flatten_dict(meta.unbox(lora_params))
  modules = sorted({p[:-1] for p in flat_lora})
  flat = dict(traverse_util.flatten_dict(base_params))
  for module in modules:
    kernel = flat.get(module + ("kernel",))
    if kernel is None:
      raise ValueError(f"LoRA module {module_key(module)} has no kernel in the base params")
    d = delta(flat_lora[module + ("lora_A",)], flat_lora[module + ("lora_B",)])
    if d.shape != kernel.shape:
      raise ValueError(f"LoRA module {module_key(module)}: A @ B is {d.shape}, the base kernel "
                       f"{kernel.shape}")
    dtype = jnp.result_type(kernel, d)
    flat[module + ("kernel",)] = kernel.astype(dtype) + jnp.asarray(scale, dtype) * d.astype(dtype)
  return traverse_util.unflatten_dict(flat)


def fuse(base_params: Any, lora_params: Any, scale: float) -> Any:
  """`merge` on the host in NumPy (fp32 products, like the traced merge): the base with the
  LoRA fused, for export (no device memory for a second full copy)."""
  flat_lora = traverse_util.flatten_dict(meta.unbox(lora_params))
  flat = dict(traverse_util.flatten_dict(base_params))
  for module in sorted({p[:-1] for p in flat_lora}):
    a = np.asarray(flat_lora[module + ("lora_A",)], np.float32)
    b = np.asarray(flat_lora[module + ("lora_B",)], np.float32)
    d = a @ b if a.ndim == 2 else np.einsum("hwir,ro->hwio", a, b[0, 0])
    kernel = np.asarray(flat[module + ("kernel",)])
    dtype = np.result_type(kernel.dtype, np.float32)
    flat[module + ("kernel",)] = kernel.astype(dtype) + np.asarray(scale, dtype) * d
  return traverse_util.unflatten_dict(flat)


def apply_with_dropout(module, base_params: Any, lora_params: Any, scale: float, rate: float,
                       rng: jax.Array, *args) -> jax.Array:
  """`module.apply` with the adapters as a separate branch, peft's LoRA forward with dropout:
  y = x W + b + scale * dropout(x) A B on every adapted Dense / Conv (A a conv with the base
  kernel's size, strides and padding, B 1x1), through `nn.intercept_methods`, so the model
  definitions stay as they are. Used only when `lora.dropout > 0` (dropout on the branch's input
  has no merged form); each module draws its mask from fold_in(rng, crc32(path))."""
  import flax.linen as nn

  flat = traverse_util.flatten_dict(meta.unbox(lora_params))
  by_module = {p[:-1]: (flat[p[:-1] + ("lora_A",)], flat[p[:-1] + ("lora_B",)]) for p in flat}

  def interceptor(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    m = context.module
    if context.method_name != "__call__" or not isinstance(m, (nn.Dense, nn.Conv)):
      return out
    ab = by_module.get(tuple(m.path))
    if ab is None:
      return out
    a, b = ab
    x = call_args[0]
    key = jax.random.fold_in(rng, zlib.crc32(module_key(m.path).encode()))
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    dtype = m.dtype or x.dtype
    x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(dtype)
    if a.ndim == 2:
      h = (x @ a.astype(dtype)) @ b.astype(dtype)
    else:
      h = jax.lax.conv_general_dilated(x, a.astype(dtype), m.strides, m.padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      h = h @ b[0, 0].astype(dtype)
    return out + jnp.asarray(scale, dtype) * h.astype(out.dtype)

  with nn.intercept_methods(interceptor):
    return module.apply({"params": base_params}, *args)
