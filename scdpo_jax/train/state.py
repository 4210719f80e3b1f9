"""Train-state construction and step compilation as plain functions (flax lm1b style).

    policy, reference = make_unets(config.model, unet_config)
    optimizer = optim.make_optimizer(config.optimizer, num_steps, pairs_per_step)
    spec = train_state_spec(config, mesh, policy, reference, optimizer)   # abstract, no weights
    state = init_train_state(spec, optimizer, host_params, config)       # sharded, jitted init
    step = compile_train_step(config, mesh, spec, train_step_fn, example_batch, empty_states)
    state, metrics = step.fn(state, ref_params, global_batch, empty_states)

Every function returns what it builds; nothing is valid only after another call. The abstract
parameter tree is traced once (`train_state_spec`) and reused for the shardings of the policy,
the reference and the whole state.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax.core import meta

from scdpo_jax import parallel
from scdpo_jax.errors import ConfigError
from scdpo_jax.lora import adapters as lora_adapters, text_encoder as lora_text
from scdpo_jax.models import layers, unet as unet_lib
from scdpo_jax.models.unet_config import UNetConfig
from scdpo_jax.train.checkpoint import abstract_with_shardings
from scdpo_jax.train.step import StepConfig, TrainState


PRECISIONS = ("float32", "float16", "bfloat16")


def _precision(model_config: ml_collections.ConfigDict, key: str, default: str = "") -> Any:
  name = model_config.get(key, "") or default
  if name not in PRECISIONS:
    raise ConfigError(f"model.{key}={name!r}; use one of {PRECISIONS}")
  return jnp.dtype(name)


def make_unets(model_config: ml_collections.ConfigDict, unet_config: UNetConfig):
  """(policy, reference): the same architecture; fp32 master weights for the policy, computing
  in `model.dtype`; the reference stored in `model.ref_param_dtype` and computing in
  `model.ref_dtype` ("" = `model.dtype`). Each is "float32" | "float16" | "bfloat16" (the
  Salesforce Diffusion-DPO code: fp16 reference, fp32 master with fp16 autocast; our GPU/TPU
  recipes: bf16 / bf16)."""
  compute = _precision(model_config, "dtype")
  policy = unet_lib.UNet2DConditionModel(
      unet_config, dtype=compute, param_dtype=jnp.float32,
      attention_impl=model_config.attention_impl, remat_policy=model_config.remat_policy)
  reference = unet_lib.UNet2DConditionModel(
      unet_config, dtype=_precision(model_config, "ref_dtype", model_config.dtype),
      param_dtype=_precision(model_config, "ref_param_dtype"),
      attention_impl=model_config.attention_impl)
  return policy, reference


@dataclasses.dataclass(frozen=True)
class TrainStateSpec:
  """Shapes and shardings of the train state and of the frozen reference parameters."""

  abstract_state: TrainState  # ShapeDtypeStructs, unboxed
  state_shardings: TrainState  # NamedShardings, same structure
  param_shardings: Any  # the policy params' NamedShardings (= state_shardings.params)
  abstract_ref_params: Any  # the reference params' ShapeDtypeStructs
  ref_shardings: Any
  rules: tuple

  def abstract_state_with_shardings(self) -> TrainState:
    """For Orbax restore: the abstract state carrying its target shardings."""
    return abstract_with_shardings(self.abstract_state, self.state_shardings)


def new_train_state(params, optimizer, *, lam: float, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    lam=jnp.asarray(lam, jnp.float32), skipped=jnp.zeros((), jnp.int32),
                    rng=jax.random.PRNGKey(seed))


def _with_dtype(boxed: Any, dtype) -> Any:
  """An abstract (boxed) params tree with every leaf in `dtype`, logical axes kept."""
  as_dtype = lambda s: jax.ShapeDtypeStruct(s.shape, dtype)
  return jax.tree.map(
      lambda x: x.replace_boxed(as_dtype(x.unbox())) if isinstance(x, meta.AxisMetadata)
      else as_dtype(x), boxed, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def train_state_spec(config: ml_collections.ConfigDict, mesh, policy, reference,
                     optimizer, text_encoder=None) -> TrainStateSpec:
  """Trace the state once (`jax.eval_shape`: no weights) and map its logical axes to `mesh`.

  With text-encoder LoRA (`text_encoder`: the policy's CLIP text model) the params and the
  reference are {"unet", "text_encoder"} pairs (`lora/text_encoder.py`)."""
  rules = parallel.rules_from_config(config.sharding_rules)
  boxed_base = boxed_params = layers.abstract_params(policy)
  boxed_text = None
  if lora_adapters.enabled(config):  # LoRA: the state trains only the adapters on the base
    lora_spec = lora_adapters.spec_from_config(config.lora)
    if lora_spec.adapts_text_encoder:
      boxed_text = layers.abstract_params(text_encoder)
    boxed_params = lora_text.abstract_tree(boxed_base, lora_spec, boxed_text)
  unsharded = parallel.unsharded_params(boxed_base, mesh, rules)
  if unsharded:
    logging.warning("sharding rules leave %d large parameters replicated on mesh %s (first: %s); "
                    "add rules for their logical axes if that is not intended", len(unsharded),
                    dict(mesh.shape), ", ".join(unsharded[:3]))
  boxed_state = jax.eval_shape(
      lambda p: new_train_state(p, optimizer, lam=config.train.lam, seed=config.seed),
      boxed_params)
  state_shardings = parallel.logical_shardings(boxed_state, mesh, rules)
  if reference.param_dtype == policy.param_dtype:
    boxed_ref = boxed_base
  else:
    boxed_ref = _with_dtype(boxed_base, reference.param_dtype)
  if boxed_text is not None:  # the frozen text encoder, stored as the reference UNet is
    boxed_ref = lora_text.tree(boxed_ref, _with_dtype(boxed_text, reference.param_dtype))
  return TrainStateSpec(
      abstract_state=meta.unbox(boxed_state), state_shardings=state_shardings,
      param_shardings=state_shardings.params, abstract_ref_params=meta.unbox(boxed_ref),
      ref_shardings=parallel.logical_shardings(boxed_ref, mesh, rules), rules=rules)


def host_to_global(tree: Any, shardings: Any) -> Any:
  """Place host NumPy arrays (identical on every process) as global arrays with `shardings`."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, tree, shardings)


def init_train_state(spec: TrainStateSpec, optimizer, host_params: Any,
                     config: ml_collections.ConfigDict) -> TrainState:
  """A fresh sharded state from host parameters (jitted init with `out_shardings`)."""
  init = jax.jit(lambda p: new_train_state(p, optimizer, lam=config.train.lam, seed=config.seed),
                 in_shardings=(spec.param_shardings,), out_shardings=spec.state_shardings)
  return init(host_to_global(host_params, spec.param_shardings))


def reference_params(spec: TrainStateSpec, host_params: Any) -> Any:
  """The frozen reference: the base weights cast to the reference dtype, sharded."""
  cast = jax.tree.map(lambda x, a: np.asarray(x).astype(a.dtype), host_params,
                      spec.abstract_ref_params)
  return host_to_global(cast, spec.ref_shardings)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """The AOT-compiled, state-donating step and what it was compiled for."""

  fn: Callable  # (state, ref_params, batch, empty_states) -> (state, metrics)
  batch_shardings: dict
  compile_s: float
  flops_per_device: float | None
  reused: bool = False  # the executable of an identical program compiled earlier in the process


def lower_train_step(mesh, spec: TrainStateSpec, train_step: Callable, example_batch: dict,
                     empty_states: Any):
  """(lowered program, batch shardings): the step jitted under the logical axis rules, with the
  state donated, lowered for this host-local batch layout (the global batch is `process_count`
  times `example_batch`). `empty_states`: the empty prompt's states, an array or (SDXL) a dict
  (`step.drop_captions`)."""
  batch_shardings = {k: parallel.batch_sharding(mesh, np.ndim(v), spec.rules)
                     for k, v in example_batch.items()}
  repl = parallel.replicated(mesh)
  jitted = jax.jit(parallel.with_logical_rules(train_step, mesh, spec.rules),
                   in_shardings=(spec.state_shardings, spec.ref_shardings, batch_shardings, repl),
                   out_shardings=(spec.state_shardings, repl), donate_argnums=(0,))
  global_batch = {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(),) + v.shape[1:],
                                          v.dtype, sharding=batch_shardings[k])
                  for k, v in example_batch.items()}
  ref = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                     spec.abstract_ref_params, spec.ref_shardings)
  empty = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                      sharding=repl), empty_states)
  lowered = jitted.lower(spec.abstract_state_with_shardings(), ref, global_batch, empty)
  return lowered, batch_shardings


# Programs compiled by this process, by their lowered text and devices: a run whose step lowers
# to the same program as an earlier one in the process (SafetyDPO's experts, the study's rows on
# two threads, the test suite) reuses the executable instead of compiling or loading it again
# (a load from the persistent cache deserialises the whole program: 4-10 s for a ShapeWorld
# DPO step on 2 CPU cores). Bounded: executables hold their code in memory.
_PROGRAMS: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
_PROGRAMS_LOCK = threading.Lock()
MAX_REUSED_PROGRAMS = 8


def _compiled(lowered, mesh) -> tuple[Any, bool]:
  """(executable of `lowered`, whether it was reused from earlier in this process)."""
  key = hashlib.sha256(lowered.as_text().encode()).hexdigest() + ":" + ",".join(
      str(d.id) for d in mesh.devices.flat)
  with _PROGRAMS_LOCK:
    if key in _PROGRAMS:
      _PROGRAMS.move_to_end(key)
      return _PROGRAMS[key], True
  compiled = lowered.compile()
  with _PROGRAMS_LOCK:
    _PROGRAMS[key] = compiled
    while len(_PROGRAMS) > MAX_REUSED_PROGRAMS:
      _PROGRAMS.popitem(last=False)
  return compiled, False


def compile_train_step(mesh, spec: TrainStateSpec, train_step: Callable, example_batch: dict,
                       empty_states: Any) -> CompiledStep:
  """`lower_train_step`, then AOT-compile, or reuse the executable of the same program compiled
  earlier in this process (`_compiled`; the seconds are reported as `compile_s`)."""
  t0 = time.time()
  lowered, batch_shardings = lower_train_step(mesh, spec, train_step, example_batch,
                                              empty_states)
  compiled, reused = _compiled(lowered, mesh)
  return CompiledStep(fn=compiled, batch_shardings=batch_shardings,
                      compile_s=time.time() - t0, flops_per_device=_flops(compiled),
                      reused=reused)


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # not every backend reports costs
    return None


def step_config(train_config: ml_collections.ConfigDict) -> StepConfig:
  """`StepConfig` from the `train` section: every StepConfig field is a `train.<field>` key
  (configs/default.py lists them all; a config without one gets StepConfig's default)."""
  values = {}
  for field in dataclasses.fields(StepConfig):
    default = field.default
    values[field.name] = type(default)(train_config.get(field.name, default))
  return StepConfig(**values)
