"""Merging LoRA experts (SafetyDPO's Co-Merge, our documented [I] reconstruction) and averaging.

Co-Merge's algorithm is not released (../shared/docs/methods-wave2.md 2: only a figure caption:
"which expert has the highest activation for each weight across all inputs ... merging only the
most active weights per expert"). Our reconstruction, per adapted kernel and expert k:

  dW_k = scale_k * A_k B_k                                  (in, out) or (kh, kw, in, out)
  a_k[i, j] = mean_x |dW_k[i, j] * x_i| = |dW_k[i, j]| * mean_x |x_i|
  dW[i, j] = dW_{k*}[i, j],  k* = argmax_k a_k[i, j]

with x the layer's inputs in the *base* model over calibration prompts from all categories
(`input_abs_means`, or `input_abs_means_batches` over several calibration batches: mean |x_i|
per input channel over every batch / spatial / token position; for a conv, per input channel of
its receptive field, padding ignored). The merged dW is dense
(full rank): `co_merge` returns it as deltas (`mode="dense"`) or re-factorised by truncated SVD to
a rank-r LoRA tree with scale 1 (`mode="svd"`). `average` is the plain-averaging baseline
(the mean of the experts' dW, same two output modes).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta


MODES = ("dense", "svd")


def input_abs_means(module, base_params: Any, modules: Sequence[tuple[str, ...]], *args) -> dict:
  """{module path: mean |x| per input channel} of the inputs the listed Dense / Conv modules
  see when `module` runs on `args` with `base_params` (one jitted call; `input_abs_means_batches`
  for several calibration batches)."""
  return input_abs_means_batches(module, base_params, modules, [args])


def input_abs_means_batches(module, base_params: Any, modules: Sequence[tuple[str, ...]],
                            batches) -> dict:
  """`input_abs_means` over several batches (each a tuple of `module`'s arguments), compiled
  once per batch shape: the mean over every position of every batch (batches weighted by their
  number of positions, so the result does not depend on how the inputs are batched)."""
  import flax.linen as nn

  wanted = {tuple(m) for m in modules}

  def run(params, *inputs):
    store = {}

    def interceptor(next_fun, call_args, call_kwargs, context):
      m = context.module
      if (context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.Conv))
          and tuple(m.path) in wanted):
        x = jnp.abs(call_args[0].astype(jnp.float32)).reshape(-1, call_args[0].shape[-1])
        store[tuple(m.path)] = (jnp.sum(x, axis=0), jnp.asarray(x.shape[0], jnp.float32))
      return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(interceptor):
      module.apply({"params": params}, *inputs)
    return store

  fn = jax.jit(run)
  sums: dict = {}
  for args in batches:
    for k, (s, n) in jax.device_get(fn(base_params, *args)).items():
      prev = sums.get(k)
      sums[k] = (np.asarray(s, np.float64) + (prev[0] if prev else 0.0),
                 float(n) + (prev[1] if prev else 0.0))
  if not sums:
    raise ValueError("input_abs_means: no calibration batch, or none of the modules ran")
  missing = sorted("/".join(m) for m in wanted - set(sums))
  if missing:
    raise ValueError(f"input_abs_means: modules never called by the model: {missing[:5]}")
  return {k: (s / n).astype(np.float32) for k, (s, n) in sums.items()}


def _deltas(lora: Any, scale: float) -> dict:
  flat = traverse_util.flatten_dict(meta.unbox(lora))
  out = {}
  for module in sorted({p[:-1] for p in flat}):
    a = np.asarray(flat[module + ("lora_A",)], np.float32)
    b = np.asarray(flat[module + ("lora_B",)], np.float32)
    d = a @ b if a.ndim == 2 else np.einsum("hwir,ro->hwio", a, b[0, 0])
    out[module] = np.float32(scale) * d
  return out


def _check_same_modules(deltas: list[dict]) -> None:
  first = set(deltas[0])
  for i, d in enumerate(deltas[1:], 1):
    if set(d) != first:
      raise ValueError(f"expert {i} adapts other modules than expert 0: "
                       f"{sorted(set(d) ^ first)[:5]}")


def _output(deltas: dict, mode: str, rank: int | None):
  if mode == "dense":
    return deltas
  if mode != "svd":
    raise ValueError(f"merge mode {mode!r}; supported: {MODES}")
  if not rank or rank < 1:
    raise ValueError("mode='svd' needs rank >= 1")
  return refactorise(deltas, rank)


def refactorise(deltas: dict, rank: int) -> dict:
  """A LoRA tree (scale 1) of rank `rank` whose A @ B is the best rank-`rank` approximation
  (truncated SVD) of each dense delta. Conv deltas (kh, kw, in, out) are factorised as the
  (kh*kw*in, out) matrix, so A is a (kh, kw, in, r) conv and B a 1x1 conv, as peft's. Every
  module gets exactly `rank` columns (one rank for the whole LoRA file): where `rank` exceeds
  min(rows, out) the extra columns of A and rows of B are zeros (exact, A @ B unchanged)."""
  out = {}
  for module, d in deltas.items():
    mat = d.reshape(-1, d.shape[-1]).astype(np.float64)
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    r = min(rank, s.shape[0])
    root = np.sqrt(s[:r])
    a = np.zeros((mat.shape[0], rank), np.float32)
    b = np.zeros((rank, mat.shape[1]), np.float32)
    a[:, :r] = u[:, :r] * root
    b[:r] = root[:, None] * vt[:r]
    if d.ndim == 4:
      a = a.reshape(d.shape[:3] + (rank,))
      b = b.reshape(1, 1, rank, d.shape[-1])
    out[module + ("lora_A",)] = a
    out[module + ("lora_B",)] = b
  return traverse_util.unflatten_dict(out)


def co_merge(experts: Sequence[Any], scales: Sequence[float], input_means: dict, *,
             mode: str = "dense", rank: int | None = None):
  """Co-Merge (our reconstruction, module docstring) of LoRA `experts` (trees over the same
  modules) with their scales alpha/r. `input_means`: `input_abs_means` of the base over the
  calibration prompts. Returns ({module path: merged dense delta} for mode "dense", or a rank-r
  LoRA tree with scale 1 for "svd"), and {module path: per-expert share of the entries}."""
  deltas = [_deltas(e, s) for e, s in zip(experts, scales)]
  _check_same_modules(deltas)
  merged, shares = {}, {}
  for module in deltas[0]:
    stack = np.stack([d[module] for d in deltas])  # (K, ..., in, out)
    x = np.asarray(input_means[module], np.float32)
    score = np.abs(stack) * x[:, None]  # broadcasts over (kh, kw) for convs
    pick = np.argmax(score, axis=0)
    merged[module] = np.take_along_axis(stack, pick[None], axis=0)[0]
    shares[module] = np.bincount(pick.ravel(), minlength=len(deltas)) / pick.size
  return _output(merged, mode, rank), shares


def average(experts: Sequence[Any], scales: Sequence[float], *, mode: str = "dense",
            rank: int | None = None):
  """Plain averaging: the mean of the experts' deltas (dense, or re-factorised to rank r)."""
  deltas = [_deltas(e, s) for e, s in zip(experts, scales)]
  _check_same_modules(deltas)
  mean = {m: np.mean([d[m] for d in deltas], axis=0) for m in deltas[0]}
  return _output(mean, mode, rank)


def apply_deltas(base_params: Any, deltas: dict) -> Any:
  """base + dense deltas (host NumPy): the merged model's params."""
  flat = dict(traverse_util.flatten_dict(base_params))
  for module, d in deltas.items():
    k = module + ("kernel",)
    flat[k] = np.asarray(flat[k], np.float32) + d
  return traverse_util.unflatten_dict(flat)


