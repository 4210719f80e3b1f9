"""Latent caching (sharded encode, resume after interruption) and the step-indexed grain loader."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data_utils import gradient_image, png
from scdpo_jax.data import cache, convert, loader, tfds_pairs
from scdpo_jax.data.images import decode_image, resize_center_crop, to_model_range
from scdpo_jax.data.memory import InMemoryPairs
from scdpo_jax.models import clip, clip_io, tokenizer, vae_io
from tests.train_utils import xla_flags

REPO = Path(__file__).resolve().parent.parent
NUM_PAIRS = 10
LEFT_RIGHT_ROWS = (3, 7)  # prompts that mention left/right: never flipped


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A tiny SD folder (VAE + text encoder + tokenizer), an image pair dataset and its cache."""
  from data_utils import tiny_sd_folder

  root = tmp_path_factory.mktemp("cache")
  sd = tiny_sd_folder(root)
  rows = []
  for i in range(NUM_PAIRS):
    (root / f"w{i}.png").write_bytes(png(gradient_image(2 * i)))
    (root / f"l{i}.png").write_bytes(png(gradient_image(2 * i + 1)))
    prompt = f"pair {i} on the left" if i in LEFT_RIGHT_ROWS else f"pair number {i}"
    rows.append((prompt, f"w{i}.png", f"l{i}.png", "harmful" if i % 2 else "clean",
                 str(0.1 * i) if i % 3 else ""))
  with open(root / "pairs.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["prompt", "image_w", "image_l", "tag", "cost_l"])
    w.writerows(rows)
  images, _ = convert.convert_csv(root / "pairs.csv", root, root / "images")
  encoder = cache.PairEncoder.from_pretrained(sd, batch_size=4)
  result = cache.cache_pairs(images, root / "latents", encoder, chunk_size=4)
  return {"root": root, "sd": sd, "images": images, "encoder": encoder, "latents": result.path,
          "result": result}


def all_records(path):
  src = tfds_pairs.open_pairs(path).source("train")
  return [src[i] for i in range(len(src))]


def test_cached_values_match_direct_encoding(env):
  result = env["result"]
  assert result.path is not None and result.num_chunks == 3 and result.chunks_computed == 3
  assert not (env["root"] / "latents" / cache.WORK_DIR).exists()
  ds = tfds_pairs.open_pairs(env["latents"])
  assert ds.schema == tfds_pairs.PairSchema(token_length=32, images=False, latent_shape=(8, 8, 4),
                                            text_states_shape=(32, 32))
  assert ds.metadata["cache"]["encoder"]["latent_mode"] == "mean"
  recs, srcs = all_records(env["latents"]), all_records(env["images"])
  module, params = vae_io.load_vae(env["sd"] / "vae")
  text_module, text_params = clip_io.load_clip_text(env["sd"] / "text_encoder")
  tok = tokenizer.load_tokenizer(env["sd"] / "tokenizer", 32)
  for i in (0, 5, 9):
    rec, src = recs[i], srcs[i]
    assert tfds_pairs.text(rec["pair_id"]) == tfds_pairs.text(src["pair_id"])
    for side in ("w", "l"):
      x = to_model_range(resize_center_crop(decode_image(src[f"image_{side}"]), 16))[None]
      mean, _ = module.apply({"params": params}, jnp.asarray(x), method="encode")
      np.testing.assert_allclose(rec[f"latents_{side}"], np.asarray(mean[0]) * 0.18215,
                                 atol=1e-5)
    ids = tokenizer.tokenize(tok, [tfds_pairs.text(src["prompt"])], 32)
    np.testing.assert_array_equal(rec["input_ids"], ids[0])
    states = text_module.apply({"params": text_params}, ids,
                               method=clip.CLIPTextModel.encode_prompt_states)
    np.testing.assert_allclose(rec["text_states"], np.asarray(states[0]), atol=1e-5)
    for k in ("is_harmful", "hflip_ok"):
      assert int(rec[k]) == int(src[k])
    np.testing.assert_equal(float(rec["cost_l"]), float(src["cost_l"]))  # NaN stays NaN


def test_cache_resumes_after_interruption(env, tmp_path):
  """Sampled latents: an interrupted + resumed run equals an uninterrupted one, and finished
  chunks are not recomputed."""
  from scdpo_jax.models import pipeline

  sd = pipeline.load_stable_diffusion(env["sd"], ("vae", "text_encoder", "tokenizer"))
  enc = cache.PairEncoder(sd.vae, sd.vae_params, sd.text_encoder, sd.text_encoder_params,
                          sd.tokenizer, latent_mode="sample", batch_size=4, seed=7,
                          source="tiny")
  first = cache.cache_pairs(env["images"], tmp_path / "a", enc, chunk_size=3, max_chunks=2)
  assert first.path is None and (first.chunks_computed, first.chunks_skipped) == (2, 0)
  with pytest.raises(ValueError, match="other settings"):
    cache.cache_pairs(env["images"], tmp_path / "a", enc, chunk_size=4)
  second = cache.cache_pairs(env["images"], tmp_path / "a", enc, chunk_size=3)
  assert second.path is not None and (second.chunks_computed, second.chunks_skipped) == (2, 2)
  whole = cache.cache_pairs(env["images"], tmp_path / "b", enc, chunk_size=3)
  again = cache.cache_pairs(env["images"], tmp_path / "b", enc, chunk_size=3)
  assert again.path == whole.path and again.chunks_computed == 0  # finished: returned as is
  resumed, uninterrupted = all_records(second.path), all_records(whole.path)
  mean = all_records(env["latents"])
  for r, u, m in zip(resumed, uninterrupted, mean):
    for k in ("latents_w", "latents_l", "text_states"):
      np.testing.assert_array_equal(r[k], u[k])
    assert not np.allclose(r["latents_w"], m["latents_w"], atol=1e-4)  # sampled, not the mean


def test_cache_command_on_two_devices_matches(env, tmp_path):
  """The CLI with 2 (forced) CPU devices: batches sharded over a 2-way mesh, same values."""
  env_vars = dict(os.environ, XLA_FLAGS=xla_flags(2),
                  JAX_PLATFORMS="cpu")
  env_vars.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
  out = subprocess.run(
      [sys.executable, "-m", "scdpo_jax.data.cache", "--input", str(env["images"]),
       "--output", str(tmp_path / "cli"), "--pretrained", str(env["sd"]), "--batch_size", "3",
       "--chunk_size", "4"], cwd=REPO, env=env_vars, capture_output=True, text=True,
      timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["chunks_computed"] == 3
  assert summary["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1} and summary["batch_size"] == 4
  for a, b in zip(all_records(summary["path"]), all_records(env["latents"])):
    for k in ("latents_w", "latents_l", "text_states"):
      np.testing.assert_allclose(a[k], b[k], atol=1e-5)


def test_loader_resume_at_any_step(env):
  full = loader.PairLoader(env["latents"], seed=3, hflip=True)
  run = [full.batch(step, 4) for step in range(9)]
  fresh = loader.PairLoader(env["latents"], seed=3, hflip=True)
  for step in (7, 2, 5):
    b = fresh.batch(step, 4)
    for k in b:
      np.testing.assert_array_equal(b[k], run[step][k])
  it = fresh.iterator(4, 4)
  for step in range(4, 9):
    b = next(it)
    for k in b:
      np.testing.assert_array_equal(b[k], run[step][k])
  other_seed = loader.PairLoader(env["latents"], seed=4, hflip=True)
  assert not np.array_equal(other_seed.indices(0, 4), full.indices(0, 4))


def test_loader_adds_token_ids_only_with_a_tokenizer(env):
  """Text-encoder LoRA needs each pair's prompt tokens (`batch.TOKEN_KEY`); subsets keep them."""
  tok = tokenizer.load_tokenizer(Path(env["sd"]) / "tokenizer")
  plain = loader.PairLoader(env["latents"], seed=3)
  with_ids = loader.PairLoader(env["latents"], seed=3, tokenizer=tok)
  assert "input_ids" not in plain.batch(1, 4)
  batch = with_ids.batch(1, 4)
  records = all_records(env["latents"])
  prompts = [tfds_pairs.text(records[i]["prompt"]) for i in with_ids.indices(1, 4)]
  assert len(set(prompts)) == 4
  np.testing.assert_array_equal(batch["input_ids"], tokenizer.tokenize(tok, prompts))
  for k, v in plain.batch(1, 4).items():
    np.testing.assert_array_equal(batch[k], v)
  sub = with_ids.subset([5, 2], "two").batch(0, 2)
  np.testing.assert_array_equal(sub["input_ids"], tokenizer.tokenize(
      tok, [tfds_pairs.text(records[i]["prompt"]) for i in with_ids.subset([5, 2]).indices(0, 2)]))


def test_two_process_split_is_disjoint_and_complete(env):
  single = loader.PairLoader(env["latents"], seed=1, hflip=True, process_index=0,
                             process_count=1)
  halves = [loader.PairLoader(env["latents"], seed=1, hflip=True, process_index=p,
                              process_count=2) for p in range(2)]
  for step in range(6):
    idx = [h.indices(step, 4) for h in halves]
    assert len(set(idx[0]) & set(idx[1])) == 0
    np.testing.assert_array_equal(np.concatenate(idx), single.indices(step, 4))
    parts = [h.batch(step, 4) for h in halves]
    whole = single.batch(step, 4)
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k])
  with pytest.raises(ValueError, match="multiple"):
    halves[0].batch(0, 3)


def test_epochs_shuffle_and_flips(env):
  ld = loader.PairLoader(env["latents"], seed=5, hflip=True)
  stored = loader.load_all(env["latents"])
  epoch0 = np.concatenate([ld.indices(s, 5) for s in (0, 1)])
  epoch1 = np.concatenate([ld.indices(s, 5) for s in (2, 3)])
  assert sorted(epoch0) == list(range(NUM_PAIRS)) == sorted(epoch1)
  assert not np.array_equal(epoch0, epoch1)
  flipped = set()
  for step in range(12):
    b, idx, flips = ld.batch(step, 5), ld.indices(step, 5), ld.flips(step, 5)
    for row, rec in enumerate(idx):
      do_flip = flips[row] and rec not in LEFT_RIGHT_ROWS
      for k in ("latents_w", "latents_l"):
        want = stored[k][rec][:, ::-1] if do_flip else stored[k][rec]
        np.testing.assert_array_equal(b[k][row], want)
      if do_flip:
        flipped.add(int(rec))
      np.testing.assert_array_equal(b["text_states"][row], stored["text_states"][rec])
  assert len(flipped) >= 4
  # unknown costs are 0 in batches (NaN in the dataset)
  assert np.all(np.isfinite(stored["cost_l"])) and stored["cost_l"][0] == 0.0


def test_step_indices_equal_memory_global_indices():
  from scdpo_jax.data.memory import global_indices
  for step, batch, num, shuffle in [(0, 4, 10, True), (2, 4, 10, True), (7, 3, 10, True),
                                    (5, 16, 7, True), (3, 4, 10, False)]:
    np.testing.assert_array_equal(loader.step_indices(step, batch, num, 11, shuffle),
                                  global_indices(step, batch, num, 11, shuffle))


def test_loader_matches_in_memory_source(env):
  mem = InMemoryPairs(loader.load_all(env["latents"]), seed=2, hflip=False)
  ld = loader.PairLoader(env["latents"], seed=2, hflip=False)
  for step in (0, 1, 6, 13):
    a, b = ld.batch(step, 4), mem.batch(step, 4)
    for k in b:
      np.testing.assert_array_equal(a[k], b[k])


def test_image_dataset_needs_latents_or_an_encoder(env):
  with pytest.raises(ValueError, match="python -m scdpo_jax.data.cache"):
    loader.PairLoader(env["images"])
  on_the_fly = loader.PairLoader(env["images"], seed=3, encoder=env["encoder"])
  cached = loader.PairLoader(env["latents"], seed=3)
  for step in (0, 3):
    a, b = on_the_fly.batch(step, 4), cached.batch(step, 4)
    for k in b:
      np.testing.assert_allclose(a[k], b[k], atol=1e-5)


def test_trainer_entry_points(env):
  cfg = ml_collections.ConfigDict(dict(name=str(env["root"] / "latents"), data_dir="",
                                       split="train", seed=0, hflip=True))
  loader.check_pair_dataset(cfg)
  src = loader.open_pair_source(cfg)
  assert src.num_pairs == NUM_PAIRS
  by_dir = ml_collections.ConfigDict(dict(name="latents", data_dir=str(env["root"]),
                                          split="train", seed=0, hflip=True))
  assert loader.resolve_dataset_path(by_dir.name, by_dir.data_dir) == Path(env["latents"])
  images_cfg = ml_collections.ConfigDict(dict(name=str(env["images"]), data_dir="",
                                              split="train", seed=0, hflip=True))
  with pytest.raises(ValueError, match="holds images, not latents"):
    loader.check_pair_dataset(images_cfg)
  bad_split = ml_collections.ConfigDict(dict(cfg.to_dict(), split="test"))
  with pytest.raises(KeyError, match="no split"):
    loader.check_pair_dataset(bad_split)
  assert jax.process_count() == 1


def test_cached_latents_refuse_another_pipeline_or_text_layer(env, tmp_path):
  from data_utils import tiny_sd_folder

  cfg = ml_collections.ConfigDict(dict(name=str(env["latents"]), data_dir="", split="train",
                                       seed=0, hflip=True))
  meta = tfds_pairs.open_pairs(env["latents"]).metadata["cache"]["encoder"]
  assert meta["vae_identity"] and meta["text_encoder_identity"] and meta["text_layer"] == -1
  loader.check_pair_dataset(cfg, model_folder=env["sd"], text_layer=-1)  # the same pipeline
  with pytest.raises(loader.CacheMismatchError, match="text_layer: cached -1, trainer .* -2"):
    loader.check_pair_dataset(cfg, model_folder=env["sd"], text_layer=-2)
  other = tiny_sd_folder(tmp_path / "other", seed=1)
  with pytest.raises(loader.CacheMismatchError, match="vae: cached with .*text_encoder: cached"):
    loader.check_pair_dataset(cfg, model_folder=other, text_layer=-1)


def test_unknown_costs_are_zero_with_a_warning_or_refused(env, caplog):
  # the fixture's CSV has no cost_w column and leaves cost_l empty for every third pair: NaN
  zero = loader.PairLoader(env["latents"], shuffle=False)
  with caplog.at_level("WARNING"):
    batch = zero.batch(0, NUM_PAIRS)
    zero.batch(1, NUM_PAIRS)
  assert np.isfinite(batch["cost_l"]).all() and (batch["cost_l"][::3] == 0).all()
  assert (batch["cost_w"] == 0).all()
  assert sum("unknown (NaN) costs" in r.getMessage() for r in caplog.records) == 1
  strict = loader.PairLoader(env["latents"], shuffle=False, nan_cost="error")
  with pytest.raises(ValueError, match="unknown \\(NaN\\) cost_[wl] and data.nan_cost='error'"):
    strict.batch(0, NUM_PAIRS)
  with pytest.raises(ValueError, match="data.nan_cost='skip'"):
    loader.PairLoader(env["latents"], nan_cost="skip")
