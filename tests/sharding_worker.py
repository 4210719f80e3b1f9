"""Lower the real train step on simulated CPU devices and report its sharding constraints.

`python -m tests.sharding_worker OUT.json [BASE]` (run by tests/test_sharding.py with XLA_FLAGS for
8 devices and the session's tiny base pipeline folder as BASE: its random init is a compile that a
process with other XLA_FLAGS cannot take from the compile cache): for each case (mesh + sharding rules), the activation constraints found in the
lowered StableHLO (`sdy.sharding_constraint`: mesh axes per dimension and the tensor shape),
the input batch shardings and the parameters the rules leave replicated.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

CASES = {
    # default rules: batch -> (data, fsdp), NHWC channels -> tensor, BTD embed -> fsdp
    "data2_tensor4": {"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 4},
    "fsdp2_tensor4": {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4},
    # rules are data: batch over data only, token positions over tensor, conv channels unsharded
    "custom_rules": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "sharding_rules": [
        ["batch", "data"], ["length", "tensor"], ["kv_length", None], ["height", None],
        ["width", None], ["embed", "fsdp"], ["heads", "tensor"], ["mlp", "tensor"],
        ["vocab", None], ["conv_in", None], ["conv_out", None], ["norm", None]]},
}

_CONSTRAINT = re.compile(r"sdy\.sharding_constraint %[\w#.]+ <@\w+, \[(.*?)\]> : tensor<([\dx]+)x\w+>")


def constraints(text: str) -> list[dict]:
  out = []
  for dims, shape in _CONSTRAINT.findall(text):
    axes = [re.findall(r'"(\w+)"', d) for d in re.findall(r"\{([^}]*)\}", dims)]
    out.append({"axes": axes, "shape": [int(s) for s in shape.split("x")]})
  return out


def main(out_path: str, base: str | None = None) -> None:
  import jax
  from scdpo_jax import parallel
  from scdpo_jax.data.batch import PAIR_KEYS
  from scdpo_jax.models import layers, pipeline
  from scdpo_jax.train import loop, optim, state as state_lib, step as step_lib
  from tests.train_utils import build_tiny_base, tiny_train_config

  assert jax.device_count() == 8, jax.devices()
  base = Path(base) if base else build_tiny_base(Path(tempfile.mkdtemp()))
  sd = pipeline.load_stable_diffusion(base, ("unet", "text_encoder", "tokenizer", "scheduler"))
  result = {}
  for name, overrides in CASES.items():
    config = tiny_train_config(**{"model.pretrained": str(base), **overrides})
    mesh = parallel.mesh_from_config(config.mesh)
    policy, reference = state_lib.make_unets(config.model, sd.unet.config)
    optimizer = optim.make_optimizer(config.optimizer, 3, config.train.pairs_per_step)
    spec = state_lib.train_state_spec(config, mesh, policy, reference, optimizer)
    example = loop.make_pair_source(config, sd).batch(0, config.train.pairs_per_step)
    train_step = step_lib.make_train_step(
        apply_fn=policy.apply, ref_apply_fn=reference.apply, optimizer=optimizer,
        schedule=sd.schedule, cfg=state_lib.step_config(config.train))
    empty = loop.encode_prompts(sd, [""], -1)
    lowered, batch_shardings = state_lib.lower_train_step(
        mesh, spec, train_step, {k: example[k] for k in PAIR_KEYS}, empty)
    result[name] = {
        "constraints": constraints(lowered.as_text()),
        "batch_specs": {k: [list(a) if isinstance(a, tuple) else a for a in s.spec]
                        for k, s in batch_shardings.items()},
        "unsharded_params": parallel.unsharded_params(
            layers.abstract_params(policy), mesh, spec.rules, min_size=1024),
    }
  Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
  main(*sys.argv[1:3])
