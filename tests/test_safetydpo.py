"""The safetydpo job (scdpo_jax/lora/safetydpo.py) on the tiny pipeline: one LoRA expert per
category trained on that category's pairs only, resumable per expert; Co-Merge against a NumPy
per-entry argmax of mean |dW x| over the layers' raw calibration inputs; the SVD export against
NumPy's truncated SVD; averaging; the merged LoRA file in diffusers (<= 1e-4, fp32); the
all_single baseline; the tfds path (category field, a chosen subset of categories, dense merge).
2 steps of 4 pairs per expert, 2 categories."""

import shutil
from pathlib import Path

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from peft.utils import get_peft_model_state_dict

from scdpo_jax.data import memory, tfds_pairs
from scdpo_jax.data import loader as tfds_loader
from scdpo_jax.errors import ConfigError
from scdpo_jax.lora import adapters, io as lora_io, merge as merge_lib, safetydpo
from scdpo_jax.models import layers, pipeline, unet_io
from scdpo_jax.train import loop
from tests.test_lora import _torch_apply
from tests.train_utils import apply_overrides

CATS = ("Hate", "sexual")


@pytest.fixture(scope="module", autouse=True)
def tiny_base(tiny_train_base):
  global BASE
  BASE = tiny_train_base


def _config(**overrides):
  from configs import safetydpo_tiny

  config = safetydpo_tiny.get_config()
  e = config.expert
  e.model.pretrained = BASE
  e.train.update(dict(num_steps=2, pairs_per_step=4, grad_accum=1))
  e.data.num_pairs = 16
  e.checkpoint.update(dict(every_steps=10, async_save=False))
  e.log.update(dict(every_steps=1, tensorboard=False))
  config.safetydpo.categories = CATS
  apply_overrides(config, overrides)
  return config


class _Spy:
  """Records every batch a pair source hands out, with the source's subset label."""

  def __init__(self, monkeypatch, cls):
    self.seen: dict[str, list] = {}
    original = cls.batch

    def batch(src, step, global_batch):
      out = original(src, step, global_batch)
      self.seen.setdefault(src.identity().get("subset", ""), []).append(out)
      return out

    monkeypatch.setattr(cls, batch.__name__, batch)


def _rows(latents, seen):
  """Record index of every seen winner latent (a row may be h-flipped)."""
  out = []
  for b in seen:
    for row in b["latents_w"]:
      hit = [i for i, x in enumerate(latents) if np.array_equal(x, row)
             or np.array_equal(x[:, ::-1], row)]
      assert len(hit) == 1
      out.append(hit[0])
  return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sdpo_job")
  config = _config()
  with pytest.MonkeyPatch.context() as mp:
    spy = _Spy(mp, memory.InMemoryPairs)
    result = safetydpo.run(config, workdir)
  return workdir, config, result, spy.seen


def test_one_expert_per_category_on_its_pairs_only(job):
  workdir, config, result, seen = job
  cfg = safetydpo.expert_config(config, Path(BASE))
  sd = pipeline.load_stable_diffusion(BASE, ("unet", "text_encoder", "tokenizer"))
  latents = loop.random_pairs(cfg, sd).arrays["latents_w"]  # the trainer's own random pairs
  assert [e["category"] for e in result["experts"]] == list(CATS)
  assert result["categories"] == {"Hate": 8, "sexual": 8}
  for k, c in enumerate(CATS):
    rows = _rows(latents, seen[c])
    assert {i % 2 for i in rows} == {k}  # pair i is in category CATS[i % 2]: only its own
    assert set(rows) == set(range(k, 16, 2))  # 2 steps x 4 = one epoch of its 8 pairs
    assert (workdir / "experts" / f"{k}_{c}" / "checkpoints").is_dir()
    assert (workdir / "experts" / f"{k}_{c}" / "export" / "lora").is_dir()
  a, b = result["experts_params"]
  assert max(np.abs(x - y).max() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) > 0


def _raw_inputs(unet, params, modules, batches):
  """Every position's input of each module (no statistics), concatenated over batches."""
  wanted = set(modules)

  def run(p, *args):
    store = {}

    def interceptor(next_fun, a, kw, ctx):
      if ctx.method_name == "__call__" and tuple(ctx.module.path) in wanted:
        store[tuple(ctx.module.path)] = a[0].reshape(-1, a[0].shape[-1])
      return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
      unet.apply({"params": p}, *args)
    return store

  fn = jax.jit(run)
  outs = [jax.device_get(fn(params, *b)) for b in batches]
  return {m: np.concatenate([np.asarray(o[m], np.float64) for o in outs]) for m in modules}


@pytest.fixture(scope="module")
def merge_inputs(job):
  workdir, config, result, _ = job
  cfg = safetydpo.expert_config(config, Path(BASE))
  source, cats = safetydpo.pair_data(cfg, CATS, workdir)
  sd = pipeline.load_stable_diffusion(BASE, ("scheduler",))
  batches, info = safetydpo.calibration_batches(source, cats, CATS, sd.schedule, config.merge)
  unet, base = unet_io.load_unet(Path(BASE) / "unet")
  trees = result["experts_params"]
  modules = sorted({p[:-1] for p in traverse_util.flatten_dict(trees[0])})
  raw = _raw_inputs(unet, base, modules, batches)
  spec = adapters.spec_from_config(config.expert.lora)
  flats = [traverse_util.flatten_dict(t) for t in trees]
  deltas = [{m: spec.scale * (np.asarray(f[m + ("lora_A",)], np.float64)
                              @ np.asarray(f[m + ("lora_B",)], np.float64)) for m in modules}
            for f in flats]
  return dict(unet=unet, base=base, trees=trees, modules=modules, raw=raw, batches=batches,
              info=info, spec=spec, deltas=deltas)


def _numpy_co_merge(deltas, raw):
  """Per entry (i, j): the expert k with the largest mean over positions p of |dW_k[i, j] x_pi|."""
  out = {}
  for m, x in raw.items():
    score = np.stack([np.mean(np.abs(d[m][None] * x[:, :, None]), axis=0) for d in deltas])
    pick = np.argmax(score, axis=0)
    out[m] = np.choose(pick, [d[m] for d in deltas])
  return out


def test_co_merge_selection_matches_numpy(job, merge_inputs):
  _, config, _, _ = job
  mi = merge_inputs
  assert mi["info"]["pairs_per_category"] == {"Hate": 4, "sexual": 4}
  assert mi["info"]["rows"] == 16 and len(mi["batches"]) == 2  # winner + loser, 8 per batch
  means = merge_lib.input_abs_means_batches(mi["unet"], mi["base"], mi["modules"], mi["batches"])
  for m in mi["modules"]:
    np.testing.assert_allclose(means[m], np.abs(mi["raw"][m]).mean(0), rtol=1e-5, atol=1e-7)
  dense_cfg = config.merge.copy_and_resolve_references()
  dense_cfg.output = "dense"
  dense, report = safetydpo.merge_experts(mi["trees"], mi["spec"], means, dense_cfg)
  want = _numpy_co_merge(mi["deltas"], mi["raw"])
  picked_second = 0.0
  for m in mi["modules"]:
    np.testing.assert_allclose(dense[m], want[m], rtol=1e-5, atol=1e-8, err_msg=str(m))
    picked_second += np.mean(want[m] == mi["deltas"][1][m]) / len(mi["modules"])
  assert 0.2 < picked_second < 0.8  # both experts contribute
  np.testing.assert_allclose(report["expert_share_of_entries"][1], picked_second, atol=0.05)


def test_svd_export_is_the_truncated_svd_of_the_merge(job, merge_inputs):
  workdir, _, result, _ = job
  mi = merge_inputs
  want = _numpy_co_merge(mi["deltas"], mi["raw"])
  lora, scale, info = lora_io.load_lora(workdir / "export" / "lora",
                                        layers.abstract_params(mi["unet"]))
  rank = 2 * 4  # merge.rank 0: experts x expert rank
  assert scale == 1.0 and result["merge"]["rank"] == rank
  assert {v["rank"] for v in info["modules"].values()} == {rank}
  flat = traverse_util.flatten_dict(lora)
  num = den = 0.0
  for m in mi["modules"]:
    u, s, vt = np.linalg.svd(want[m], full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    got = flat[m + ("lora_A",)] @ flat[m + ("lora_B",)]
    np.testing.assert_allclose(got, best, atol=1e-5, err_msg=str(m))
    assert s[rank] > 1e-3 * s[0]  # the truncation is not trivially exact
    num, den = num + np.sum((best - want[m]) ** 2), den + np.sum(want[m] ** 2)
  np.testing.assert_allclose(result["merge"]["svd_relative_error"], np.sqrt(num / den),
                             rtol=1e-3)


def test_average_and_its_exact_rank(job, merge_inputs):
  _, config, _, _ = job
  mi = merge_inputs
  m_cfg = config.merge.copy_and_resolve_references()
  m_cfg.update(dict(method="average", output="dense"))
  dense, _ = safetydpo.merge_experts(mi["trees"], mi["spec"], {}, m_cfg)
  for m in mi["modules"]:
    np.testing.assert_allclose(dense[m], 0.5 * (mi["deltas"][0][m] + mi["deltas"][1][m]),
                               rtol=1e-5, atol=1e-8)
  m_cfg.output = "svd"  # rank 2 x 4 holds the average of two rank-4 deltas exactly
  tree, report = safetydpo.merge_experts(mi["trees"], mi["spec"], {}, m_cfg)
  assert report["svd_relative_error"] < 1e-5
  back = merge_lib._deltas(tree, 1.0)
  for m in mi["modules"]:
    np.testing.assert_allclose(back[m], dense[m], atol=1e-6)


def test_merged_export_loads_in_diffusers(job, merge_inputs):
  workdir, _, _, _ = job
  mi = merge_inputs
  rng = np.random.default_rng(0)
  inputs = (rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([999, 17], np.int32),
            rng.standard_normal((2, 32, 32)).astype(np.float32))
  lora, _, _ = lora_io.load_lora(workdir / "export" / "lora", layers.abstract_params(mi["unet"]))
  ours = np.asarray(jax.jit(mi["unet"].apply)(
      {"params": adapters.merge(mi["base"], lora, 1.0)}, *inputs))
  base_out = np.asarray(jax.jit(mi["unet"].apply)({"params": mi["base"]}, *inputs))
  assert np.abs(ours - base_out).max() > 1e-3  # the merge changes the model
  fused_module, fused = unet_io.load_unet(workdir / "export" / "unet")
  np.testing.assert_allclose(np.asarray(jax.jit(fused_module.apply)({"params": fused}, *inputs)),
                             ours, atol=1e-5, rtol=0)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(BASE)
  pipe.load_lora_weights(workdir / "export" / "lora")
  loaded = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
  assert set(loaded) == set(lora_io.to_peft_state_dict(lora, prefix=""))  # none missing / extra
  torch_lora = _torch_apply(pipe.unet, inputs)
  torch_fused = _torch_apply(
      diffusers.UNet2DConditionModel.from_pretrained(workdir / "export" / "unet").eval(), inputs)
  print(f"max |ours - diffusers + LoRA| {np.abs(torch_lora - ours).max():.1e}, "
        f"fused {np.abs(torch_fused - ours).max():.1e}")
  assert np.abs(torch_lora - ours).max() <= 1e-4
  assert np.abs(torch_fused - ours).max() <= 1e-4


def test_rerun_skips_finished_experts(job, tmp_path):
  workdir, config, first, _ = job
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "experts" / "1_sexual")  # as if stopped before expert 1
  ckpt0 = sorted((copy / "experts" / "0_Hate" / "checkpoints").rglob("*"))
  stamps = {p: p.stat().st_mtime_ns for p in ckpt0 if p.is_file()}
  again = safetydpo.run(config, copy)
  e0, e1 = again["experts"]
  assert e0["already_finished"] and e0["end_step"] == 2  # its stored train_result
  assert not e1["already_finished"] and (e1["start_step"], e1["end_step"]) == (0, 2)
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # expert 0 untouched
  for a, b in zip(jax.tree.leaves(first["experts_params"]),
                  jax.tree.leaves(again["experts_params"])):
    np.testing.assert_allclose(a, b, atol=1e-6)  # expert 1 retrained to the same weights


def _latent_dataset(root, n=12):
  """A latent pair dataset with categories Hate / sexual / Violence / "" cycled over its pairs."""
  rng = np.random.default_rng(1)
  cats = ["Hate", "sexual", "Violence", ""]
  examples = [{"pair_id": f"p{i}", "prompt": f"prompt {i}", "category": cats[i % 4],
               "is_harmful": int(cats[i % 4] != ""),
               "latents_w": rng.standard_normal((8, 8, 4)).astype(np.float32),
               "latents_l": rng.standard_normal((8, 8, 4)).astype(np.float32),
               "text_states": rng.standard_normal((32, 32)).astype(np.float32)}
              for i in range(n)]
  schema = tfds_pairs.PairSchema(images=False, latent_shape=(8, 8, 4),
                                 text_states_shape=(32, 32))
  return tfds_pairs.write_pairs(root, {"train": examples}, schema), examples


def test_pair_loader_subsets_and_categories(tmp_path):
  path, examples = _latent_dataset(tmp_path / "data")
  full = tfds_loader.PairLoader(path, seed=3)
  assert list(full.record_categories()) == [e["category"] for e in examples]
  sub = full.subset([1, 5, 9], label="sexual")
  assert sub.num_pairs == 3 and set(sub.record_categories()) == {"sexual"}
  assert sub.identity()["subset"] == "sexual" and sub.identity() != full.identity()
  seen = {i for s in range(3) for i in sub.indices(s, 2)}
  assert seen == {1, 5, 9}  # dataset record ids, only of the subset
  rows = sub.records_batch([2, 0])
  np.testing.assert_array_equal(rows["latents_w"][0], examples[9]["latents_w"])
  np.testing.assert_array_equal(rows["latents_w"][1], examples[1]["latents_w"])
  mem = memory.InMemoryPairs({k: np.stack([e[k] for e in examples])
                              for k in ("latents_w", "latents_l", "text_states")} |
                             {"is_harmful": np.zeros(12, np.int32)},
                             categories=[e["category"] for e in examples])
  msub = mem.subset([1, 5, 9], label="sexual")
  assert set(msub.record_categories()) == {"sexual"}
  np.testing.assert_array_equal(msub.records_batch([0])["latents_w"][0], examples[1]["latents_w"])
  with pytest.raises(ValueError, match="3 entries for 12 pairs"):
    memory.InMemoryPairs(mem.arrays, categories=["a"] * 3)


def test_category_balance_repeats_each_category_up_to_the_largest(tmp_path):
  cats = ["a", "b", "a", "", "c", "a", "", "b", "a"]  # a: 4, b: 2, c: 1, clean: 2
  pos = tfds_loader.category_balanced_positions(cats)
  got = [cats[i] for i in pos]
  assert {c: got.count(c) for c in "abc"} == {"a": 4, "b": 4, "c": 4} and got.count("") == 2
  assert sorted(pos[[cats[i] == "b" for i in pos]].tolist()) == [1, 1, 7, 7]
  assert sorted(pos[[cats[i] == "a" for i in pos]].tolist()) == [0, 2, 5, 8]  # largest: once
  with pytest.raises(ValueError, match="no record has a category"):
    tfds_loader.category_balanced_positions(["", ""])
  # through the trainer's entry point: 13 records (9 of 3 categories, 3 of each, 3 clean)
  path, examples = _latent_dataset(tmp_path / "data", n=13)
  data = ml_collections.ConfigDict(dict(name=str(path), data_dir="", split="train", seed=0,
                                        hflip=False, nan_cost="zero", category_balance="none"))
  assert tfds_loader.open_pair_source(data).num_pairs == 13
  data.category_balance = "equal"  # Hate has 4 (records 0, 4, 8, 12): the others go to 4
  src = tfds_loader.open_pair_source(data)
  found = list(src.record_categories())
  assert src.num_pairs == 15 and found.count("") == 3
  assert all(found.count(c) == 4 for c in ("Hate", "sexual", "Violence"))
  assert src.identity()["subset"] == "category_balance=equal"
  data.category_balance = "square_root"
  with pytest.raises(ValueError, match="data.category_balance='square_root'"):
    tfds_loader.open_pair_source(data)
  # the random in-memory pairs have no categories to balance: refused, not ignored
  expert = _config().expert
  expert.data.update(dict(source="memory_random", category_balance="equal"))
  with pytest.raises(ConfigError, match="needs categorised pairs"):
    loop.make_pair_source(expert, sd=None)


def test_all_single_on_tfds_data_with_chosen_categories(tmp_path):
  """The tfds path (the SD1.5 config's): categories from the dataset's `category` field, two of
  its three chosen; the all_single baseline trains one LoRA on exactly their pairs."""
  path, examples = _latent_dataset(tmp_path / "data")
  config = _config(**{"expert.data.source": "tfds", "expert.data.name": str(path),
                      "safetydpo.categories": ("Violence", "Hate"),
                      "safetydpo.experts": "all_single", "expert.train.num_steps": 3})
  work = tmp_path / "work"
  with pytest.MonkeyPatch.context() as mp:
    spy = _Spy(mp, tfds_loader.PairLoader)
    result = safetydpo.run(config, work)
  by_latent = {e["latents_w"].tobytes(): e["category"] for e in examples}
  seen = [by_latent.get(row.tobytes(), by_latent.get(row[:, ::-1].tobytes()))
          for b in spy.seen["all_single"] for row in b["latents_w"]]
  assert set(seen) == {"Violence", "Hate"}  # 3 steps x 4 > one epoch of their 6 pairs
  (expert,) = result["experts"]
  assert expert["name"] == "all_single" and expert["pairs"] == 6
  assert result["categories"] == {"Violence": 3, "Hate": 3}
  assert (work / safetydpo.CATEGORIES_FILE).is_file()
  unet, _ = unet_io.load_unet(Path(BASE) / "unet")
  lora, scale, _ = lora_io.load_lora(work / "export" / "lora", layers.abstract_params(unet))
  assert scale == 1.0  # rank 4 = alpha 4: the expert as trained
  flat = traverse_util.flatten_dict(result["experts_params"][0])
  assert sorted(traverse_util.flatten_dict(lora)) == sorted(flat)
  for k, v in traverse_util.flatten_dict(lora).items():
    np.testing.assert_array_equal(v, flat[k])
  assert any(np.abs(v).max() > 0 for k, v in flat.items() if k[-1] == "lora_B")
  assert (work / "export" / "unet" / "config.json").is_file()
  with pytest.raises(ConfigError, match="not in the pair data"):
    safetydpo.run(_config(**{"expert.data.source": "tfds", "expert.data.name": str(path),
                             "safetydpo.categories": ("Shocking",)}), tmp_path / "bad")


def test_dense_export_is_base_plus_the_merged_delta(job, merge_inputs, tmp_path):
  _, config, _, _ = job
  mi = merge_inputs
  m_cfg = config.merge.copy_and_resolve_references()
  m_cfg.output = "dense"
  means = merge_lib.input_abs_means_batches(mi["unet"], mi["base"], mi["modules"], mi["batches"])
  dense, _ = safetydpo.merge_experts(mi["trees"], mi["spec"], means, m_cfg)
  (tmp_path / "lora").mkdir()  # a stale export of another merge is removed
  out = safetydpo.export_merge(tmp_path, mi["unet"].config, mi["base"], dense, "dense", None)
  assert set(out) == {"unet"} and not (tmp_path / "lora").exists()
  _, fused = unet_io.load_unet(out["unet"])
  flat_f, flat_b = traverse_util.flatten_dict(fused), traverse_util.flatten_dict(mi["base"])
  for m in mi["modules"]:
    np.testing.assert_allclose(flat_f[m + ("kernel",)] - flat_b[m + ("kernel",)], dense[m],
                               atol=1e-6)
  assert np.linalg.matrix_rank(dense[mi["modules"][0]]) > 8  # full rank: above 2 x rank 4
  others = [k for k in flat_b if k[:-1] not in set(mi["modules"]) or k[-1] != "kernel"]
  assert all(np.array_equal(flat_f[k], flat_b[k]) for k in others)


def test_config_errors_come_first(tmp_path):
  for overrides, match in (({"merge.method": "ties"}, "merge.method"),
                           ({"merge.output": "lowrank"}, "merge.output"),
                           ({"safetydpo.experts": "one"}, "safetydpo.experts"),
                           ({"expert.lora.enabled": False}, "LoRA train config"),
                           ({"expert.lora.text_encoder_targets": ("attention",)},
                            "UNet experts only"),
                           ({"safetydpo.categories": ()}, "needs safetydpo.categories"),
                           ({"expert.train.grad_accum": 3}, "config.expert .*grad_accum")):
    with pytest.raises(ConfigError, match=match):
      safetydpo.run(_config(**overrides), tmp_path)
  assert list(tmp_path.iterdir()) == []
