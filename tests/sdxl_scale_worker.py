"""Per-device bytes of the SDXL-sized train state on a simulated fsdp mesh (no weights).

`python -m tests.sdxl_scale_worker UNET_CONFIG.json OUT.json` (run by tests/test_sdxl.py with
XLA_FLAGS for 8 CPU devices and the real SDXL UNet config): builds that config's policy (fp32
master weights) and frozen reference (bf16, the GPU recipe's `model.ref_param_dtype`), the AdamW
(and Adafactor) train state by `train.state.train_state_spec` (`jax.eval_shape`: nothing is
allocated) on a 1 x 8 x 1 (data, fsdp, tensor) mesh with the default sharding rules, and writes,
per optimizer, the total and the largest per-device bytes of the parameters, the optimizer
state and the reference.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _bytes(abstract, shardings) -> tuple[int, int]:
  """(total bytes, bytes on the most loaded device) of a tree of ShapeDtypeStructs."""
  import jax
  import numpy as np

  total, per_device = 0, {}
  for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    itemsize = np.dtype(leaf.dtype).itemsize
    total += math.prod(leaf.shape) * itemsize
    for device, index in sharding.devices_indices_map(tuple(leaf.shape)).items():
      n = math.prod(len(range(*s.indices(d))) for s, d in zip(index, leaf.shape))
      per_device[device.id] = per_device.get(device.id, 0) + n * itemsize
  return total, max(per_device.values())


def _transformers_adafactor_bytes(abstract_params) -> int:
  """Bytes of transformers.Adafactor's state (beta1=None) for these parameters, from PyTorch's
  rule on PyTorch layouts: a tensor of rank >= 2 keeps exp_avg_sq_row = shape[:-1] and
  exp_avg_sq_col = shape[:-2] + shape[-1:], a smaller one the full exp_avg_sq (fp32). Our Dense
  kernel (in, out) is PyTorch's (out, in), our conv kernel (kh, kw, in, out) is (out, in, kh, kw)."""
  import jax
  import numpy as np

  total = 0
  for leaf in jax.tree.leaves(abstract_params):
    shape = tuple(leaf.shape)
    torch_shape = {2: lambda s: (s[1], s[0]), 4: lambda s: (s[3], s[2], s[0], s[1])}.get(
        len(shape), lambda s: s)(shape)
    n = (math.prod(torch_shape[:-1]) + math.prod(torch_shape[:-2]) * torch_shape[-1]
         if len(shape) >= 2 else math.prod(shape))
    total += n * np.dtype(leaf.dtype).itemsize
  return total


def main(config_path: str, out_path: str) -> None:
  import jax

  from scdpo_jax import parallel
  from scdpo_jax.models.unet_config import UNetConfig
  from scdpo_jax.train import optim, state as state_lib
  from tests.train_utils import tiny_train_config

  assert jax.device_count() == 8, jax.devices()
  unet_config = UNetConfig.from_dict(json.loads(Path(config_path).read_text()))
  result = {"devices": jax.device_count()}
  for name in ("adamw", "adafactor"):
    config = tiny_train_config(**{
        "mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1, "model.dtype": "bfloat16",
        "model.ref_param_dtype": "bfloat16", "model.remat_policy": "block",
        "optimizer.name": name})
    mesh = parallel.mesh_from_config(config.mesh)
    policy, reference = state_lib.make_unets(config.model, unet_config)
    optimizer = optim.make_optimizer(config.optimizer, 2000, config.train.pairs_per_step)
    spec = state_lib.train_state_spec(config, mesh, policy, reference, optimizer)
    params = _bytes(spec.abstract_state.params, spec.state_shardings.params)
    opt = _bytes(spec.abstract_state.opt_state, spec.state_shardings.opt_state)
    ref = _bytes(spec.abstract_ref_params, spec.ref_shardings)
    result[name] = {
        "transformers_adafactor_bytes": _transformers_adafactor_bytes(
            spec.abstract_state.params),
        "num_params": sum(math.prod(x.shape) for x in jax.tree.leaves(spec.abstract_state.params)),
        "param_bytes": params[0], "param_bytes_per_device": params[1],
        "opt_bytes": opt[0], "opt_bytes_per_device": opt[1],
        "ref_bytes": ref[0], "ref_bytes_per_device": ref[1],
        "param_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(spec.abstract_state.params)}),
        "ref_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(spec.abstract_ref_params)}),
    }
  Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
