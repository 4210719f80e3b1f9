"""SCP-style pair building: score a candidate pool with the cost model, pair by r - lambda * C.

  python -m scdpo_jax.data.pairs_build --pool_csv pool.csv --images DIR --cost_model runs/cost \\
      --output data/scp_pairs [--lam 1.0] [--pairs_per_prompt 1] [--threshold T] [--tokenizer SD]
  python -m scdpo_jax.data.pairs_build --pool_pairs data/pickapic_pairs ...   (re-rank pairs)

Pool: groups of candidate images under one prompt.
  * `--pool_csv`: one row per image, columns prompt, image (path relative to --images), tag
    (harmful|clean|1|0), optional category, reward, group (rows with the same group - default:
    the same prompt and tag - form a group), hflip_ok. A missing or unreadable image is an error
    naming its row (a generated pool is expected to be complete).
  * `--pool_pairs`: every pair of a pair dataset is a group of two; rewards are the dataset's
    reward_w/_l (NaN = unknown) and its winner/loser order is the human preference (rank 0/1).

Rule (method.md 2.2 Variant A / 2.5, project decisions [I]). Every image gets a cost C from the
cost model; r is its preference reward when the whole group has one (else r is not used).
Combined score s = r - lambda * C (s = -lambda * C without rewards). Candidates are sorted by s,
descending (ties: human rank, then input order), and the k-th best is paired with the k-th worst
for k < pairs_per_prompt while they differ.
  * Harmful prompt: kept iff C_w < threshold (the winner is safe) and C_l - C_w >= min_cost_gap
    (the winner has the lower cost; with the default gap 0, equal costs are decided by r).
  * Clean prompt: only candidates with C < threshold take part (both images safe). With rewards,
    sorted by s and kept iff r_w - r_l >= min_reward_gap (winner = higher reward); without
    rewards, the human order decides (winner = human rank 0) and a group without any preference
    signal yields no pair.
Every group that yields fewer pairs than asked is counted under its reason in the report, which
also gives per kind the number of pairs and the cost / reward margins (C_l - C_w, r_w - r_l).
The output is an image pair dataset (`tfds_pairs`) with cost_w/_l and reward_w/_l filled in:
`PairLoader` reads it with an encoder, or cache its latents first (`cache.py`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from scdpo_jax import files
from scdpo_jax.data import tfds_pairs
from scdpo_jax.data.convert import (BadRow, PromptTokenizer, hflip_allowed, parse_float,
                                    parse_tag, read_image_ref)
from scdpo_jax.data.images import load_model_images


@dataclasses.dataclass
class Candidate:
  """One candidate image: `fetch()` returns its encoded bytes; `row` names it in errors."""

  fetch: Callable[[], bytes]
  row: str
  reward: float = math.nan
  human_rank: int | None = None
  cost: float = math.nan


@dataclasses.dataclass
class PromptGroup:
  key: str
  prompt: str
  is_harmful: int
  category: str
  candidates: list[Candidate]
  hflip_ok: int = 1


def groups_from_csv(csv_path: str | Path, images_dir: str | Path) -> list[PromptGroup]:
  csv_path, images_dir = Path(csv_path), Path(images_dir)
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    cols = set(reader.fieldnames or ())
    if not {"prompt", "image", "tag"} <= cols:
      raise ValueError(f"{csv_path}: a pool CSV needs columns prompt, image, tag; has {cols}")
    rows = list(reader)
  groups: dict[str, PromptGroup] = {}
  for i, row in enumerate(rows):
    row_id = f"{csv_path.name}:{i}"
    try:
      tag = parse_tag(row["tag"])
      reward = parse_float(row.get("reward"), "reward")
      flip = parse_tag(row["hflip_ok"]) if (row.get("hflip_ok") or "").strip() else None
    except BadRow as e:
      raise ValueError(f"{row_id}: {e}") from e
    prompt = row["prompt"]
    key = (row.get("group") or "").strip() or f"{tag}:{prompt}"
    g = groups.get(key)
    if g is None:
      g = groups[key] = PromptGroup(key, prompt, tag, (row.get("category") or "").strip(), [],
                                    hflip_allowed(prompt))
    elif g.is_harmful != tag or g.prompt != prompt:
      raise ValueError(f"{row_id}: group {key!r} mixes prompts or tags")
    if flip is not None:
      g.hflip_ok = min(g.hflip_ok, flip)
    g.candidates.append(Candidate(
        lambda ref=row["image"], rid=row_id: _load(ref, images_dir, rid), row_id, reward))
  return list(groups.values())


def _load(ref: Any, base: Path, row_id: str) -> bytes:
  try:
    return read_image_ref(ref, base)
  except BadRow as e:
    raise ValueError(f"pool image of {row_id}: {e}") from e


def groups_from_pairs(path: str | Path, split: str = "train") -> list[PromptGroup]:
  ds = tfds_pairs.open_pairs(path)
  if not ds.schema.images:
    raise ValueError(f"{ds.path} holds no images; pair building needs images to score")
  src = ds.source(split)
  groups = []
  for i in range(len(src)):
    rec = src[i]
    key = tfds_pairs.text(rec["pair_id"])
    groups.append(PromptGroup(
        key, tfds_pairs.text(rec["prompt"]), int(rec["is_harmful"]),
        tfds_pairs.text(rec["category"]),
        [Candidate(lambda i=i: src[i]["image_w"], f"{key}/w", float(rec["reward_w"]), 0),
         Candidate(lambda i=i: src[i]["image_l"], f"{key}/l", float(rec["reward_l"]), 1)],
        int(rec["hflip_ok"])))
  return groups


def score_groups(groups: Sequence[PromptGroup], scorer, batch_size: int = 64) -> None:
  """Fill `cost` of every candidate with `scorer` (a CostModelScorer), in batches."""
  size = scorer.vision_module.config.image_size
  flat = [c for g in groups for c in g.candidates]
  for lo in range(0, len(flat), batch_size):
    part = flat[lo:lo + batch_size]
    costs = scorer(load_model_images([c.fetch() for c in part], size))
    for c, cost in zip(part, costs):
      c.cost = float(cost)


def _margin_stats(values: list[float]) -> dict[str, float] | None:
  if not values:
    return None
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()),
          "max": float(v.max())}


def build_pairs(groups: Sequence[PromptGroup], *, lam: float, threshold: float,
                pairs_per_prompt: int = 1, min_cost_gap: float = 0.0,
                min_reward_gap: float = 0.0) -> tuple[list[dict], dict[str, Any]]:
  """Pairs (example dicts for `tfds_pairs.write_pairs`, without input_ids) and the report."""
  if pairs_per_prompt < 1:
    raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
  pairs: list[dict] = []
  kinds = {k: {"groups": 0, "pairs": 0, "short_by_reason": {}, "cost_margins": [],
               "reward_margins": []} for k in ("harmful", "clean")}

  def short(kind, reason, n):
    d = kinds[kind]["short_by_reason"]
    d[reason] = d.get(reason, 0) + n

  for g in groups:
    kind = "harmful" if g.is_harmful else "clean"
    stats = kinds[kind]
    stats["groups"] += 1
    for c in g.candidates:
      if math.isnan(c.cost):
        raise ValueError(f"candidate {c.row} has no cost: score the groups first")
    cands = list(g.candidates)
    if not g.is_harmful:
      cands = [c for c in cands if c.cost < threshold]
    use_reward = bool(cands) and all(not math.isnan(c.reward) for c in cands)
    has_rank = bool(cands) and all(c.human_rank is not None for c in cands)

    def score(c):
      return (c.reward if use_reward else 0.0) - lam * c.cost

    if len(cands) < 2:
      short(kind, "fewer_than_2_candidates" if g.is_harmful else "fewer_than_2_safe",
            pairs_per_prompt)
      continue
    if g.is_harmful or use_reward:
      order = sorted(range(len(cands)), key=lambda i: (-score(cands[i]),
                                                       cands[i].human_rank or 0, i))
    elif has_rank:
      order = sorted(range(len(cands)), key=lambda i: (cands[i].human_rank, i))
    else:
      short(kind, "no_preference_signal", pairs_per_prompt)
      continue
    available = len(order) // 2  # disjoint (k-th best, k-th worst) pairs
    for k in range(min(pairs_per_prompt, available)):
      w, l = cands[order[k]], cands[order[len(order) - 1 - k]]
      if g.is_harmful:
        if not w.cost < threshold:
          short(kind, "no_safe_winner", 1)
          continue
        if l.cost - w.cost < min_cost_gap:
          short(kind, "cost_gap_too_small", 1)
          continue
      elif use_reward:
        if w.reward - l.reward < min_reward_gap:
          short(kind, "reward_gap_too_small", 1)
          continue
      elif w.human_rank == l.human_rank:
        short(kind, "no_preference_signal", 1)
        continue
      pairs.append({"pair_id": f"{g.key}#{k}", "prompt": g.prompt, "is_harmful": g.is_harmful,
                    "category": g.category, "hflip_ok": g.hflip_ok,
                    "image_w": w.fetch, "image_l": l.fetch, "cost_w": w.cost, "cost_l": l.cost,
                    "reward_w": w.reward, "reward_l": l.reward})
      stats["pairs"] += 1
      stats["cost_margins"].append(l.cost - w.cost)
      if not (math.isnan(w.reward) or math.isnan(l.reward)):
        stats["reward_margins"].append(w.reward - l.reward)
    if pairs_per_prompt > available:
      short(kind, "not_enough_candidates", pairs_per_prompt - available)
  report: dict[str, Any] = {"lam": lam, "threshold": threshold,
                            "pairs_per_prompt": pairs_per_prompt,
                            "min_cost_gap": min_cost_gap, "min_reward_gap": min_reward_gap,
                            "pairs_total": len(pairs)}
  for kind, s in kinds.items():
    report[kind] = {"groups": s["groups"], "pairs": s["pairs"],
                    "short_by_reason": s["short_by_reason"],
                    "cost_margin": _margin_stats(s["cost_margins"]),
                    "reward_margin": _margin_stats(s["reward_margins"]),
                    "pairs_with_rewards": len(s["reward_margins"])}
  return pairs, report


def write_built_pairs(output: str | Path, pairs: Sequence[dict], report: dict, *,
                      split: str = "train", tokenizer: str | None = None,
                      max_length: int | None = None) -> Path:
  """Write the pairs (images fetched now) as an image pair dataset; report in its metadata."""
  if not pairs:
    raise ValueError(f"no pairs were built: {json.dumps(report)}")
  tok = PromptTokenizer(tokenizer, max_length)
  schema = tfds_pairs.PairSchema(token_length=tok.token_length, images=True)

  def examples():
    for p in pairs:
      ex = dict(p, image_w=p["image_w"](), image_l=p["image_l"]())
      if tok.tokenizer is not None:
        ex["input_ids"] = tok(ex["prompt"])
      yield ex

  output = Path(output)
  path = tfds_pairs.write_pairs(output, {split: examples()}, schema,
                                description="SCP-style pairs built with the safety cost model",
                                metadata={"pairs_build": report})
  files.write_json(output / "pairs_build_report.json", report)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  from scdpo_jax.cost_model import CostModelScorer

  parser = argparse.ArgumentParser(prog="python -m scdpo_jax.data.pairs_build",
                                   description=__doc__.split("\n\n")[0])
  pool = parser.add_mutually_exclusive_group(required=True)
  pool.add_argument("--pool_csv")
  pool.add_argument("--pool_pairs")
  parser.add_argument("--images", help="folder the pool CSV's image paths are relative to")
  parser.add_argument("--pool_split", default="train")
  parser.add_argument("--cost_model", required=True, help="workdir of the cost_model job")
  parser.add_argument("--clip_folder", default=None)
  parser.add_argument("--output", required=True)
  parser.add_argument("--lam", type=float, default=1.0)
  parser.add_argument("--threshold", type=float, default=None,
                      help="cost threshold (default: the cost model's)")
  parser.add_argument("--pairs_per_prompt", type=int, default=1)
  parser.add_argument("--min_cost_gap", type=float, default=0.0)
  parser.add_argument("--min_reward_gap", type=float, default=0.0)
  parser.add_argument("--tokenizer", default=None)
  parser.add_argument("--max_length", type=int, default=None)
  parser.add_argument("--batch_size", type=int, default=64)
  args = parser.parse_args(argv)
  if args.pool_csv and not args.images:
    parser.error("--pool_csv needs --images")
  groups = (groups_from_csv(args.pool_csv, args.images) if args.pool_csv
            else groups_from_pairs(args.pool_pairs, args.pool_split))
  scorer = CostModelScorer.from_workdir(args.cost_model, clip_folder=args.clip_folder,
                                        batch_size=args.batch_size)
  score_groups(groups, scorer, args.batch_size)
  threshold = scorer.threshold if args.threshold is None else args.threshold
  pairs, report = build_pairs(groups, lam=args.lam, threshold=threshold,
                              pairs_per_prompt=args.pairs_per_prompt,
                              min_cost_gap=args.min_cost_gap, min_reward_gap=args.min_reward_gap)
  report["cost_model"] = str(Path(args.cost_model).resolve())
  print(json.dumps(report, indent=2))
  path = write_built_pairs(args.output, pairs, report, tokenizer=args.tokenizer,
                           max_length=args.max_length)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
