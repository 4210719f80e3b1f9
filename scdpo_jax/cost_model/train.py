"""Training and evaluation of the safety cost model (the `cost_model` job, configs/cost_model.py).

Data: labelled images, 1 = harmful, 0 = safe, from one of
  * a pair dataset (`tfds_pairs`): in each *harmful-prompt* pair the loser is harmful and the
    winner safe; the two form a matched pair for L_con. Clean-prompt pairs are not used.
  * a CSV with columns image,label (label 1/0 or harmful/safe/unsafe/clean) + an image folder;
    L_con then pairs a random harmful with a random safe image of the batch.
  * a synthetic demo (red disc = "harmful", `data/shapes.py`) when neither is given.
Held-out split: a group (a pair, or an image path) goes to eval iff the first 8 hex digits of
sha1(group) / 16^8 < eval_fraction, so a pair never straddles the split.

The frozen tower embeds every image once (`model.make_embedder`); training then runs on the
embeddings: each step draws `batch_size` (harmful, safe) pairs with NumPy's generator seeded by
(seed, step) and takes one optax AdamW step on L_con + mu * L_anc (losses.py). Orbax
checkpoints (`<workdir>/checkpoints`, items `adapter` and `opt_state`) are written every
`checkpoint_every` steps (config: checkpoint.every_steps) and at the end; a rerun resumes from
the latest one.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from scdpo_jax.cost_model import losses, metrics
from scdpo_jax.cost_model.model import CostAdapter
from scdpo_jax.data import images as image_utils

META_NAME = "cost_model.json"
EVAL_NAME = "cost_model_eval.json"
CHECKPOINT_DIR = "checkpoints"


def in_eval_split(group: str, eval_fraction: float) -> bool:
  """Deterministic held-out assignment of a group key (see module docstring)."""
  h = int(hashlib.sha1(group.encode("utf-8")).hexdigest()[:8], 16)
  return h / 16 ** 8 < eval_fraction


@dataclasses.dataclass
class LabelledItem:
  """One image to embed: `fetch()` gives its encoded bytes; `pair` = (pair key, side) or None."""

  fetch: Callable[[], bytes]
  label: int
  group: str
  pair: tuple[str, str] | None = None


def items_from_pairs(path: str | Path, split: str = "train") -> Iterator[LabelledItem]:
  """Harmful-prompt pairs of a pair dataset: loser -> harmful (1), winner -> safe (0)."""
  from scdpo_jax.data import tfds_pairs

  ds = tfds_pairs.open_pairs(path)
  if not ds.schema.images:
    raise ValueError(f"{ds.path} holds no images; the cost model needs an image pair dataset")
  src = ds.source(split)
  for i in range(len(src)):
    rec = src[i]
    if int(rec["is_harmful"]) != 1:
      continue
    key = tfds_pairs.text(rec["pair_id"])
    yield LabelledItem(lambda rec=rec: rec["image_l"], 1, key, (key, "h"))
    yield LabelledItem(lambda rec=rec: rec["image_w"], 0, key, (key, "s"))


def items_from_csv(csv_path: str | Path, images_dir: str | Path | None = None
                   ) -> Iterator[LabelledItem]:
  """Rows image,label of a CSV; image paths relative to `images_dir` (default: the CSV's folder)."""
  from scdpo_jax.data.convert import BadRow, parse_tag

  csv_path = Path(csv_path)
  base = Path(images_dir) if images_dir else csv_path.parent
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    if not {"image", "label"} <= set(reader.fieldnames or ()):
      raise ValueError(f"{csv_path}: need columns image,label; has {reader.fieldnames}")
    for i, row in enumerate(reader):
      try:
        label = parse_tag(row["label"])
      except BadRow as e:
        raise ValueError(f"{csv_path} row {i}: {e}") from e
      path = base / row["image"]
      if not path.is_file():
        raise FileNotFoundError(f"{csv_path} row {i}: image {path} not found")
      yield LabelledItem(path.read_bytes, label, row["image"])


@dataclasses.dataclass
class EmbeddedSet:
  """Embeddings (N, D), labels (N,), eval mask (N,), matched (harmful, safe) index pairs (M, 2)."""

  embeddings: np.ndarray
  labels: np.ndarray
  is_eval: np.ndarray
  pairs: np.ndarray

  def split(self, eval_part: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, labels, matched pairs) of the train (False) or eval (True) part."""
    sel = np.flatnonzero(self.is_eval == eval_part)
    keep = self.is_eval[self.pairs[:, 0]] == eval_part if len(self.pairs) else np.zeros(0, bool)
    return sel, self.labels[sel], self.pairs[keep]


def embed_items(items: Iterator[LabelledItem], embed: Callable[[np.ndarray], np.ndarray],
                image_size: int, eval_fraction: float, batch_size: int = 64) -> EmbeddedSet:
  """Decode, resize/centre-crop to the tower's size, embed in batches; build the split."""
  embs, labels, groups, pair_of = [], [], [], []
  buf: list[LabelledItem] = []

  def flush():
    imgs = image_utils.load_model_images([it.fetch() for it in buf], image_size)
    embs.append(embed(imgs))
    buf.clear()

  for item in items:
    labels.append(item.label)
    groups.append(item.group)
    pair_of.append(item.pair)
    buf.append(item)
    if len(buf) == batch_size:
      flush()
  if buf:
    flush()
  if not labels:
    raise ValueError("no labelled images found (a pair dataset needs harmful-prompt pairs)")
  labels_arr = np.asarray(labels, np.int32)
  is_eval = np.array([in_eval_split(g, eval_fraction) for g in groups], bool)
  sides: dict[str, dict[str, int]] = {}
  for i, p in enumerate(pair_of):
    if p is not None:
      sides.setdefault(p[0], {})[p[1]] = i
  pairs = np.array([(s["h"], s["s"]) for s in sides.values() if set(s) == {"h", "s"}],
                   np.int64).reshape(-1, 2)
  return EmbeddedSet(np.concatenate(embs), labels_arr, is_eval, pairs)


def evaluate(costs: np.ndarray, labels: np.ndarray, pairs_local: np.ndarray | None, *,
             anchor: str, anchor_harmful: float, anchor_safe: float) -> dict[str, float]:
  """AUROC, accuracy at the anchor threshold, ECE of the implied harm probability, means."""
  threshold = losses.anchor_threshold(anchor, anchor_harmful, anchor_safe)
  probs = np.asarray(losses.harm_probability(costs, anchor, anchor_harmful, anchor_safe))
  out = {
      "num_images": int(len(labels)), "num_harmful": int(labels.sum()),
      "auroc": metrics.auroc(costs, labels),
      "accuracy_at_threshold": metrics.accuracy_at_threshold(costs, labels, threshold),
      "threshold": float(threshold),
      "ece": metrics.expected_calibration_error(probs, labels),
      "mean_cost_harmful": float(costs[labels == 1].mean()) if labels.any() else float("nan"),
      "mean_cost_safe": float(costs[labels == 0].mean()) if (labels == 0).any() else float("nan"),
  }
  if pairs_local is not None and len(pairs_local):
    out["pair_ranking_accuracy"] = float(np.mean(costs[pairs_local[:, 0]] >
                                                 costs[pairs_local[:, 1]]))
    out["num_pairs"] = int(len(pairs_local))
  return out


def _restore_or_init(manager: ocp.CheckpointManager, params: Any, opt_state: Any
                     ) -> tuple[Any, Any, int]:
  step = manager.latest_step()
  if step is None:
    return params, opt_state, 0
  abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)  # noqa: E731
  restored = manager.restore(step, args=ocp.args.Composite(
      adapter=ocp.args.StandardRestore(abstract(params)),
      opt_state=ocp.args.StandardRestore(abstract(opt_state))))
  logging.info("cost model: resumed from checkpoint step %d", step)
  return restored["adapter"], restored["opt_state"], int(step)


def train_adapter(data: EmbeddedSet, workdir: Path, *, adapter: CostAdapter, loss_kw: dict,
                  steps: int, batch_size: int, learning_rate: float, weight_decay: float,
                  seed: int, checkpoint_every: int, eval_every: int, max_to_keep: int,
                  log_every: int = 50) -> tuple[Any, list[dict]]:
  """Train the adapter on frozen embeddings; returns (params, eval history)."""
  train_idx, train_labels, train_pairs = data.split(False)
  eval_idx, eval_labels, eval_pairs = data.split(True)
  harmful, safe = train_idx[train_labels == 1], train_idx[train_labels == 0]
  if len(harmful) == 0 or len(safe) == 0:
    raise ValueError(f"training split needs harmful and safe images: {len(harmful)} harmful, "
                     f"{len(safe)} safe")
  emb = data.embeddings
  params = jax.jit(adapter.init)(jax.random.key(seed), jnp.asarray(emb[:1]))["params"]
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)
  opt_state = tx.init(params)
  manager = ocp.CheckpointManager(
      (workdir / CHECKPOINT_DIR).resolve(),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
  params, opt_state, start = _restore_or_init(manager, params, opt_state)

  @jax.jit
  def train_step(params, opt_state, e_h, e_s):
    def loss_fn(p):
      c_h = adapter.apply({"params": p}, e_h)
      c_s = adapter.apply({"params": p}, e_s)
      return losses.cost_model_loss(c_h, c_s, **loss_kw)

    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  costs_fn = jax.jit(lambda p, e: adapter.apply({"params": p}, e))
  eval_pairs_local = np.searchsorted(eval_idx, eval_pairs) if len(eval_pairs) else None
  anchor_kw = {k: loss_kw[k] for k in ("anchor", "anchor_harmful", "anchor_safe")}
  history = []

  def run_eval(step):
    if len(eval_idx) == 0 or len(set(eval_labels.tolist())) < 2:
      logging.warning("cost model: held-out split lacks a class (%d images); no eval",
                      len(eval_idx))
      return
    costs = np.asarray(costs_fn(params, jnp.asarray(emb[eval_idx])))
    result = {"step": step, **evaluate(costs, eval_labels, eval_pairs_local, **anchor_kw)}
    history.append(result)
    logging.info("cost model eval: %s", json.dumps(result))

  t0 = time.time()
  for step in range(start, steps):
    rng = np.random.default_rng([seed, step])
    if len(train_pairs):
      pick = train_pairs[rng.integers(0, len(train_pairs), batch_size)]
      h, s = pick[:, 0], pick[:, 1]
    else:
      h, s = rng.choice(harmful, batch_size), rng.choice(safe, batch_size)
    params, opt_state, aux = train_step(params, opt_state, jnp.asarray(emb[h]),
                                        jnp.asarray(emb[s]))
    done = step + 1
    if done % log_every == 0 or done == steps:
      logging.info("cost model step %d: %s (%.1fs)", done,
                   {k: round(float(v), 4) for k, v in aux.items()}, time.time() - t0)
    if done % checkpoint_every == 0 or done == steps:
      manager.save(done, args=ocp.args.Composite(adapter=ocp.args.StandardSave(params),
                                                 opt_state=ocp.args.StandardSave(opt_state)))
    if done % eval_every == 0 and done != steps:
      run_eval(done)
  manager.wait_until_finished()
  run_eval(max(steps, start))
  return params, history
