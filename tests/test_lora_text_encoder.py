"""LoRA on the CLIP text encoder (`lora.text_encoder_targets`) against PyTorch diffusers + peft
(tiny, fp32, CPU): our files in diffusers' `load_lora_weights`, diffusers / peft files in ours,
the policy's text states in the step, and training (gradients reach the text-encoder adapters,
the base stays as it is, exact resume).

Tolerance: text states and UNet outputs, ours vs diffusers with the same LoRA loaded, <= 1e-4
(`pytest -s` prints the measured differences)."""

import hashlib
from pathlib import Path

import diffusers
import jax
import numpy as np
import peft
import pytest
import torch
from flax import traverse_util
from peft.utils import get_peft_model_state_dict

from scdpo_jax.errors import ConfigError
from scdpo_jax.lora import adapters, io as lora_io, text_encoder as lora_text
from scdpo_jax.models import clip, clip_io, layers, tokenizer, unet_io
from scdpo_jax.train import loop
from tests.test_lora import _apply, _torch_apply
from tests.torch_refs import tiny_torch_pipeline, to_numpy
from tests.train_utils import assert_same_run, tiny_train_config

TOL = 1e-4
SPEC = adapters.LoraSpec(rank=4, alpha=8.0, targets=("attention",),
                         text_encoder_targets=("attention", "mlp"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(pipeline folder, UNet (module, params), text encoder (module, params), UNet inputs, ids)."""
  root = tmp_path_factory.mktemp("te_lora_pipe")
  tiny_torch_pipeline(root / "pipe", root / "tok")
  unet = unet_io.load_unet(root / "pipe" / "unet")
  text = clip_io.load_clip_text(root / "pipe" / "text_encoder")
  rng = np.random.default_rng(0)
  tok = tokenizer.load_tokenizer(root / "pipe" / "tokenizer")
  ids = tokenizer.tokenize(tok, ["a red cube", "", "two spheres on a table"])
  inputs = (rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([999, 17], np.int32),
            rng.standard_normal((2, 7, 32)).astype(np.float32))
  return root / "pipe", unet, text, inputs, ids


def _random(abstract, seed):
  """Adapters with B != 0 (a fresh LoRA is the identity)."""
  flat = traverse_util.flatten_dict(adapters.init_lora(abstract, SPEC, seed))
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict({
      k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) if k[-1] == "lora_B" else v
      for k, v in flat.items()})


def _text_states(module, params, ids):
  return np.asarray(jax.jit(lambda p, i: module.apply(
      {"params": p}, i, method=clip.CLIPTextModel.encode_prompt_states))(params, ids))


def _torch_text_states(text_encoder, ids):
  with torch.no_grad():
    return to_numpy(text_encoder(torch.from_numpy(ids).long()).last_hidden_state)


def test_presets_name_every_layer_of_the_text_encoder(tiny):
  _, _, (text, params), _, _ = tiny
  modules = adapters.target_modules(params, SPEC.component_patterns(adapters.TEXT_ENCODER))
  n = text.config.num_hidden_layers
  assert len(modules) == 6 * n and n >= 2
  assert ("text_model", "encoder", f"layers_{n - 1}", "self_attn", "out_proj") in modules
  assert ("text_model", "encoder", "layers_0", "mlp", "fc2") in modules
  with pytest.raises(ConfigError, match="lora.text_encoder_targets"):
    adapters.abstract_lora(layers.abstract_params(text), adapters.LoraSpec(
        text_encoder_targets=("to_q",)), component=adapters.TEXT_ENCODER)
  with pytest.raises(ConfigError, match="lora.dropout"):
    adapters.LoraSpec(dropout=0.1, text_encoder_targets=("attention",)).validate()


# ------------------------------------------------------------------------------ files

def test_our_file_loads_in_diffusers_with_the_same_outputs(tiny, tmp_path):
  folder, (unet, unet_params), (text, text_params), inputs, ids = tiny
  lora = lora_text.abstract_tree(layers.abstract_params(unet), SPEC, layers.abstract_params(text))
  unet_lora = _random(lora[adapters.UNET], 0)
  text_lora = _random(lora[adapters.TEXT_ENCODER], 1)
  lora_io.save_lora(tmp_path, unet_lora, rank=SPEC.rank, alpha=SPEC.alpha,
                    text_encoder_lora=text_lora)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  pipe.load_lora_weights(tmp_path)
  # every text-encoder tensor of the file went into a LoRA layer and none is missing (diffusers
  # drops our text_model. root for transformers >= 5's CLIPTextModel)
  loaded = {k.removeprefix("text_model."): v for k, v in get_peft_model_state_dict(
      pipe.text_encoder, adapter_name="default_0").items()}
  ours = {k.removeprefix("text_model."): v
          for k, v in lora_io.to_peft_state_dict(text_lora, prefix="").items()}
  assert set(loaded) == set(ours) and len(ours) == 2 * 6 * text.config.num_hidden_layers
  for k, v in loaded.items():
    np.testing.assert_array_equal(to_numpy(v), ours[k], err_msg=k)
  assert set(get_peft_model_state_dict(pipe.unet, adapter_name="default_0")) == set(
      lora_io.to_peft_state_dict(unet_lora, prefix=""))
  assert pipe.text_encoder.encoder.layers[0].mlp.fc1.scaling["default_0"] == SPEC.scale

  got = _text_states(text, adapters.merge(text_params, text_lora, SPEC.scale), ids)
  ref = _torch_text_states(pipe.text_encoder, ids)
  assert np.abs(got - _text_states(text, text_params, ids)).max() > 0.1  # the LoRA matters
  print(f"text states: max |ours - diffusers| {np.abs(got - ref).max():.1e}")
  assert np.abs(got - ref).max() <= TOL
  got_unet = _apply(unet, adapters.merge(unet_params, unet_lora, SPEC.scale), inputs)
  assert np.abs(got_unet - _torch_apply(pipe.unet, inputs)).max() <= TOL
  # and back into our trees
  back, scale, _ = lora_io.load_lora(tmp_path, layers.abstract_params(unet),
                                     layers.abstract_params(text))
  assert scale == SPEC.scale
  for a, b in zip(jax.tree.leaves(lora_text.tree(unet_lora, text_lora)), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_diffusers_file_with_text_encoder_lora_imports(tiny, tmp_path):
  """diffusers' save_lora_weights of a peft text-encoder LoRA (transformers 5 module names,
  without the text_model. root; mixed ranks and alphas) and a UNet LoRA."""
  folder, (unet, unet_params), (text, text_params), inputs, ids = tiny
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  text_config = peft.LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"],
                                rank_pattern={"fc1": 2}, alpha_pattern={"k_proj": 8})
  unet_config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"])
  text_t = peft.inject_adapter_in_model(text_config, pipe.text_encoder)
  pipe.unet.add_adapter(unet_config)
  torch.manual_seed(3)
  with torch.no_grad():
    for model in (text_t, pipe.unet):
      for name, p in model.named_parameters():
        if "lora_B" in name:
          p.copy_(0.1 * torch.randn_like(p))
  diffusers.StableDiffusionPipeline.save_lora_weights(
      tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
      text_encoder_lora_layers=get_peft_model_state_dict(text_t),
      unet_lora_adapter_metadata=unet_config.to_dict(),
      text_encoder_lora_adapter_metadata=text_config.to_dict())
  with pytest.raises(lora_io.LoraFileError, match="text-encoder LoRA"):
    lora_io.load_lora(tmp_path, layers.abstract_params(unet))  # no text encoder given
  lora, scale, info = lora_io.load_lora(tmp_path, layers.abstract_params(unet),
                                        layers.abstract_params(text))
  assert scale == 1.0  # mixed alphas: folded into B
  assert info["modules"]["text_encoder.text_model.encoder.layers.0.mlp.fc1"]["rank"] == 2
  got = _text_states(text, adapters.merge(text_params, lora[adapters.TEXT_ENCODER], scale), ids)
  ref = _torch_text_states(text_t, ids)
  assert np.abs(got - _text_states(text, text_params, ids)).max() > 0.1
  print(f"text states: max |ours - diffusers| {np.abs(got - ref).max():.1e}")
  assert np.abs(got - ref).max() <= TOL
  got_unet = _apply(unet, adapters.merge(unet_params, lora[adapters.UNET], scale), inputs)
  assert np.abs(got_unet - _torch_apply(pipe.unet, inputs)).max() <= TOL


# ------------------------------------------------------------------------------ the step

def test_policy_text_states_follow_caption_dropout(tiny):
  """With B = 0 the policy's states are the base encoder's (what the batch precomputes); a
  dropped row gets the empty prompt's states through the adapted encoder."""
  _, _, (text, text_params), _, ids = tiny
  abstract = adapters.abstract_lora(layers.abstract_params(text), SPEC,
                                    component=adapters.TEXT_ENCODER)
  fresh = {adapters.TEXT_ENCODER: adapters.init_lora(abstract, SPEC, 0)}
  trained = {adapters.TEXT_ENCODER: _random(abstract, 1)}
  fn = jax.jit(lora_text.policy_text_fn(text, text_params, SPEC.scale, -1))
  empty = {"input_ids": ids[1:2]}
  keep = {"input_ids": ids, "drop_caption": np.zeros(3, bool)}
  np.testing.assert_allclose(np.asarray(fn(fresh, keep, empty)),
                             _text_states(text, text_params, ids), atol=1e-6, rtol=0)
  drop = {"input_ids": ids, "drop_caption": np.array([True, False, False])}
  out = np.asarray(fn(trained, drop, empty))
  merged = _text_states(text, adapters.merge(text_params, trained[adapters.TEXT_ENCODER],
                                             SPEC.scale), ids)
  np.testing.assert_allclose(out[0], merged[1], atol=1e-6, rtol=0)  # row 1 is the empty prompt
  np.testing.assert_allclose(out[2], merged[2], atol=1e-6, rtol=0)
  assert np.abs(out[0] - merged[0]).max() > 0.1


# ------------------------------------------------------------------------------ training

TRAIN = {"lora.enabled": True, "lora.rank": 4, "lora.alpha": 8.0, "lora.targets": ("attention",),
         "lora.text_encoder_targets": ("attention",), "train.caption_dropout": 0.5}


def _run(base, workdir, **overrides):
  config = tiny_train_config(**{"model.pretrained": base, **TRAIN, **overrides})
  return loop.run(config, Path(workdir))


def _digest(folder: Path) -> dict:
  return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
          if p.is_file()}


@pytest.fixture(scope="module")
def te_run(tiny_train_base, tmp_path_factory):
  """4 steps with text-encoder LoRA (+ the exports), and the base folder's file digests before."""
  before = _digest(Path(tiny_train_base))
  workdir = tmp_path_factory.mktemp("te_run")
  result = _run(tiny_train_base, workdir, **{"train.num_steps": 4, "train.export_at_end": True})
  return workdir, result, before


def test_training_moves_only_the_adapters(te_run, tiny_train_base):
  workdir, result, before = te_run
  params = jax.device_get(result["state"].params)
  assert set(params) == {"unet", "text_encoder"}
  flat = traverse_util.flatten_dict(params)
  assert all(p[-1] in ("lora_A", "lora_B") for p in flat)
  # the text-encoder B factors start at 0: they moved, so gradients came through the encoder
  text_b = [v for p, v in flat.items() if p[0] == "text_encoder" and p[-1] == "lora_B"]
  assert text_b and all(np.abs(v).max() > 0 for v in text_b)
  opt_leaves = [x for x in jax.tree.leaves(result["state"].opt_state) if np.ndim(x) > 0]
  assert sum(x.size for x in opt_leaves) == 2 * sum(v.size for v in flat.values())  # AdamW
  assert _digest(Path(tiny_train_base)) == before  # the base files are untouched
  # the fused text-encoder export is base + scale * A @ B, and the LoRA file holds both parts
  text, text_base = clip_io.load_clip_text(Path(tiny_train_base) / "text_encoder")
  _, fused = clip_io.load_clip_text(workdir / "export" / "text_encoder")
  scale = adapters.spec_from_config(tiny_train_config(**TRAIN).lora).scale
  want = adapters.fuse(text_base, params["text_encoder"], scale)
  for (pa, a), (pb, b) in zip(sorted(traverse_util.flatten_dict(fused).items()),
                              sorted(traverse_util.flatten_dict(want).items())):
    assert pa == pb
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=str(pa))
  unet, _ = unet_io.load_unet(Path(tiny_train_base) / "unet")
  back, _, _ = lora_io.load_lora(workdir / "export" / "lora", layers.abstract_params(unet),
                                 layers.abstract_params(text))
  assert set(back) == {"unet", "text_encoder"}


def test_resume_gives_the_same_trajectory(te_run, tiny_train_base, tmp_path):
  _, full, _ = te_run
  first = _run(tiny_train_base, tmp_path, **{"train.num_steps": 2})
  second = _run(tiny_train_base, tmp_path, **{"train.num_steps": 4})
  assert second["start_step"] == 2
  assert_same_run(full, {**second, "losses": first["losses"] + second["losses"]}, atol=1e-6,
                  opt_state=True)


def test_gradient_accumulation_matches_one_big_batch(te_run, tiny_train_base, tmp_path):
  """The token ids are split into micro-batches with the rest of the batch."""
  _, one, _ = te_run
  two = _run(tiny_train_base, tmp_path, **{"train.num_steps": 4, "train.grad_accum": 2})
  assert_same_run(one, two, atol=1e-5, rtol=1e-5)


def test_bad_text_encoder_configs_are_refused_before_any_compile(tiny_train_base, tmp_path):
  with pytest.raises(ConfigError, match="lora.dropout"):
    _run(tiny_train_base, tmp_path, **{"lora.dropout": 0.1})
  with pytest.raises(ConfigError, match="lora.text_encoder_targets"):
    _run(tiny_train_base, tmp_path, **{"lora.text_encoder_targets": ("to_q",)})
  assert not (tmp_path / "checkpoints").exists()
