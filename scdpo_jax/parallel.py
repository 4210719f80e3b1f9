"""Device mesh, logical-axis sharding rules and host-local <-> global batch helpers.

The mesh has three named axes (`MESH_AXES`): `data` (pure data parallelism: replicated
parameters), `fsdp` (data parallelism with parameters and optimizer state sharded across it) and
`tensor` (model parallelism inside layers). Parameters and activations carry logical axis names
(`scdpo_jax.models.layers.LogicalAxes`); `rules` (data in the config) map each logical name to
mesh axes. A dimension that a mesh axis does not divide is left unsharded on that axis rather than
failing, so tiny test models shard on any mesh.

Activations: models call `layers.constrain(x, logical_axes)` at block borders. Those calls become
real `with_sharding_constraint`s only while a function wrapped by `with_logical_rules(fn, mesh,
rules)` is being traced; everywhere else (eager calls, tests without a mesh) they are no-ops. The
batch axis of every input batch comes from the rules' `batch` entry (`batch_axes`).

May import: jax, flax, numpy. Nothing else of scdpo_jax imports from here but models/layers.py
(for `constrain_activation`), train/, sampling/, data/, evaluation/ and cost_model/.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np
import flax.linen as nn
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scdpo_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None). Kept as data: configs override them.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("kv_length", None),
    ("height", None),
    ("width", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("norm", None),
)


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
  """Accept a sequence of (name, axes) pairs (lists from ml_collections are fine)."""
  out = []
  for name, axes in rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    for ax in (axes if isinstance(axes, tuple) else (axes,)):
      if ax is not None and ax not in MESH_AXES:
        raise ConfigError(f"sharding rule {name!r} -> {axes!r}: unknown mesh axis {ax!r}; "
                         f"mesh axes are {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


_DISTRIBUTED_INITIALIZED = False


def initialize_distributed(dist) -> None:
  """`jax.distributed.initialize` when the config asks (explicit coordinator, or auto-detection
  on pods / SLURM); once per process, before any other JAX call."""
  global _DISTRIBUTED_INITIALIZED
  if _DISTRIBUTED_INITIALIZED or dist is None:
    return
  if dist.coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=dist.coordinator_address,
                               num_processes=dist.num_processes, process_id=dist.process_id)
    _DISTRIBUTED_INITIALIZED = True
  elif dist.auto:
    jax.distributed.initialize()
    _DISTRIBUTED_INITIALIZED = True


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all (or the given) devices; one size may be -1 (= the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  n = len(devices)
  if sizes.count(-1) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} "
                     f"tensor={tensor}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n % known:
      raise ConfigError(f"mesh: {n} devices do not divide into axes of size {known} "
                       f"(data={data} fsdp={fsdp} tensor={tensor})")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ConfigError(f"mesh: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                     f"{math.prod(sizes)} devices, but {n} are available")
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # CPU / odd topologies: plain reshape is fine.
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_config) -> Mesh:
  return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor)


def batch_axes(rules=DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes of the logical `batch` axis under `rules` (the batch sharding of every input)."""
  for name, axes in rules:
    if name == "batch":
      if axes is None:
        return ()
      return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
  raise ConfigError("sharding rules have no 'batch' entry; add e.g. ('batch', ('data', 'fsdp'))")


def batch_divisor(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """How many ways a global batch is split: the product of the batch mesh axes."""
  return math.prod(mesh.shape[a] for a in batch_axes(rules))


def known_cpu_gradient_issue(mesh_shape: dict, rules, backend: str) -> str | None:
  """The warning for the layout where XLA:CPU was measured to compute a wrong train-step gradient
  (README, Design choices: the batch over two or more mesh axes of size > 1 together with a
  tensor axis of size > 1, activation constraints active), or None for any other layout or
  backend. `scripts/check_mesh_gradient.py` checks a layout against one device."""
  split = [a for a in batch_axes(rules) if mesh_shape.get(a, 1) > 1]
  if backend != "cpu" or len(split) < 2 or mesh_shape.get("tensor", 1) <= 1:
    return None
  return (f"mesh {dict(mesh_shape)} puts the batch on {' x '.join(split)} and parameters on "
          "tensor: on the CPU backend this layout was measured to compute a wrong gradient "
          "(README, Design choices, known issue); check it against one device with "
          "scripts/check_mesh_gradient.py, or map the batch to one axis")


def check_batch_fits(global_batch: int, mesh: Mesh, what: str = "batch",
                     rules=DEFAULT_RULES) -> None:
  d = batch_divisor(mesh, rules)
  axes = " x ".join(batch_axes(rules)) or "(none)"
  if global_batch % d:
    raise ConfigError(f"{what} of {global_batch} does not divide over the mesh's batch axes "
                     f"{axes} = {d} (mesh {dict(mesh.shape)}); use a multiple of {d}")
  if global_batch % jax.process_count():
    raise ConfigError(f"{what} of {global_batch} does not divide over {jax.process_count()} "
                     "processes")


def _fit_spec(spec: Sequence[Any], shape: Sequence[int], mesh: Mesh) -> P:
  """Drop mesh axes that do not divide their dimension (or that are used twice)."""
  out, used = [], set()
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    axes = axes if isinstance(axes, tuple) else (axes,)
    kept = []
    for ax in axes:
      size = mesh.shape[ax]
      if ax in used or size == 1:
        continue
      if dim % (math.prod(mesh.shape[a] for a in kept) * size) == 0:
        kept.append(ax)
    used.update(kept)
    out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*out)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`) leaves or ShapeDtypeStructs.

  Leaves without logical names are replicated.
  """
  specs = nn.get_partition_spec(boxed_tree)
  shapes = meta.unbox(boxed_tree)

  def one(spec, leaf):
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if len(spec) else P()
    return NamedSharding(mesh, _fit_spec(tuple(mesh_spec), np.shape(leaf), mesh))

  return jax.tree.map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1, rules=DEFAULT_RULES) -> NamedSharding:
  """Shard the leading (batch) axis over the mesh axes of the rules' `batch` entry."""
  axes = batch_axes(rules)
  lead = None if not axes else (axes if len(axes) > 1 else axes[0])
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def global_batch_from_local(local: dict[str, np.ndarray], mesh: Mesh,
                            rules=DEFAULT_RULES) -> dict[str, jax.Array]:
  """Assemble each process's slice of the batch into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), rules),
                                                    np.asarray(v))
          for k, v in local.items()}


# ------------------------------------------------------------------------------ activations

_ACTIVE = threading.local()  # (mesh, rules) while a with_logical_rules function is traced


@contextlib.contextmanager
def logical_rules(mesh: Mesh, rules):
  """Make `constrain_activation` map logical names to `mesh` under `rules` in this block."""
  previous = getattr(_ACTIVE, "value", None)
  _ACTIVE.value = (mesh, tuple(rules))
  try:
    with nn.logical_axis_rules(rules):
      yield
  finally:
    _ACTIVE.value = previous


def with_logical_rules(fn: Callable, mesh: Mesh, rules) -> Callable:
  """`fn` traced with the logical axis rules and mesh active (wrap before `jax.jit`)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with logical_rules(mesh, rules):
      return fn(*args, **kwargs)

  return wrapped


def activation_spec(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                    rules) -> P:
  """The PartitionSpec `rules` give an activation with these logical axes (fitted to `shape`)."""
  mesh_spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
  return _fit_spec(tuple(mesh_spec), shape, mesh)


def constrain_activation(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint from logical names; a no-op outside `logical_rules` or on 1 device."""
  active = getattr(_ACTIVE, "value", None)
  if active is None:
    return x
  mesh, rules = active
  if mesh.size == 1:
    return x
  if len(logical_axes) != x.ndim:
    raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} for an "
                     f"array of shape {x.shape}")
  spec = activation_spec(x.shape, logical_axes, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def unsharded_params(boxed_tree: Any, mesh: Mesh, rules, min_size: int = 2 ** 16) -> list[str]:
  """Paths of parameters with >= min_size elements that `rules` leave fully replicated on a
  non-trivial mesh (the trainer logs them once: a rule may be missing)."""
  if mesh.size == 1:
    return []
  shardings = logical_shardings(boxed_tree, mesh, rules)
  shapes = meta.unbox(boxed_tree)
  out = []
  for (path, sharding), leaf in zip(jax.tree_util.tree_leaves_with_path(shardings),
                                    jax.tree.leaves(shapes)):
    if math.prod(np.shape(leaf)) >= min_size and all(a is None for a in sharding.spec):
      out.append(jax.tree_util.keystr(path, simple=True, separator="/"))
  return out


def process_slice(global_batch: int) -> slice:
  """The rows of a global batch that this process reads."""
  per = global_batch // jax.process_count()
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)
