"""Generic, torch-free conversion between PyTorch state dicts and our Flax parameter trees.

Our module names mirror the PyTorch keys (see `layers.py`), so one rule set covers every model:

* key path: `a.b.0.c` <-> `a/b_0/c` (a numeric key segment becomes a `_N` suffix of the previous
  one); a few PyTorch names end in `_<digit>` themselves (`time_embedding.linear_1`); those are
  listed in `LITERAL_SUFFIX_NAMES` and kept as they are;
* leaf: Flax `kernel` <-> PyTorch `weight` with the layout moved (Conv (kH, kW, in, out) <->
  (out, in, kH, kW); Dense (in, out) <-> (out, in)); norm `scale` -> `weight`; `embedding` ->
  `weight`; any other leaf keeps its name (raw parameters such as `class_embedding`).

The target tree is always built with `jax.eval_shape`, so loading never runs a random init, and
every mismatch (missing, unexpected or mis-shaped keys) is reported by name before anything is
materialised.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import flax
from flax.core import meta

LITERAL_SUFFIX_NAMES = frozenset({"linear_1", "linear_2"})
_NUMBERED = re.compile(r"^(.*)_(\d+)$")
_SHOW = 10  # how many offending keys an error lists


class CheckpointMismatchError(ValueError):
  """A checkpoint's keys or shapes do not match the model built from its config."""


def _flax_segments_to_torch(segments: Iterable[str]) -> list[str]:
  out = []
  for seg in segments:
    m = _NUMBERED.match(seg)
    if m and seg not in LITERAL_SUFFIX_NAMES:
      out.extend([m.group(1), m.group(2)])
    else:
      out.append(seg)
  return out


def flax_path_to_torch_key(path: tuple[str, ...], leaf_ndim: int) -> str:
  """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
  *modules, leaf = path
  torch_leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
  return ".".join(_flax_segments_to_torch(modules) + [torch_leaf])


# Kernel transposes by rank: conv Flax (H, W, in, out) <-> PyTorch (out, in, H, W); dense
# Flax (in, out) <-> PyTorch (out, in).
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0)}
_TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0)}


def _transpose_kernel(flax_leaf_name: str, value: np.ndarray, perms: dict) -> np.ndarray:
  if flax_leaf_name == "kernel" and value.ndim in perms:
    return np.transpose(value, perms[value.ndim])
  return value


def torch_layout(flax_leaf_name: str, value: np.ndarray) -> np.ndarray:
  """Flax array -> PyTorch layout."""
  return _transpose_kernel(flax_leaf_name, value, _TO_TORCH)


def flax_layout(flax_leaf_name: str, value: np.ndarray) -> np.ndarray:
  """PyTorch array -> Flax layout."""
  return _transpose_kernel(flax_leaf_name, value, _TO_FLAX)


def _leaf_shape(x: Any) -> tuple[int, ...]:
  return tuple(x.shape)


def torch_to_flax(state_dict: Mapping[str, np.ndarray], target: Any, *, source: str,
                  ignore_prefixes: Iterable[str] = (), strip_prefix: str = "",
                  dtype: Any = None) -> dict:
  """Build a Flax param tree shaped like `target` (eval_shape output, boxed or not).

  `state_dict` maps PyTorch keys to NumPy arrays. Keys starting with one of `ignore_prefixes`
  (e.g. the other tower of a full CLIP checkpoint, or non-persistent buffers) are skipped; all
  others must be used exactly once. Raises `CheckpointMismatchError` naming `source` and the first
  offending keys on any missing, unexpected or mis-shaped entry.
  """
  flat_target = flax.traverse_util.flatten_dict(meta.unbox(target))
  ignore_prefixes = tuple(ignore_prefixes)
  available = {}
  for key, value in state_dict.items():
    if strip_prefix and key.startswith(strip_prefix):
      key = key[len(strip_prefix):]
    if ignore_prefixes and key.startswith(ignore_prefixes):
      continue
    available[key] = value

  out, missing, bad_shape = {}, [], []
  used = set()
  for path, spec in flat_target.items():
    key = flax_path_to_torch_key(path, len(spec.shape))
    if key not in available:
      missing.append(key)
      continue
    used.add(key)
    value = flax_layout(path[-1], np.asarray(available[key]))
    if value.shape != _leaf_shape(spec):
      bad_shape.append(f"{key}: checkpoint {tuple(available[key].shape)} vs model "
                       f"{_torch_shape(path[-1], _leaf_shape(spec))}")
      continue
    out[path] = value.astype(dtype or spec.dtype)
  unexpected = sorted(set(available) - used)
  if missing or unexpected or bad_shape:
    parts = [f"checkpoint {source} does not match the model built from its config:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", bad_shape)):
      if items:
        shown = ", ".join(items[:_SHOW])
        more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
        parts.append(f"  {len(items)} {title}: {shown}{more}")
    raise CheckpointMismatchError("\n".join(parts))
  return flax.traverse_util.unflatten_dict(out)


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(torch_layout(leaf, np.empty(shape, dtype=np.bool_)).shape)


def flax_to_torch(params: Any, *, prefix: str = "", dtype: Any = None) -> dict[str, np.ndarray]:
  """Flatten a Flax param tree into a PyTorch-layout state dict of contiguous NumPy arrays."""
  flat = flax.traverse_util.flatten_dict(meta.unbox(params))
  out = {}
  for path, value in flat.items():
    arr = np.asarray(value)
    if dtype is not None:
      arr = arr.astype(dtype)
    key = prefix + flax_path_to_torch_key(path, arr.ndim)
    out[key] = np.ascontiguousarray(torch_layout(path[-1], arr))
  return out


def host_params(params: Any) -> Any:
  """A `params` tree as host NumPy arrays: logical boxes removed, a `{"params": ...}` wrapper
  dropped, device arrays fetched. What the savers accept."""
  params = meta.unbox(params)
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  return jax.tree.map(np.asarray, jax.device_get(params))


def check_params(params: Any, target: Any, context: str) -> None:
  """Raise `CheckpointMismatchError` (message starting with `context`) naming the first
  missing, unexpected or mis-shaped entries if `params` is not shaped like `target` (an
  `abstract_params` tree, boxed or not)."""
  want = {p: tuple(s.shape) for p, s in
          flax.traverse_util.flatten_dict(meta.unbox(target)).items()}
  got = {p: tuple(np.shape(v)) for p, v in
         flax.traverse_util.flatten_dict(meta.unbox(dict(params))).items()}
  if want != got:
    bad = sorted("/".join(p) for p in set(want) ^ set(got))
    bad += sorted(f"{'/'.join(p)}: params {got[p]} vs config {want[p]}"
                  for p in set(want) & set(got) if want[p] != got[p])
    raise CheckpointMismatchError(
        f"{context}: params do not match the config: {', '.join(bad[:_SHOW])}")
