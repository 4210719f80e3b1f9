"""Shared building blocks of the Flax Stable Diffusion stack.

Conventions used by every model in `scdpo_jax.models`:

* Layout is channels-last everywhere: images and latents are (B, H, W, C), token sequences are
  (B, T, D). PyTorch checkpoints are NCHW; the converters in `scdpo_jax.models.convert` move the
  weights, and callers comparing with PyTorch transpose activations at the boundary.
* Module names mirror the diffusers / transformers state-dict keys, with list indices written as
  a `_N` suffix (`down_blocks.0.resnets.1.conv1` <-> `down_blocks_0/resnets_1/conv1`), so that
  the weight conversion is one generic rule set instead of a hand-written table per model.
* Dtypes, one convention for every module, loader and saver: `dtype` is the compute dtype
  (activations and matmul inputs), `param_dtype` the storage dtype of parameters; fp32 master
  weights with bf16 compute is `param_dtype=float32, dtype=bfloat16`. Every model module derives
  from `Module`, which holds the two as keyword-only fields (default float32) and hands them to
  its submodules and layers as `**self.dt`. Every loader (`load_unet`, `load_vae`,
  `load_clip_text` / `load_clip_vision`, `load_stable_diffusion`) takes both as keyword
  arguments; a saver's `param_dtype` is the dtype written to disk (default: keep).
* Parameters are the plain (unboxed) `params` collection, applied as
  `module.apply({"params": params}, ...)`. Every loader returns `(module, params)` with `params`
  as host NumPy arrays in `param_dtype` (place or shard them with `jax.device_put`); savers
  accept boxed or unboxed, host or device trees. `abstract_params(module)` is the one way to get
  the parameter tree without weights (shapes, dtypes and logical axis names, for shardings and
  as the loaders' target), `init_params(module, rng)` the one random init; both feed the
  top-level module's `dummy_inputs()` to `module.init`.
* Every parameter carries logical axis names (see `LogicalAxes`); activations at block borders
  are constrained with logical names too (`constrain`). They map to mesh axes only while a
  program is traced under `parallel.with_logical_rules` with the rules kept in the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax.core import meta

from scdpo_jax import parallel

Dtype = Any


class LogicalAxes:
  """The logical axis names used on parameters and activations."""

  BATCH = "batch"
  LENGTH = "length"  # token / spatial sequence positions
  KV_LENGTH = "kv_length"
  HEIGHT = "height"
  WIDTH = "width"
  EMBED = "embed"  # model width of attention / MLP blocks
  HEADS = "heads"  # attention projection outputs (heads x head_dim)
  MLP = "mlp"  # hidden width of feed-forward blocks
  VOCAB = "vocab"
  CONV_IN = "conv_in"
  CONV_OUT = "conv_out"
  NORM = "norm"


A = LogicalAxes

ACTIVATION_AXES_NHWC = (A.BATCH, A.HEIGHT, A.WIDTH, A.CONV_OUT)
ACTIVATION_AXES_BTD = (A.BATCH, A.LENGTH, A.EMBED)

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto")


class Module(nn.Module):
  """Base of every model module: `dtype` (compute) and `param_dtype` (storage) as keyword-only
  fields, passed on to submodules and layers as `**self.dt`."""

  dtype: Dtype = dataclasses.field(default=jnp.float32, kw_only=True)
  param_dtype: Dtype = dataclasses.field(default=jnp.float32, kw_only=True)

  @property
  def dt(self) -> dict[str, Dtype]:
    return {"dtype": self.dtype, "param_dtype": self.param_dtype}


def abstract_params(module: nn.Module) -> Any:
  """`module`'s `params` tree as `jax.ShapeDtypeStruct`s (in `param_dtype`) boxed as
  `nn.LogicallyPartitioned` with their logical axis names, via `jax.eval_shape`: nothing is
  computed or allocated. `nn.get_partition_spec` of it gives the logical specs, `meta.unbox` the
  bare shapes. `module` is a top-level model (UNet, VAE, CLIP tower): it provides
  `dummy_inputs()`."""
  return jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs())["params"]


def init_params(module: nn.Module, rng: jax.Array) -> Any:
  """A random init of `module`'s `params` (unboxed device arrays) in one jitted `module.init`."""
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), module.dummy_inputs())
  return meta.unbox(jax.jit(module.init)(rng, *zeros)["params"])


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """Logical sharding constraint on an activation.

  A real `with_sharding_constraint` while the surrounding function is traced under
  `parallel.with_logical_rules(fn, mesh, rules)` (train step, sampler, embedders, latent cache);
  a no-op otherwise (eager calls, one device).
  """
  return parallel.constrain_activation(x, tuple(axes))


def gelu_exact(x: jax.Array) -> jax.Array:
  """erf-based GELU, what PyTorch's `F.gelu` and transformers' "gelu" compute."""
  return nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's `x * sigmoid(1.702 x)`."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": gelu_exact,
    "quick_gelu": quick_gelu,
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def dense(features: int, axes: tuple[str, str], *, use_bias: bool = True, dtype: Dtype,
          param_dtype: Dtype, name: str) -> nn.Dense:
  """`nn.Dense` whose kernel (in, out) and bias (out,) carry logical axis names."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
      name=name,
  )


def conv(features: int, kernel_size: int = 3, *, stride: int = 1,
         padding: int | Sequence[tuple[int, int]] | None = None, use_bias: bool = True,
         dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Conv:
  """NHWC `nn.Conv` with PyTorch's symmetric padding (`kernel_size // 2` unless given)."""
  if padding is None:
    padding = kernel_size // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(stride, stride),
      padding=padding,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), (None, None, A.CONV_IN, A.CONV_OUT)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (A.CONV_OUT,)),
      name=name,
  )


def _norm_inits() -> dict:
  """Scale 1, bias 0, both with the logical axis `norm` (the torch defaults)."""
  return {"scale_init": nn.with_logical_partitioning(nn.initializers.ones_init(), (A.NORM,)),
          "bias_init": nn.with_logical_partitioning(nn.initializers.zeros_init(), (A.NORM,))}


def group_norm(num_groups: int, epsilon: float, *, dtype: Dtype, param_dtype: Dtype,
               name: str) -> nn.GroupNorm:
  """GroupNorm over the channel (last) axis; statistics are computed in at least fp32."""
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype,
                      param_dtype=param_dtype, name=name, **_norm_inits())


def layer_norm(epsilon: float, *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                      **_norm_inits())


def embed(num_embeddings: int, features: int, *, dtype: Dtype, param_dtype: Dtype,
          name: str) -> nn.Embed:
  return nn.Embed(
      num_embeddings,
      features,
      dtype=dtype,
      param_dtype=param_dtype,
      embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), (A.VOCAB, A.EMBED)),
      name=name,
  )


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, num_heads: int,
                          mask: jax.Array | None = None, is_causal: bool = False,
                          scale: float | None = None, implementation: str = "xla",
                          upcast: bool = False) -> jax.Array:
  """Multi-head attention on (B, T, heads*head_dim) projections via `jax.nn.dot_product_attention`.

  `implementation`: "xla" (portable), "cudnn" (fused GPU kernel; inputs must be fp16/bf16), or
  "auto" (cuDNN when the backend is a GPU and the dtype allows it, otherwise XLA). `upcast`
  computes the attention in fp32 (the `upcast_attention` option of SD 2.1). `mask` is a boolean
  array broadcastable to (B, heads, T, S), True where attention is allowed.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  batch, q_len, inner = q.shape
  head_dim = inner // num_heads
  out_dtype = q.dtype
  if upcast:
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  split = lambda t: t.reshape(t.shape[0], t.shape[1], num_heads, head_dim)
  q, k, v = split(q), split(k), split(v)
  impl = implementation
  if impl == "auto":
    impl = "cudnn" if (jax.default_backend() == "gpu"
                       and q.dtype in (jnp.bfloat16, jnp.float16)) else "xla"
  if impl == "cudnn" and mask is None:
    out = _cudnn_padded_attention(q, k, v, is_causal=is_causal, scale=scale)
  else:
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, scale=scale, implementation=impl)
  return out.reshape(batch, q_len, inner).astype(out_dtype)


CUDNN_SEQ_MULTIPLE = 64


def _cudnn_padded_attention(q, k, v, *, is_causal: bool, scale: float | None) -> jax.Array:
  """cuDNN fused attention for any sequence lengths.

  cuDNN's kernel refuses some lengths (SD's 77 text tokens for cross-attention; odd lengths in
  the backward pass). Pad queries and keys up to a multiple of 64 and tell the kernel the true
  lengths (`query_seq_lengths` / `key_value_seq_lengths`), so padded keys get no weight and
  padded query rows are dropped.
  """
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  pad_t, pad_s = (-t) % CUDNN_SEQ_MULTIPLE, (-s) % CUDNN_SEQ_MULTIPLE
  if not (pad_t or pad_s):
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                        implementation="cudnn")
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))) if n else x
  out = jax.nn.dot_product_attention(
      pad(q, pad_t), pad(k, pad_s), pad(v, pad_s), is_causal=is_causal, scale=scale,
      query_seq_lengths=jnp.full((b,), t, jnp.int32),
      key_value_seq_lengths=jnp.full((b,), s, jnp.int32), implementation="cudnn")
  return out[:, :t]
