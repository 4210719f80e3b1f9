"""CLIP text / vision towers against transformers, loaders, savers and their errors.

Tiny random transformers models (hidden 32, 2 layers, 4 heads) are built once per module, saved
with `save_pretrained` and loaded with our torch-free loaders. Their parameters are perturbed
after init so biases and LayerNorm scales are not the trivial 0 / 1 of transformers' init.

Tolerance: every comparison is fp32 on CPU (conftest sets "highest" matmul precision), so the
only differences are summation order in XLA vs. PyTorch kernels; those stay around 1e-6 for
O(1) activations, and 1e-4 max-abs leaves room for that while any layout or wiring error
(a transposed kernel, a missing bias, a wrong activation, a wrong pooled position) shows up as
an O(0.1) difference.
"""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from scdpo_jax.models import clip, clip_config, clip_io, convert, io, layers  # noqa: E402
from torch_refs import nchw_to_nhwc, to_numpy  # noqa: E402

ATOL = 1e-4
VOCAB = 1000
SEQ = 12
BATCH = 3
TEXT_KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               vocab_size=VOCAB, max_position_embeddings=77, bos_token_id=0, pad_token_id=1)
VISION_KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 image_size=32, patch_size=8, num_channels=3)

# name -> (transformers class name, config overrides)
TEXT_VARIANTS = {
    # Legacy eos_token_id=2: pooled at argmax(input_ids).
    "quick_gelu_legacy_eos": ("CLIPTextModel", dict(hidden_act="quick_gelu", eos_token_id=2)),
    # Real eos id: pooled at the first occurrence of EOS.
    "gelu": ("CLIPTextModel", dict(hidden_act="gelu", eos_token_id=5)),
    "with_projection": ("CLIPTextModelWithProjection",
                        dict(hidden_act="quick_gelu", eos_token_id=5, projection_dim=16)),
}


def _perturb(model):
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def _close(ours, ref, what):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
  err = float(np.max(np.abs(ours - ref)))
  assert err <= ATOL, f"{what}: max abs diff {err:.3g} > {ATOL}"


def _text_ids(eos_token_id: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) like a CLIP tokenizer: BOS, words, EOS, then padding (EOS-padded for legacy).

  Words are drawn so that the highest id is *not* at EOS in the non-legacy case (so argmax and
  first-EOS pooling disagree) and *is* at EOS in the legacy case (id VOCAB-1 plays EOS there).
  """
  rng = np.random.default_rng(seed)
  legacy = eos_token_id == 2
  eos = VOCAB - 1 if legacy else eos_token_id
  ids = np.full((BATCH, SEQ), eos if legacy else 1, dtype=np.int64)
  mask = np.zeros((BATCH, SEQ), dtype=np.int64)
  for b, n_words in enumerate((SEQ - 2, 4, 7)):
    ids[b, 0] = 0
    ids[b, 1:1 + n_words] = rng.integers(10, VOCAB - 1, n_words)
    ids[b, 1 + n_words] = eos
    mask[b, :2 + n_words] = 1
  return ids, mask


# ---------------------------------------------------------------------------------------------
# Fixtures: each torch model is built and saved once.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(TEXT_VARIANTS))
def text_case(request, tmp_path_factory):
  cls_name, overrides = TEXT_VARIANTS[request.param]
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(**{**TEXT_KW, **overrides})
  model = _perturb(getattr(transformers, cls_name)(cfg))
  folder = tmp_path_factory.mktemp(f"text_{request.param}")
  model.save_pretrained(folder)
  module, params = clip_io.load_clip_text(folder)
  return dict(name=request.param, model=model, folder=folder, module=module, params=params,
              eos=overrides["eos_token_id"])


@pytest.fixture(scope="module")
def vision_case(tmp_path_factory):
  torch.manual_seed(1)
  cfg = transformers.CLIPVisionConfig(**VISION_KW, projection_dim=16)
  model = _perturb(transformers.CLIPVisionModelWithProjection(cfg))
  folder = tmp_path_factory.mktemp("vision")
  model.save_pretrained(folder)
  module, params = clip_io.load_clip_vision(folder)
  return dict(model=model, folder=folder, module=module, params=params)


@pytest.fixture(scope="module")
def full_case(tmp_path_factory):
  torch.manual_seed(2)
  cfg = transformers.CLIPConfig(
      text_config={**TEXT_KW, "eos_token_id": 7, "hidden_act": "gelu"},
      vision_config=VISION_KW, projection_dim=24)
  model = _perturb(transformers.CLIPModel(cfg))
  folder = tmp_path_factory.mktemp("full")
  model.save_pretrained(folder)
  return dict(model=model, folder=folder)


@functools.lru_cache(maxsize=None)
def _jit_apply(module, output_hidden_states: bool = False):
  return jax.jit(functools.partial(module.apply, output_hidden_states=output_hidden_states))


def _run_text(module, params, ids, mask=None, hidden=True):
  m = None if mask is None else jnp.asarray(mask, jnp.int32)
  return _jit_apply(module, hidden)({"params": params}, jnp.asarray(ids, jnp.int32), m)


def _run_vision(module, params, px_nchw, hidden=True):
  return _jit_apply(module, hidden)({"params": params}, jnp.asarray(nchw_to_nhwc(px_nchw)))


def _torch_text(model, ids, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
    return model(torch.from_numpy(ids), output_hidden_states=True, **kw)


def _compare_text(ours, ref, with_projection: bool):
  _close(ours.last_hidden_state, to_numpy(ref.last_hidden_state), "last_hidden_state")
  assert len(ours.hidden_states) == len(ref.hidden_states) == TEXT_KW["num_hidden_layers"] + 1
  for i, (h, r) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
    _close(h, to_numpy(r), f"hidden_states[{i}]")
  if with_projection:
    _close(ours.text_embeds, to_numpy(ref.text_embeds), "text_embeds")
  else:
    assert ours.text_embeds is None
    _close(ours.pooler_output, to_numpy(ref.pooler_output), "pooler_output")


# ---------------------------------------------------------------------------------------------
# Text tower
# ---------------------------------------------------------------------------------------------


def test_text_matches_transformers(text_case):
  module, params, model = text_case["module"], text_case["params"], text_case["model"]
  with_projection = text_case["name"] == "with_projection"
  assert module.with_projection == with_projection
  ids, _ = _text_ids(text_case["eos"])
  ours = _run_text(module, params, ids)
  _compare_text(ours, _torch_text(model, ids), with_projection)
  if with_projection:  # pooler_output of the inner text model
    with torch.no_grad():
      ref_pool = model.text_model(torch.from_numpy(ids)).pooler_output
    _close(ours.pooler_output, to_numpy(ref_pool), "pooler_output")


def test_text_pooling_position(text_case):
  """Pooled row is the EOS row: argmax(ids) for eos_token_id == 2, else the first EOS."""
  ids, _ = _text_ids(text_case["eos"])
  out = _run_text(text_case["module"], text_case["params"], ids)
  if text_case["eos"] == 2:
    pos = ids.argmax(-1)
  else:
    pos = (ids == text_case["eos"]).argmax(-1)
    assert (pos != ids.argmax(-1)).any()  # the two rules disagree on this input
  expected = np.asarray(out.last_hidden_state)[np.arange(BATCH), pos]
  np.testing.assert_array_equal(np.asarray(out.pooler_output), expected)


def test_text_padding_mask(text_case):
  ids, mask = _text_ids(text_case["eos"], seed=1)
  assert (mask == 0).any()
  ours = _run_text(text_case["module"], text_case["params"], ids, mask)
  ref = _torch_text(text_case["model"], ids, mask)
  _compare_text(ours, ref, text_case["name"] == "with_projection")
  unmasked = _run_text(text_case["module"], text_case["params"], ids)
  # Right padding: the real tokens are unaffected; padded rows see fewer keys than without mask.
  last = np.asarray(ours.last_hidden_state)
  last_nomask = np.asarray(unmasked.last_hidden_state)
  np.testing.assert_allclose(last[mask == 1], last_nomask[mask == 1], atol=1e-5)
  assert np.abs(last[mask == 0] - last_nomask[mask == 0]).max() > 1e-3


def test_encode_prompt_states(text_case):
  module, params, model = text_case["module"], text_case["params"], text_case["model"]
  ids, _ = _text_ids(text_case["eos"])
  ref = _torch_text(model, ids)
  inner = model.text_model if hasattr(model, "text_model") else model
  with torch.no_grad():
    penultimate_ln = to_numpy(inner.final_layer_norm(ref.hidden_states[-2]))

  def states(layer, ln):
    fn = jax.jit(functools.partial(module.apply, method=clip.CLIPTextModel.encode_prompt_states,
                                   layer=layer, apply_final_layer_norm=ln))
    return fn({"params": params}, jnp.asarray(ids, jnp.int32))

  _close(states(-1, True), to_numpy(ref.last_hidden_state), "layer=-1")
  _close(states(-2, True), penultimate_ln, "layer=-2 + final LN (clip_skip=1)")
  _close(states(-2, False), to_numpy(ref.hidden_states[-2]), "layer=-2 raw")
  _close(states(0, False), to_numpy(ref.hidden_states[0]), "layer=0 (embeddings)")
  with pytest.raises(ValueError, match="layer must be in"):
    states(-4, True)


# ---------------------------------------------------------------------------------------------
# Vision tower and full CLIPModel
# ---------------------------------------------------------------------------------------------


def _pixels(seed=0):
  return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_vision_matches_transformers(vision_case):
  module, params, model = vision_case["module"], vision_case["params"], vision_case["model"]
  assert module.with_projection
  px = _pixels()
  ours = _run_vision(module, params, px.numpy())
  with torch.no_grad():
    ref = model(px, output_hidden_states=True)
    ref_pool = model.vision_model(px).pooler_output
  _close(ours.last_hidden_state, to_numpy(ref.last_hidden_state), "last_hidden_state")
  _close(ours.pooler_output, to_numpy(ref_pool), "pooler_output")
  _close(ours.image_embeds, to_numpy(ref.image_embeds), "image_embeds")
  assert len(ours.hidden_states) == len(ref.hidden_states) == VISION_KW["num_hidden_layers"] + 1
  for i, (h, r) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
    _close(h, to_numpy(r), f"hidden_states[{i}]")


def test_vision_rejects_channels_first(vision_case):
  with pytest.raises(ValueError, match="channels-last"):
    vision_case["module"].apply({"params": vision_case["params"]}, jnp.zeros((1, 3, 32, 32)))


def test_full_clip_model(full_case):
  model, folder = full_case["model"], full_case["folder"]
  text_module, text_params = clip_io.load_clip_text(folder)
  vision_module, vision_params = clip_io.load_clip_vision(folder)
  assert text_module.with_projection and vision_module.with_projection
  assert text_module.config.projection_dim == vision_module.config.projection_dim == 24
  assert text_module.config.eos_token_id == 7

  ids, mask = _text_ids(7)
  px = _pixels(1)
  ours_t = _run_text(text_module, text_params, ids, mask)
  ours_v = _run_vision(vision_module, vision_params, px.numpy())
  with torch.no_grad():
    ref_t = model.text_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             output_hidden_states=True)
    ref_v = model.vision_model(px, output_hidden_states=True)
    text_embeds = model.text_projection(ref_t.pooler_output)
    image_embeds = model.visual_projection(ref_v.pooler_output)
  _close(ours_t.last_hidden_state, to_numpy(ref_t.last_hidden_state), "text last_hidden_state")
  _close(ours_t.pooler_output, to_numpy(ref_t.pooler_output), "text pooler_output")
  _close(ours_t.hidden_states[-2], to_numpy(ref_t.hidden_states[-2]), "text hidden_states[-2]")
  _close(ours_t.text_embeds, to_numpy(text_embeds), "text_embeds")
  _close(ours_v.last_hidden_state, to_numpy(ref_v.last_hidden_state), "vision last_hidden_state")
  _close(ours_v.pooler_output, to_numpy(ref_v.pooler_output), "vision pooler_output")
  _close(ours_v.image_embeds, to_numpy(image_embeds), "image_embeds")

  # with_projection=False drops the projection of a checkpoint that has one.
  bare, bare_params = clip_io.load_clip_text(folder, with_projection=False)
  assert not bare.with_projection and "text_projection" not in bare_params


# ---------------------------------------------------------------------------------------------
# Save -> transformers round trip
# ---------------------------------------------------------------------------------------------


def test_text_roundtrip_through_transformers(text_case, tmp_path):
  module, params, model = text_case["module"], text_case["params"], text_case["model"]
  clip_io.save_clip_text(tmp_path, module.config, params)
  cfg = json.loads((tmp_path / "config.json").read_text())
  expected_arch = type(model).__name__
  assert cfg["architectures"] == [expected_arch] and cfg["model_type"] == "clip_text_model"
  reloaded = getattr(transformers, expected_arch).from_pretrained(tmp_path).eval()
  ids, mask = _text_ids(text_case["eos"])
  _compare_text(_run_text(module, params, ids, mask), _torch_text(reloaded, ids, mask),
                module.with_projection)
  # And our own loader reads what we wrote (prefixed keys) back to the same tree.
  _, again = clip_io.load_clip_text(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_vision_roundtrip_through_transformers(vision_case, tmp_path):
  module, params = vision_case["module"], vision_case["params"]
  clip_io.save_clip_vision(tmp_path, module.config, params)
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["architectures"] == ["CLIPVisionModelWithProjection"]
  assert cfg["model_type"] == "clip_vision_model"
  reloaded = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
  px = _pixels(2)
  ours = _run_vision(module, params, px.numpy())
  with torch.no_grad():
    ref = reloaded(px)
  _close(ours.last_hidden_state, to_numpy(ref.last_hidden_state), "last_hidden_state")
  _close(ours.image_embeds, to_numpy(ref.image_embeds), "image_embeds")

  # Without the projection: a plain CLIPVisionModel folder, loaded back without projection.
  bare_dir = tmp_path / "bare"
  bare_params = {k: v for k, v in params.items() if k != "visual_projection"}
  clip_io.save_clip_vision(bare_dir, module.config, bare_params)
  assert json.loads((bare_dir / "config.json").read_text())["architectures"] == ["CLIPVisionModel"]
  bare_ref = transformers.CLIPVisionModel.from_pretrained(bare_dir).eval()
  with torch.no_grad():
    _close(ours.pooler_output, to_numpy(bare_ref(px).pooler_output), "pooler_output")
  bare_module, again = clip_io.load_clip_vision(bare_dir)
  assert not bare_module.with_projection
  jax.tree.map(np.testing.assert_array_equal, again, bare_params)


def test_loaders_return_host_numpy(text_case, vision_case):
  for params in (text_case["params"], vision_case["params"]):
    leaves = jax.tree.leaves(params)
    assert leaves and all(type(x) is np.ndarray and x.dtype == np.float32 for x in leaves)


def test_legacy_position_ids_buffer_is_ignored(text_case, tmp_path):
  """Old transformers saved the non-persistent `position_ids` buffer; it must be skipped."""
  from safetensors.numpy import load_file, save_file

  shutil.copytree(text_case["folder"], tmp_path, dirs_exist_ok=True)
  state = load_file(str(tmp_path / "model.safetensors"))
  state = {(k if k.startswith("text_") else f"text_model.{k}"): v for k, v in state.items()}
  state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  _, params = clip_io.load_clip_text(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, text_case["params"])


def test_save_rejects_params_of_another_config(text_case, tmp_path):
  other = clip_config.CLIPTextConfig.from_dict({**TEXT_KW, "intermediate_size": 40})
  with pytest.raises(convert.CheckpointMismatchError, match="fc1"):
    clip_io.save_clip_text(tmp_path, other, text_case["params"])


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def test_config_from_dict_and_back():
  hf = transformers.CLIPTextConfig(**TEXT_KW, hidden_act="gelu", eos_token_id=5).to_dict()
  cfg = clip_config.CLIPTextConfig.from_dict(hf)  # unknown keys (initializer_range, ...) ignored
  assert (cfg.hidden_size, cfg.hidden_act, cfg.eos_token_id, cfg.vocab_size) == (32, "gelu", 5,
                                                                                VOCAB)
  d = cfg.to_dict()
  assert d["model_type"] == "clip_text_model"
  assert clip_config.CLIPTextConfig.from_dict(d) == cfg
  rebuilt = transformers.CLIPTextConfig(**{k: v for k, v in d.items() if k != "model_type"})
  assert rebuilt.hidden_act == "gelu" and rebuilt.intermediate_size == 37

  vis = clip_config.CLIPVisionConfig.from_dict({**VISION_KW, "image_size": [32, 32], "foo": 1})
  assert vis.image_size == 32 and vis.num_positions == 17
  assert clip_config.CLIPVisionConfig.from_dict(vis.to_dict()) == vis


@pytest.mark.parametrize("cls,key,value", [
    (clip_config.CLIPTextConfig, "hidden_act", "relu"),
    (clip_config.CLIPVisionConfig, "hidden_act", "gelu_new"),
    (clip_config.CLIPVisionConfig, "image_size", [32, 16]),
    (clip_config.CLIPTextConfig, "eos_token_id", [5, 6]),
])
def test_config_rejects_unsupported_values(cls, key, value):
  with pytest.raises(ValueError, match=key) as e:
    cls.from_dict({key: value})
  if key == "hidden_act":
    assert "quick_gelu" in str(e.value) and "'gelu'" in str(e.value)


def test_full_config_helpers():
  full = transformers.CLIPConfig(text_config=dict(TEXT_KW, eos_token_id=7),
                                 vision_config=VISION_KW, projection_dim=24).to_dict()
  assert clip_config.is_full_clip_config(full)
  text, vision = clip_config.text_config_from_hf(full), clip_config.vision_config_from_hf(full)
  assert (text.hidden_size, text.eos_token_id, text.projection_dim) == (32, 7, 24)
  assert (vision.image_size, vision.patch_size, vision.projection_dim) == (32, 8, 24)
  with pytest.raises(ValueError, match="vision config"):
    clip_config.text_config_from_hf(vision.to_dict())


# ---------------------------------------------------------------------------------------------
# Loader errors
# ---------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
  with pytest.raises(io.CheckpointNotFoundError, match="not found"):
    clip_io.load_clip_text(tmp_path / "nope")


def test_bin_only_folder_explains_conversion(text_case, tmp_path):
  shutil.copy(text_case["folder"] / "config.json", tmp_path / "config.json")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
  with pytest.raises(io.CheckpointNotFoundError) as e:
    clip_io.load_clip_text(tmp_path)
  msg = str(e.value)
  assert "pytorch_model.bin" in msg and "safetensors" in msg and "save_pretrained" in msg


def test_wrong_shape_names_the_key(vision_case, tmp_path):
  from safetensors.numpy import load_file, save_file

  shutil.copytree(vision_case["folder"], tmp_path, dirs_exist_ok=True)
  state = load_file(str(tmp_path / "model.safetensors"))
  key = "vision_model.encoder.layers.1.mlp.fc1.weight"
  state[key] = np.zeros((36, 32), np.float32)
  save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(convert.CheckpointMismatchError, match="shape mismatches") as e:
    clip_io.load_clip_vision(tmp_path)
  assert key in str(e.value)


def test_wrong_tower_is_refused(vision_case):
  with pytest.raises(ValueError, match="load_clip_vision"):
    clip_io.load_clip_text(vision_case["folder"])


def test_params_carry_logical_axes(text_case):
  boxed = layers.abstract_params(text_case["module"])
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
  assert leaves and all(hasattr(x, "names") for x in leaves)
  q = boxed["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.names == ("embed", "heads")
