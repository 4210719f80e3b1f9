"""LoRA training end to end on the tiny one-block UNet (CPU, fp32): what the state holds, the
exports against diffusers, no gradient with respect to the base, sharded == one device, exact
resume, gradient accumulation."""

import re
from pathlib import Path

import diffusers
import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import AbstractMesh

from scdpo_jax import parallel
from scdpo_jax.lora import adapters, io as lora_io, text_encoder as lora_text, train as lora_train
from scdpo_jax.models import layers, pipeline, unet_io
from scdpo_jax.train import loop, optim, state as state_lib
from tests.test_lora import _torch_apply
from tests.test_train import _worker
from tests.train_utils import assert_same_run, tiny_train_config

# Dense and (1x1) conv adapters; peft's gaussian init with alpha != rank. Focusing on (gamma 1:
# per-pair weights, normalised over the whole batch, which gradient accumulation must respect)
# in every run of this file, so they share one compiled program where their configs agree.
LORA = {"lora.enabled": True, "lora.rank": 4, "lora.alpha": 8.0,
        "lora.targets": ("attention", "proj"), "train.gamma": 1.0}


@pytest.fixture(scope="module", autouse=True)
def tiny_base(tiny_train_base):
  global BASE
  BASE = tiny_train_base


def _config(**overrides):
  return tiny_train_config(**{"model.pretrained": BASE, **LORA, **overrides})


def _run(workdir, **overrides):
  return loop.run(_config(**overrides), Path(workdir))


def _inputs():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([999, 17], np.int32),
          rng.standard_normal((2, 7, 32)).astype(np.float32))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """3 steps of `_config()` on one device (+ the exports): also the one-batch side of the
  gradient-accumulation test and the one-device side of the sharded test."""
  workdir = tmp_path_factory.mktemp("lora_run")
  result = _run(workdir, **{"train.num_steps": 3, "train.export_at_end": True})
  return workdir, result


def test_state_and_optimizer_hold_only_the_adapters(lora_run):
  _, result = lora_run
  state = result["state"]
  flat = traverse_util.flatten_dict(jax.device_get(state.params))
  assert flat and all(p[-1] in ("lora_A", "lora_B") for p in flat)
  modules = {"/".join(p[:-1]) for p in flat}
  assert all(re.fullmatch(r".*(attn[12]/(to_q|to_k|to_v|to_out_0)|proj_in|proj_out)", m)
             for m in modules)
  lora_size = sum(v.size for v in flat.values())
  lora_shapes = {v.shape for v in flat.values()}
  opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert {tuple(x.shape) for x in opt_leaves} <= lora_shapes
  assert sum(x.size for x in opt_leaves) == 2 * lora_size  # AdamW: mu and nu, nothing else
  # trained: B moved away from 0, the losses are finite
  assert any(np.abs(v).max() > 0 for p, v in flat.items() if p[-1] == "lora_B")
  assert all(np.isfinite(result["losses"]))


def test_exports_load_in_diffusers_and_match_the_merged_model(lora_run):
  workdir, result = lora_run
  lora = jax.device_get(result["state"].params)
  base_module, base = unet_io.load_unet(Path(BASE) / "unet")
  spec = adapters.spec_from_config(_config().lora)
  inputs = _inputs()
  merged = np.asarray(jax.jit(base_module.apply)(
      {"params": adapters.merge(base, lora, spec.scale)}, *inputs))
  # the fused export is the merged model
  fused_module, fused = unet_io.load_unet(workdir / "export" / "unet")
  got = np.asarray(jax.jit(fused_module.apply)({"params": fused}, *inputs))
  np.testing.assert_allclose(got, merged, atol=1e-5, rtol=0)
  # the LoRA file round-trips, and diffusers' base + load_lora_weights == diffusers' fused UNet
  back, scale, _ = lora_io.load_lora(workdir / "export" / "lora",
                                     layers.abstract_params(base_module))
  assert scale == spec.scale == 2.0
  for (pa, a), (pb, b) in zip(sorted(traverse_util.flatten_dict(lora).items()),
                              sorted(traverse_util.flatten_dict(back).items())):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(a), b)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(BASE)
  pipe.load_lora_weights(workdir / "export" / "lora")
  with_lora = _torch_apply(pipe.unet, inputs)
  torch_fused = _torch_apply(
      diffusers.UNet2DConditionModel.from_pretrained(workdir / "export" / "unet").eval(), inputs)
  assert np.abs(with_lora - merged).max() <= 1e-4
  assert np.abs(torch_fused - merged).max() <= 1e-4


def _lowered_text(config):
  """The lowered (StableHLO) train step of `config` on one device."""
  mesh = parallel.mesh_from_config(config.mesh)
  sd = pipeline.load_stable_diffusion(BASE, ("unet", "text_encoder", "tokenizer", "scheduler"))
  policy, reference = state_lib.make_unets(config.model, sd.unet.config)
  text_policy = (lora_text.make_text_encoder(config.model, sd.text_encoder)
                 if lora_text.enabled(config) else None)
  optimizer = optim.make_optimizer(config.optimizer, config.train.num_steps,
                                   config.train.pairs_per_step)
  spec = state_lib.train_state_spec(config, mesh, policy, reference, optimizer,
                                    text_encoder=text_policy)
  step_cfg = state_lib.step_config(config.train)
  if adapters.enabled(config):
    fn = lora_train.make_lora_train_step(
        policy=policy, reference=reference, optimizer=optimizer, schedule=sd.schedule,
        cfg=step_cfg, scale=adapters.spec_from_config(config.lora).scale,
        text_encoder=text_policy)
  else:
    from scdpo_jax.train.step import make_train_step
    fn = make_train_step(apply_fn=policy.apply, ref_apply_fn=reference.apply,
                         optimizer=optimizer, schedule=sd.schedule, cfg=step_cfg)
  source = loop.random_pairs(config, sd)
  example = source.batch(0, config.train.pairs_per_step)
  example = {k: example[k] for k in loop.batch_keys(example)}
  empty = loop.empty_prompt_states(sd, config)
  lowered, _ = state_lib.lower_train_step(mesh, spec, fn, example, empty)
  convs = [p for p in traverse_util.flatten_dict(sd.unet_params) if p[-1] == "kernel"
           and np.ndim(traverse_util.flatten_dict(sd.unet_params)[p]) == 4]
  return lowered.as_text(), convs


def _weight_gradient_convolutions(text: str, rows: int) -> list[tuple[int, ...]]:
  """Result shapes of the convolutions in a lowered program that do not carry the batch (`rows`
  = 2 x pairs per micro-batch, winner and loser): the kernel gradients. Forward and
  input-gradient convolutions output activations (rows, H, W, C)."""
  out = []
  for line in text.splitlines():
    if "stablehlo.convolution" not in line:
      continue
    shape = tuple(int(d) for d in re.findall(r"-> tensor<([0-9x]+)x[a-z0-9]+>", line)[-1].split("x"))
    if rows not in shape:
      out.append(shape)
  return out


def _kernel_shaped_dots(text: str, rows: int, shapes) -> list[tuple[int, ...]]:
  """Result shapes of the rank-2 dot_generals of a lowered program that have the shape of a
  kernel in `shapes` or its transpose and do not carry the batch (`rows`): Dense kernel
  gradients (JAX's transpose of x @ W gives dW or dW^T; forward and input-gradient dots output
  activations (rows, ...))."""
  wanted = {tuple(s) for s in shapes} | {tuple(s)[::-1] for s in shapes}
  out = []
  for line in text.splitlines():
    if "stablehlo.dot_general" not in line:
      continue
    shape = tuple(int(d) for d in re.findall(r"-> tensor<([0-9x]+)x[a-z0-9]+>", line)[-1].split("x"))
    if len(shape) == 2 and rows not in shape and shape in wanted:
      out.append(shape)
  return out


def test_no_gradient_with_respect_to_the_base_in_the_lowered_step():
  """Convs: the full fine-tune's program computes a kernel gradient for every conv of the UNet;
  the LoRA step's only for the adapted convs (here proj_in / proj_out: their gradient feeds dA
  and dB), none for a frozen one. Dense kernels: the full program has one kernel-shaped
  gradient dot per Dense kernel; the LoRA program none shaped like a frozen (not adapted) Dense
  kernel (time embedding, time_emb_proj, feed-forward). An adapted kernel W' = W + s A B does get
  a transient dL/dW' (its shape stays in the program), from which dA and dB are contracted."""
  config = _config()
  rows = 2 * config.train.pairs_per_step // config.train.grad_accum
  full_text, convs = _lowered_text(tiny_train_config(**{"model.pretrained": BASE}))
  lora_text, _ = _lowered_text(config)
  _, base = unet_io.load_unet(Path(BASE) / "unet")
  dense = {p[:-1]: v.shape for p, v in traverse_util.flatten_dict(base).items()
           if p[-1] == "kernel" and v.ndim == 2}
  patterns = adapters.spec_from_config(config.lora).patterns
  adapted = {m for m in dense if any(re.fullmatch(q, "/".join(m)) for q in patterns)}
  frozen_shapes = {dense[m] for m in dense if m not in adapted} - {
      s for m in adapted for s in (dense[m], dense[m][::-1])}
  assert adapted and len(frozen_shapes) >= 4  # the check below can tell frozen from adapted
  assert len(_kernel_shaped_dots(full_text, rows, dense.values())) == len(dense)
  assert len(_kernel_shaped_dots(full_text, rows, frozen_shapes)) >= len(dense) - len(adapted)
  assert _kernel_shaped_dots(lora_text, rows, frozen_shapes) == []
  adapted_convs = [c for c in convs if c[-2] in ("proj_in", "proj_out")]
  assert adapted_convs and len(convs) > len(adapted_convs)
  n_full = len(_weight_gradient_convolutions(full_text, rows))
  n_lora = len(_weight_gradient_convolutions(lora_text, rows))
  assert n_full == len(convs), (n_full, len(convs))  # the counting works: one per kernel
  assert n_lora == len(adapted_convs), (n_lora, len(adapted_convs))
  assert full_text.count("stablehlo.convolution") - lora_text.count("stablehlo.convolution") >= (
      len(convs) - len(adapted_convs))


def test_no_gradient_with_respect_to_the_base_text_encoder_in_the_lowered_step():
  """With text-encoder LoRA on the attention projections, the step's program takes no gradient
  shaped like a frozen text-encoder kernel (the MLP's fc1 / fc2) beyond those the UNet-only
  LoRA program already has, and one transient dL/dW' per adapted projection. The control:
  adapting the MLP too adds one kernel-shaped gradient per fc1 / fc2 (the check can fail)."""
  unet_only, _ = _lowered_text(_config())
  te_attention, _ = _lowered_text(_config(**{"lora.text_encoder_targets": ("attention",)}))
  te_all, _ = _lowered_text(_config(**{"lora.text_encoder_targets": ("attention", "mlp")}))
  sd = pipeline.load_stable_diffusion(BASE, ("text_encoder", "tokenizer"))
  flat = {p[:-1]: v.shape for p, v in traverse_util.flatten_dict(sd.text_encoder_params).items()
          if p[-1] == "kernel" and v.ndim == 2 and p[-3] in ("self_attn", "mlp")}
  layers_n = sd.text_encoder.config.num_hidden_layers
  mlp = {s for m, s in flat.items() if m[-2] == "mlp"}
  attention = {s for m, s in flat.items() if m[-2] == "self_attn"}
  assert mlp and attention and not (mlp & attention) and not (
      mlp & {s[::-1] for s in attention})  # the shapes tell the two kinds apart
  rows = 2 * _config().train.pairs_per_step // _config().train.grad_accum

  def count(text, shapes):
    return len(_kernel_shaped_dots(text, rows, shapes))

  assert count(te_attention, mlp) == count(unet_only, mlp)
  assert count(te_attention, attention) >= count(unet_only, attention) + 4 * layers_n
  assert count(te_all, mlp) >= count(unet_only, mlp) + 2 * layers_n


def test_lora_parameters_shard_by_their_logical_axes():
  config = _config()
  mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
  module, _ = unet_io.load_unet(Path(BASE) / "unet")
  boxed = adapters.abstract_lora(layers.abstract_params(module),
                                 adapters.spec_from_config(config.lora))
  sh = parallel.logical_shardings(boxed, mesh, parallel.rules_from_config(config.sharding_rules))
  attn = sh["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]
  assert tuple(attn["to_q"]["lora_A"].spec) == ("fsdp", None)
  assert tuple(attn["to_q"]["lora_B"].spec) == (None, "tensor")
  assert tuple(attn["to_out_0"]["lora_A"].spec) == ("tensor", None)
  assert tuple(sh["down_blocks_0"]["attentions_0"]["proj_in"]["lora_A"].spec) == (
      None, None, "fsdp", None)


def test_resume_gives_the_same_trajectory(tmp_path):
  full = _run(tmp_path / "full", **{"train.num_steps": 4})
  first = _run(tmp_path / "split", **{"train.num_steps": 2})
  second = _run(tmp_path / "split", **{"train.num_steps": 4})
  assert second["start_step"] == 2
  assert_same_run(full, {**second, "losses": first["losses"] + second["losses"]}, atol=1e-6,
                  opt_state=True)


def test_gradient_accumulation_matches_one_big_batch(lora_run, tmp_path):
  _, one = lora_run  # 3 steps, one batch
  two = _run(tmp_path / "a2", **{"train.num_steps": 3, "train.grad_accum": 2})
  assert one["state"].params and _config().train.gamma == 1.0 and len(one["losses"]) == 3
  assert_same_run(one, two, atol=1e-5, rtol=1e-5)


def test_sharded_lora_training_matches_one_device(lora_run, tmp_path_factory):
  """8 simulated CPU devices against this process's one device (`lora_run`, the same config):
  a data 4 x tensor 2 mesh (the B factors sharded over `tensor`) and a 1 x 8 fsdp mesh (the A
  factors and the base over `fsdp`).

  Not the 2 x 2 x 2 mesh: on it the gradients of the plain UNet (no LoRA, no train step: grad of
  sum(unet(x)^2) with the base sharded by the default rules and the batch over (data, fsdp))
  already differ from one device's on XLA:CPU here, and tests/test_train.py's full-fine-tune
  mesh222 case fails the same way (3rd-step loss 0.6295 vs 0.6229)."""
  base = {"model.pretrained": BASE, **{k: list(v) if isinstance(v, tuple) else v
                                       for k, v in LORA.items()}}
  meshes = {"data4_tensor2": {"mesh.data": 4, "mesh.fsdp": 1, "mesh.tensor": 2},
            "fsdp8": {"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1}}
  tmp = tmp_path_factory.mktemp("lora_sharded")
  result = _worker({"runs": {k: {**base, **v} for k, v in meshes.items()}, "save_params": True},
                   tmp, devices=8)
  _, single = lora_run
  assert len(jax.devices()) == 1 and single["start_step"] == 0
  single_params = {"/".join(k): np.asarray(v) for k, v in
                   traverse_util.flatten_dict(jax.device_get(single["state"].params)).items()}
  assert single_params and all(k.endswith(("lora_A", "lora_B")) for k in single_params)
  for name in meshes:
    assert "error" not in result[name], result[name]
    np.testing.assert_allclose(result[name]["losses"], single["losses"], atol=1e-5)
    params = np.load(tmp / f"{name}_params.npz")
    assert sorted(params.files) == sorted(single_params)
    for key in single_params:
      np.testing.assert_allclose(params[key], single_params[key], atol=1e-5, err_msg=key)


def test_lora_config_errors_come_before_any_compile(tmp_path):
  from scdpo_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="lora.dropout"):
    _run(tmp_path, **{"lora.dropout": 1.0})
  with pytest.raises(ConfigError, match="lora.init"):
    _run(tmp_path, **{"lora.init": "zeros"})
  with pytest.raises(ConfigError, match="match no Dense / Conv kernel"):
    _run(tmp_path, **{"lora.targets": ("text_model/.*",)})
  assert not (tmp_path / "checkpoints").exists()


def test_dropout_training_runs_and_differs(lora_run, tmp_path):
  """lora.dropout 0.5 trains through the dropout branch: finite, the first loss as with dropout 0
  (B = 0: the branch is zero whatever the mask), then other losses (B's gradient saw the mask)."""
  _, plain = lora_run
  dropped = _run(tmp_path, **{"train.num_steps": 3, "lora.dropout": 0.5})
  assert all(np.isfinite(dropped["losses"]))
  np.testing.assert_allclose(dropped["losses"][0], plain["losses"][0], atol=1e-6)
  assert max(abs(a - b) for a, b in zip(dropped["losses"][1:], plain["losses"][1:])) > 1e-6
