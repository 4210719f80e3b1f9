"""How much the reference/compute precision moves the DPO logit, on the tiny pipeline's UNet.

  python scripts/precision_logit.py            # ~1 min on a 2-core CPU

The tiny random UNet of configs/default.py (perturbed like tests/torch_refs so every weight
matters) is the reference; the policy is the reference plus a relative perturbation `delta`
(0: the first step of a run, where policy == reference; 1e-3: a trained-a-little policy). For
random latent pairs, timesteps, noise and text states, the train step's own `micro_batch_terms`
(beta 5000) gives the per-pair logit z under each precision setting (model.dtype, model.ref_dtype,
model.ref_param_dtype); the table reports |z - z_fp32| (max, mean) and the implicit-accuracy
disagreement with fp32. The numbers are for this tiny UNet (8x8 latents, 2 blocks), not SD1.5.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import jax
import jax.numpy as jnp

from configs.default import tiny_pipeline_config
from scdpo_jax.models import layers, schedule as sch, unet_config
from scdpo_jax.train import state as state_lib, step as step_lib

SETTINGS = {  # name: (model.dtype, model.ref_dtype, model.ref_param_dtype)
    "fp32 (CPU default)": ("float32", "", "float32"),
    "bf16 / bf16 (our GPU/TPU recipes)": ("bfloat16", "", "bfloat16"),
    "bf16 compute, fp32-stored reference": ("bfloat16", "", "float32"),
    "bf16 compute, fp16-stored reference": ("bfloat16", "", "float16"),
    "fp32 policy, bf16 reference": ("float32", "bfloat16", "bfloat16"),
    "fp16 / fp16 (Salesforce-like, no autocast)": ("float16", "", "float16"),
    "bf16 policy, fp16 reference": ("bfloat16", "float16", "float16"),
}


def logits(model_cfg, ref_params_f32, policy_params_f32, batch, empty, schedule, beta):
  unet_cfg = unet_config.UNetConfig.from_dict(tiny_pipeline_config().unet.to_dict())
  policy, reference = state_lib.make_unets(model_cfg, unet_cfg)
  ref_params = jax.tree.map(lambda x: x.astype(reference.param_dtype), ref_params_f32)
  cfg = step_lib.StepConfig(beta=beta, safety_mode="none", caption_dropout=0.0)
  fn = jax.jit(lambda p, r, b: step_lib.micro_batch_terms(
      p, r, b, 0.0, 0.0, apply_fn=policy.apply, ref_apply_fn=reference.apply, schedule=schedule,
      empty_states=empty, cfg=cfg)[1][1]["logit"])
  return np.asarray(fn(policy_params_f32, ref_params, batch), np.float64)


def main(n_pairs: int = 64, beta: float = 5000.0) -> None:
  tiny = tiny_pipeline_config()
  unet_cfg = unet_config.UNetConfig.from_dict(tiny.unet.to_dict())
  schedule = sch.schedule_from_config(tiny.scheduler.to_dict())
  base = state_lib.make_unets(ml_collections.ConfigDict(dict(
      dtype="float32", ref_param_dtype="float32", attention_impl="xla",
      remat_policy="none")), unet_cfg)[0]
  params = layers.init_params(base, jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), 2 * len(leaves))
  ref = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                  for x, k in zip(leaves, keys[:len(leaves)])])
  rng = np.random.default_rng(0)
  shape = (n_pairs, 8, 8, 4)
  batch = {"latents_w": jnp.asarray(rng.standard_normal(shape), jnp.float32),
           "latents_l": jnp.asarray(rng.standard_normal(shape), jnp.float32),
           "text_states": jnp.asarray(rng.standard_normal((n_pairs, 16, 32)), jnp.float32),
           "t": jnp.asarray(rng.integers(0, 1000, n_pairs), jnp.int32),
           "noise": jnp.asarray(rng.standard_normal(shape), jnp.float32),
           "drop_caption": jnp.zeros((n_pairs,), bool)}
  for k in ("cost_w", "cost_l", "reward_w", "reward_l"):
    batch[k] = jnp.zeros((n_pairs,), jnp.float32)
  empty = jnp.zeros((1, 16, 32), jnp.float32)
  for delta in (0.0, 1e-3):
    ref_leaves = jax.tree.leaves(ref)
    policy = jax.tree.unflatten(tree, [x * (1 + delta * jax.random.normal(k, x.shape))
                                       for x, k in zip(ref_leaves, keys[len(leaves):])])
    print(f"\npolicy = reference x (1 + {delta:g} N(0,1)), beta {beta:g}, {n_pairs} pairs")
    base_z = None
    print("| setting | mean abs z | max abs(z - z_fp32) | mean abs(z - z_fp32) | sign flips |")
    print("|---|---|---|---|---|")
    for name, (dtype, ref_dtype, ref_param) in SETTINGS.items():
      mc = ml_collections.ConfigDict(dict(dtype=dtype, ref_dtype=ref_dtype,
                                          ref_param_dtype=ref_param, attention_impl="xla",
                                          remat_policy="none"))
      try:
        z = logits(mc, ref, policy, batch, empty, schedule, beta)
      except ValueError as e:  # XLA:CPU has no fp16 x fp16 -> fp32 dot
        if jax.default_backend() != "cpu" or "F16" not in str(e):
          raise
        print(f"| {name} | not runnable on CPU ({str(e).splitlines()[0][:60]}) | | | |")
        continue
      if base_z is None:
        base_z = z
      err = np.abs(z - base_z)
      flips = int(np.sum(np.sign(z) != np.sign(base_z))) if delta > 0 else 0
      print(f"| {name} | {np.mean(np.abs(z)):.4g} | {err.max():.4g} | {err.mean():.4g} | "
            f"{flips}/{n_pairs} |")


if __name__ == "__main__":
  main()
