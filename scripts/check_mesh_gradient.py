"""Check a mesh layout's train-step gradient against one device, with a finite difference.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python scripts/check_mesh_gradient.py --mesh 2,2,2      # ~2 min on a 2-core CPU

Runs one SGD(lr=1) step of the tiny SC-DPO config (tests/train_utils.py) from the same state and
batch on one device and on the given (data, fsdp, tensor) mesh, so the update is the gradient.
Prints both gradient norms, the forward losses, and the central finite difference of the loss
along d = g_one - g_mesh next to <g_one, d> and <g_mesh, d>: the gradient whose inner product
matches the finite difference is the right one. `--only` keeps just the activation constraints
with the given logical axes (e.g. "batch,kv_length,embed"), to find the one that matters.
This is the measurement behind the README's known 2x2x2 issue (Design choices).
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

from scdpo_jax import parallel  # noqa: E402
from scdpo_jax.models import pipeline  # noqa: E402
from scdpo_jax.train import loop, state as state_lib  # noqa: E402
from scdpo_jax.train.step import make_train_step  # noqa: E402
from tests.train_utils import build_tiny_base, tiny_train_config  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--mesh", default="2,2,2", help="data,fsdp,tensor sizes")
  ap.add_argument("--only", default=None, help="';'-separated logical-axes lists to keep")
  args = ap.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")
  if args.only is not None:
    keep = set(args.only.split(";"))
    original = parallel.constrain_activation
    parallel.constrain_activation = lambda x, axes: (
        original(x, axes) if ",".join(a or "-" for a in axes) in keep else x)

  base = build_tiny_base(Path(tempfile.mkdtemp()))
  config = tiny_train_config(**{"model.pretrained": str(base)})
  t = config.train
  sd = pipeline.load_stable_diffusion(str(base), ("unet", "text_encoder", "tokenizer", "scheduler"),
                                      dtype=jnp.float32, param_dtype=jnp.float32)
  source = loop.make_pair_source(config, sd)
  empty_states = loop.encode_prompts(sd, [""], config.model.text_layer)
  policy, reference = state_lib.make_unets(config.model, sd.unet.config)
  optimizer = optax.sgd(1.0)  # new params = params - gradient
  train_step = make_train_step(apply_fn=policy.apply, ref_apply_fn=reference.apply,
                               optimizer=optimizer, schedule=sd.schedule,
                               cfg=state_lib.step_config(t))
  local = source.batch(0, t.pairs_per_step)
  local = {k: local[k] for k in loop.PAIR_KEYS}

  runs = {}
  for name, sizes, devices in [("one device", (1, 1, 1), jax.devices()[:1]),
                               (f"mesh {args.mesh}", tuple(map(int, args.mesh.split(","))),
                                None)]:
    mesh = parallel.make_mesh(*sizes, devices=devices)
    spec = state_lib.train_state_spec(config, mesh, policy, reference, optimizer)
    state = state_lib.init_train_state(spec, optimizer, sd.unet_params, config)
    host_state = jax.device_get(state)
    ref = state_lib.reference_params(spec, sd.unet_params)
    prog = state_lib.compile_train_step(mesh, spec, train_step, local, empty_states)
    batch = parallel.global_batch_from_local(local, mesh, spec.rules)
    empty = jax.device_put(empty_states, parallel.replicated(mesh))

    def loss_at(flat_params, spec=spec, prog=prog, ref=ref, batch=batch, empty=empty,
                host_state=host_state):
      st = host_state.replace(params=traverse_util.unflatten_dict(flat_params))
      _, m = prog.fn(jax.device_put(st, spec.state_shardings), ref, batch, empty)
      return float(m["objective"])

    p0 = traverse_util.flatten_dict(host_state.params)
    new, m = prog.fn(state, ref, batch, empty)
    p1 = traverse_util.flatten_dict(jax.device_get(new.params))
    runs[name] = dict(grad={k: p0[k] - p1[k] for k in p0}, loss=float(m["objective"]),
                      grad_norm=float(m["grad_norm"]), loss_at=loss_at, p0=p0)
    print(f"{name}: loss {runs[name]['loss']:.7f}, gradient norm {runs[name]['grad_norm']:.6f}")

  (n1, one), (n2, other) = runs.items()
  d = {k: one["grad"][k] - other["grad"][k] for k in one["p0"]}
  norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in d.values()))
  if norm == 0:
    print("the two gradients are identical")
    return
  dot = lambda g: sum(float((g[k].astype(np.float64) * d[k]).sum()) for k in d)  # noqa: E731
  e = 1e-2 / norm
  p0 = one["p0"]
  fd = (one["loss_at"]({k: p0[k] + e * d[k] for k in p0}) -
        one["loss_at"]({k: p0[k] - e * d[k] for k in p0})) / (2 * e)
  print(f"|g_one - g_mesh| = {norm:.4g}; along d: finite difference {fd:.5g}, "
        f"<g_one, d> {dot(one['grad']):.5g}, <g_mesh, d> {dot(other['grad']):.5g}")


if __name__ == "__main__":
  main()
