"""Cost-model training on a tiny random CLIP tower, the scorer, and SCP-style pair building.

The synthetic task: images with a red disc are "harmful" (scdpo_jax/data/shapes.py). A random
ViT cannot know that; the adapter must learn it from the frozen embeddings.
"""

from __future__ import annotations

import csv
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_utils import png
from scdpo_jax import jobs
from scdpo_jax.cost_model import CostModelScorer, metrics, train
from scdpo_jax.cost_model.model import CostAdapter, clip_preprocess
from scdpo_jax.data import pairs_build, shapes, tfds_pairs
from scdpo_jax.data.images import to_model_range

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The `cost_model` job through the job registry: its default demo (400 synthetic images,
  400 steps), with a quarter of the images held out."""
  import importlib.util
  from pathlib import Path

  spec = importlib.util.spec_from_file_location(
      "cost_model_config", Path(__file__).resolve().parent.parent / "configs" / "cost_model.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.eval_fraction = 0.25
  workdir = tmp_path_factory.mktemp("cost")
  report = jobs.run(config, workdir)
  return {"config": config, "workdir": workdir, "report": report}


def fresh_images(n: int, seed: int):
  rng = np.random.default_rng(seed)
  labels = (np.arange(n) % 2).astype(np.int32)
  imgs = np.stack([shapes.draw_scene(rng, IMAGE_SIZE, red_disc=bool(l)) for l in labels])
  return to_model_range(imgs), labels


def test_job_learns_the_synthetic_concept(trained):
  final = trained["report"]["final"]
  assert trained["report"]["random_tower"] is True
  assert trained["report"]["num_eval"] >= 50
  assert final["step"] == 400
  assert final["auroc"] >= 0.95, final
  assert final["accuracy_at_threshold"] >= 0.85, final
  assert final["threshold"] == 0.0 and final["mean_cost_harmful"] > 0 > final["mean_cost_safe"]
  assert 0.0 <= final["ece"] <= 0.25
  saved = json.loads((trained["workdir"] / train.EVAL_NAME).read_text())
  assert saved["final"] == final
  assert [h["step"] for h in saved["history"]] == [200, 400]


def test_scorer_on_unseen_images(trained):
  scorer = CostModelScorer.load(trained["workdir"])
  assert scorer.threshold == 0.0
  images, labels = fresh_images(64, seed=123)
  costs = scorer(images)
  assert costs.shape == (64,) and costs.dtype == np.float32
  auroc = metrics.auroc(costs, labels)
  assert auroc >= 0.95, auroc
  np.testing.assert_array_equal(scorer.is_harmful(images), costs > 0.0)
  probs = scorer.probability(costs)
  np.testing.assert_allclose(probs, 1 / (1 + np.exp(-costs.astype(np.float64))), rtol=1e-5)
  # any image size: resized to the tower's 32 x 32 inside the embedder (nearest-neighbour 2x
  # upsampling then antialiased bicubic downsampling is not an exact inverse: a small shift)
  big = np.asarray(jax.image.resize(jnp.asarray(images[:8]), (8, 64, 64, 3), "nearest"))
  big_costs = scorer(big)
  np.testing.assert_array_equal(big_costs > 0, costs[:8] > 0)
  np.testing.assert_allclose(big_costs, costs[:8], atol=1.0)
  # the checkpoint folder and a chosen step load too
  early = CostModelScorer.load(trained["workdir"] / train.CHECKPOINT_DIR, step=200)
  assert not np.allclose(early(images[:8]), costs[:8])


def test_resume_restores_instead_of_retraining(trained):
  """A second run over the finished checkpoints trains no step and returns the saved params."""
  scorer = CostModelScorer.load(trained["workdir"])
  images, labels = fresh_images(16, seed=5)
  emb = scorer.embed(images)
  data = train.EmbeddedSet(emb, labels, np.zeros(16, bool), np.zeros((0, 2), np.int64))
  cfg = trained["config"]
  params, history = train.train_adapter(
      data, trained["workdir"], adapter=CostAdapter(**cfg.model.to_dict()),
      loss_kw=dict(tau=1.0, mu=1.0, anchor="sign", anchor_harmful=1.0, anchor_safe=0.0),
      steps=400, batch_size=8, learning_rate=1.0, weight_decay=0.0, seed=0,
      checkpoint_every=1, eval_every=1000, max_to_keep=2)
  jax.tree.map(np.testing.assert_array_equal, params, scorer.adapter_params)


def test_clip_preprocess_matches_transformers():
  from transformers import CLIPImageProcessor

  proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  rng = np.random.default_rng(0)
  same = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  want = proc(list(same), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(clip_preprocess(jnp.asarray(to_model_range(same)), 32), want,
                             atol=1e-5)
  smooth = np.stack([shapes.draw_scene(rng, 96) for _ in range(2)])[:, :, 8:88]  # 96 x 80
  want = proc(list(smooth), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  got = np.asarray(clip_preprocess(jnp.asarray(to_model_range(smooth)), 32))
  assert got.shape == want.shape
  assert np.mean(np.abs(got - want)) < 0.05  # bicubic kernels differ slightly (JAX vs PIL)


@pytest.fixture(scope="module")
def pair_dataset(tmp_path_factory):
  """Harmful-prompt pairs (winner: no disc, loser: disc) + clean pairs, as a pair dataset."""
  root = tmp_path_factory.mktemp("pairs")
  rng = np.random.default_rng(9)
  examples = []
  for i in range(24):
    harmful = i % 4 != 0
    w = shapes.draw_scene(rng, IMAGE_SIZE, red_disc=False)
    l = shapes.draw_scene(rng, IMAGE_SIZE, red_disc=harmful)
    examples.append({"pair_id": f"p{i}", "prompt": f"prompt {i}", "is_harmful": int(harmful),
                     "image_w": png(w), "image_l": png(l)})
  return tfds_pairs.write_pairs(root, {"train": examples}, tfds_pairs.PairSchema())


def test_pairs_dataset_items_and_squared_anchor(trained, pair_dataset):
  scorer = CostModelScorer.load(trained["workdir"])
  data = train.embed_items(train.items_from_pairs(pair_dataset), scorer.embed, IMAGE_SIZE,
                           eval_fraction=0.3, batch_size=16)
  assert len(data.labels) == 36 and data.labels.sum() == 18  # 18 harmful pairs, clean skipped
  assert len(data.pairs) == 18
  assert np.all(data.labels[data.pairs[:, 0]] == 1) and np.all(data.labels[data.pairs[:, 1]] == 0)
  np.testing.assert_array_equal(data.is_eval[data.pairs[:, 0]], data.is_eval[data.pairs[:, 1]])
  assert 0 < data.is_eval.sum() < 36
  loss_kw = dict(tau=1.0, mu=1.0, anchor="squared", anchor_harmful=1.0, anchor_safe=0.0)
  params, history = train.train_adapter(
      data, trained["workdir"] / "squared", adapter=CostAdapter(hidden_dim=64), loss_kw=loss_kw,
      steps=200, batch_size=16, learning_rate=3e-3, weight_decay=0.0, seed=1,
      checkpoint_every=200, eval_every=1000, max_to_keep=1)
  final = history[-1]
  assert final["threshold"] == 0.5 and final["num_pairs"] >= 1
  assert final["auroc"] >= 0.9 and final["pair_ranking_accuracy"] >= 0.8, final
  costs = np.asarray(CostAdapter(hidden_dim=64).apply({"params": params}, data.embeddings))
  train_idx = ~data.is_eval
  assert abs(costs[train_idx & (data.labels == 1)].mean() - 1.0) < 0.3  # pulled to a_h = 1
  assert abs(costs[train_idx & (data.labels == 0)].mean() - 0.0) < 0.3  # pulled to a_s = 0


def test_build_pairs_rules():
  def group(key, harmful, costs, rewards=None, ranks=None):
    rewards = rewards or [math.nan] * len(costs)
    ranks = ranks or [None] * len(costs)
    cands = [pairs_build.Candidate(lambda k=f"{key}{j}": k.encode(), f"{key}/{j}", r, h, c)
             for j, (c, r, h) in enumerate(zip(costs, rewards, ranks))]
    return pairs_build.PromptGroup(key, f"prompt {key}", int(harmful), "", cands)

  groups = [
      group("h1", True, [2.0, -1.0, 0.5, -1.0], rewards=[0.0, 0.2, 0.0, 0.9]),  # cost tie -> reward
      group("h2", True, [1.0, 2.0]),  # no safe candidate
      group("h3", True, [-1.0, -0.5], rewards=[0.0, 5.0]),  # reward beats cost at lam=1
      group("c1", False, [-1.0, -2.0, 3.0], rewards=[0.1, 0.7, 2.0]),  # 3.0 is unsafe
      group("c2", False, [-1.0, -1.0], ranks=[1, 0]),  # human order only
      group("c3", False, [-1.0, -1.0]),  # no preference signal
      group("c4", False, [-1.0, 5.0], rewards=[1.0, 0.0]),  # one safe image only
  ]
  pairs, report = pairs_build.build_pairs(groups, lam=1.0, threshold=0.0, pairs_per_prompt=2)
  got = {p["pair_id"]: (p["image_w"](), p["image_l"]()) for p in pairs}
  assert got == {"h1#0": (b"h13", b"h10"), "h1#1": (b"h11", b"h12"), "c1#0": (b"c11", b"c10"),
                 "c2#0": (b"c21", b"c20")}
  assert report["harmful"]["pairs"] == 2 and report["clean"]["pairs"] == 2
  assert report["harmful"]["short_by_reason"] == {
      "no_safe_winner": 1, "not_enough_candidates": 2, "cost_gap_too_small": 1}
  assert report["clean"]["short_by_reason"] == {
      "not_enough_candidates": 2, "no_preference_signal": 2, "fewer_than_2_safe": 2}
  assert report["harmful"]["cost_margin"]["min"] == pytest.approx(1.5)
  assert report["clean"]["reward_margin"]["mean"] == pytest.approx(0.6)
  assert report["clean"]["pairs_with_rewards"] == 1
  # a large lambda makes cost win over reward (h3: -1.0 beats -0.5 despite reward 0 vs 5)
  pairs, _ = pairs_build.build_pairs([groups[2]], lam=100.0, threshold=0.0)
  assert [(p["image_w"](), p["image_l"]()) for p in pairs] == [(b"h30", b"h31")]
  with pytest.raises(ValueError, match="no cost"):
    pairs_build.build_pairs([group("x", True, [math.nan, 1.0])], lam=1.0, threshold=0.0)


def test_pairs_build_command(trained, tmp_path):
  """Pool CSV -> scored with the trained cost model -> pair dataset with costs and rewards."""
  rng = np.random.default_rng(4)
  rows = []
  for g in range(6):
    for j in range(4):
      disc = g < 4 and j < 2  # harmful prompts: 2 disc images, 2 safe ones
      name = f"g{g}_{j}.png"
      (tmp_path / name).write_bytes(png(shapes.draw_scene(rng, IMAGE_SIZE, red_disc=disc)))
      reward = j * 0.25 if g < 4 else j * 3.0  # clean: reward spread beats cost noise
      rows.append((f"prompt {g}", name, "harmful" if g < 4 else "clean", f"{reward:.2f}",
                   "Violence" if g < 4 else ""))
  with open(tmp_path / "pool.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["prompt", "image", "tag", "reward", "category"])
    w.writerows(rows)
  tok = tmp_path / "tok"
  from scdpo_jax.models import tokenizer
  tokenizer.write_byte_level_tokenizer(tok, 24)
  assert pairs_build.main(["--pool_csv", str(tmp_path / "pool.csv"), "--images", str(tmp_path),
                           "--cost_model", str(trained["workdir"]), "--output",
                           str(tmp_path / "out"), "--pairs_per_prompt", "2", "--tokenizer",
                           str(tok)]) == 0
  report = json.loads((tmp_path / "out" / "pairs_build_report.json").read_text())
  assert report["harmful"]["groups"] == 4 and report["clean"]["groups"] == 2
  # 8 harmful and 4 clean pairs are possible; a few images may be scored on the wrong side
  assert report["harmful"]["pairs"] >= 5 and report["clean"]["pairs"] >= 2, report
  assert report["pairs_total"] == report["harmful"]["pairs"] + report["clean"]["pairs"]
  ds = tfds_pairs.open_pairs(tmp_path / "out")
  assert ds.schema.token_length == 24 and ds.metadata["pairs_build"]["lam"] == 1.0
  src = ds.source("train")
  for i in range(len(src)):
    rec = src[i]
    assert float(rec["cost_w"]) < 0.0  # winners are below the threshold
    if int(rec["is_harmful"]):
      assert float(rec["cost_l"]) >= float(rec["cost_w"])
      assert tfds_pairs.text(rec["category"]) == "Violence"
    else:
      assert float(rec["reward_w"]) > float(rec["reward_l"]) and float(rec["cost_l"]) < 0.0
  # disc images lose under harmful prompts: re-scoring the stored images agrees
  from scdpo_jax.data.images import load_model_images
  scorer = CostModelScorer.load(trained["workdir"])
  harmful = [src[i] for i in range(len(src)) if int(src[i]["is_harmful"])]
  costs_l = scorer(load_model_images([r["image_l"] for r in harmful], IMAGE_SIZE))
  np.testing.assert_allclose(costs_l, [float(r["cost_l"]) for r in harmful], atol=1e-4)
  assert np.mean(costs_l > 0.0) >= 0.75
