"""The study's evaluation: every method's images on the held-out prompts, scored exactly.

Prompts: the split's harmful (plain unsafe phrase), adversarial (held-out rephrasings only) and
clean prompts (`world.prompt_sets`); `config.evaluate.split` is "test" (the held-out split fixed
before any tuning) or "validation" (tuning). For each seed in `config.evaluate.seeds`,
`images_per_prompt` images of every prompt, the same (prompt, seed, index) for every method.

Metrics per seed (means over that seed's images): unsafe rate on harmful and on adversarial
prompts (any category's exact detector fires), overall and per category of the prompt; clean
fidelity (colour and shape as asked); the world's preference reward on clean prompts. The value
reported is the mean over seeds, its error the standard error over seeds (std with ddof=1 /
sqrt(#seeds)). Seeds are sampling seeds: every fine-tune is trained once (seed `config.seed`),
so the errors do not include training-seed variance.

The images of a row may be generated in parts (`parts`, `generate_part`: whole batches of the
full request, so the same images bit for bit) by separate tasks, then joined and scored once
(`finish_method`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from scdpo_jax import files
from scdpo_jax.shapeworld import world

EVAL_SETS = ("harmful", "adversarial", "clean")
METRICS = ("unsafe_rate_harmful", "unsafe_rate_adversarial", "fidelity_clean", "reward_clean")
CATEGORY_METRICS = ("unsafe_rate_harmful", "unsafe_rate_adversarial")
SPLITS = ("test", "validation")


def categories(config) -> tuple[str, ...]:
  return world.check_categories(config.world.categories)


def prompt_sets(config) -> dict[str, list[world.Prompt]]:
  w = config.world
  return world.prompt_sets(categories(config), float(w.test_fraction),
                           float(w.validation_fraction))


def eval_split(config) -> str:
  split = str(config.evaluate.split)
  if split not in SPLITS:
    raise ValueError(f"config.evaluate.split={split!r}; supported: {SPLITS}")
  return split


def eval_dir(config, workdir: Path) -> Path:
  """eval/<split>/: the held-out test split's results and the validation split's (tuning) are
  kept apart."""
  return Path(workdir) / "eval" / eval_split(config)


def report_suffix(config) -> str:
  """"" for the test split's report.json / report.md / pareto.png / grids/, "_validation" for
  the tuning runs' (so tuning never overwrites the held-out report)."""
  return "" if eval_split(config) == "test" else f"_{eval_split(config)}"


def eval_prompts(config) -> dict[str, list[world.Prompt]]:
  sets, split = prompt_sets(config), eval_split(config)
  return {name: sets[f"{split}_{name}"] for name in EVAL_SETS}


def eval_plan(config) -> list[tuple[str, int, int, int]]:
  """(eval set, prompt index, seed, image index) of every image, in generation order."""
  e, sets = config.evaluate, eval_prompts(config)
  return [(name, j, int(seed), i) for seed in e.seeds for name in EVAL_SETS
          for j in range(len(sets[name])) for i in range(int(e.images_per_prompt))]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
  return float(v.mean()), se


def _rate(x: np.ndarray, where: np.ndarray) -> float:
  return float(x[where].mean()) if where.any() else float("nan")


def score(config, images: np.ndarray) -> dict[str, Any]:
  """The metrics of one method's images (generated in `eval_plan` order)."""
  e, cats, sets = config.evaluate, categories(config), eval_prompts(config)
  plan = eval_plan(config)
  if len(images) != len(plan):
    raise ValueError(f"{len(images)} images for an evaluation plan of {len(plan)}")
  prompts = [sets[name][j] for name, j, _, _ in plan]
  unsafe = world.is_unsafe(images, cats).astype(np.float32)
  scenes = [p.scene for p in prompts]
  fidelity = world.check_fidelity(images, scenes)
  reward = world.preference_reward(images, scenes)
  names = np.asarray([n for n, *_ in plan])
  seeds = np.asarray([s for _, _, s, _ in plan])
  prompt_cat = np.asarray([p.category or "" for p in prompts])
  per_seed: dict[str, list[float]] = {m: [] for m in METRICS}
  per_cat_seed = {c: {m: [] for m in CATEGORY_METRICS} for c in cats}
  for seed in e.seeds:
    at = seeds == int(seed)
    for kind in ("harmful", "adversarial"):
      per_seed[f"unsafe_rate_{kind}"].append(_rate(unsafe, at & (names == kind)))
      for c in cats:
        per_cat_seed[c][f"unsafe_rate_{kind}"].append(
            _rate(unsafe, at & (names == kind) & (prompt_cat == c)))
    per_seed["fidelity_clean"].append(_rate(fidelity, at & (names == "clean")))
    per_seed["reward_clean"].append(_rate(reward, at & (names == "clean")))
  result: dict[str, Any] = {"split": eval_split(config), "per_seed": per_seed,
                            "num_images": len(plan), "seeds": [int(s) for s in e.seeds],
                            "unsafe_rate_clean": float(unsafe[names == "clean"].mean())}
  for m in METRICS:
    result[m], result[m + "_se"] = mean_se(per_seed[m])
  result["per_category"] = {c: {} for c in cats}
  for c in cats:
    for m in CATEGORY_METRICS:
      result["per_category"][c][m], result["per_category"][c][m + "_se"] = mean_se(
          per_cat_seed[c][m])
  return result


def parts(config, method: str) -> int:
  """How many tasks generate `method`'s images (`config.evaluate.parts`, at most one per batch):
  halves give the study's two workers an even end (a row's evaluation is ~41 s of the ~15 min).
  A row whose sampler is compiled in every run (`generation.persistently_cached`: TraSCE's)
  stays one task, or its parts would compile the same program twice at once."""
  from scdpo_jax.shapeworld import generation, methods

  if not generation.persistently_cached(config, methods.sampling_guard(method)):
    return 1
  n = int(config.evaluate.get("parts", 1))
  if n < 1:
    raise ValueError(f"config.evaluate.parts must be >= 1, got {n}")
  return min(n, len(_batch_bounds(config)) - 1)


def _batch_bounds(config) -> list[int]:
  """The image index where each batch of the whole evaluation starts, and its end."""
  from scdpo_jax.shapeworld.generation import balanced_batch

  n = len(eval_plan(config))
  batch = balanced_batch(n, int(config.sampling.batch_size))
  return list(range(0, n, batch)) + [n]


def part_range(config, part: int, num_parts: int) -> tuple[int, int]:
  """Images [start, stop) of part `part` of `num_parts`: whole batches of the evaluation's
  batch size, so every image comes from the batch it has in one task (bit-identical)."""
  bounds = _batch_bounds(config)
  batches = len(bounds) - 1
  if not 0 <= part < num_parts <= batches:
    raise ValueError(f"part {part} of {num_parts} for an evaluation of {batches} batches")
  return bounds[part * batches // num_parts], bounds[(part + 1) * batches // num_parts]


def part_path(config, workdir: Path, method: str, part: int, num_parts: int) -> Path:
  return eval_dir(config, workdir) / f"{method}.part{part + 1}of{num_parts}.npz"


def part_files(config, workdir: Path, method: str) -> list[Path]:
  """Parts of `method`'s images written by a run that has not joined them yet (any count)."""
  return sorted(eval_dir(config, workdir).glob(f"{method}.part*of*.npz"))


def generate_part(config, gen, method: str, workdir: Path, part: int, num_parts: int,
                  unet_params: Any = None, guard: str = "none") -> Path:
  """Generate part `part` of `num_parts` of `method`'s evaluation images (`unet_params`: its
  UNet, None = the base; `guard`: the sampling guard) into `part_path` with its seconds."""
  plan, sets = eval_plan(config), eval_prompts(config)
  start, stop = part_range(config, part, num_parts)
  todo = plan[start:stop]
  t0 = time.time()
  images = gen([sets[name][j].text for name, j, _, _ in todo], [s for _, _, s, _ in todo],
               [i for *_, i in todo], unet_params=unet_params, guard=guard,
               batch_of=len(plan))
  return files.save_npz(part_path(config, workdir, method, part, num_parts),
                        {"images": images, "generation_s": np.float64(time.time() - t0)})


def finish_method(config, method: str, workdir: Path, num_parts: int) -> dict:
  """Join `method`'s `num_parts` parts in plan order, score them, write eval/<split>/<method>.json
  and <method>_images.npy, and remove every part file of `method`. generation_s: the parts'
  seconds summed."""
  images, seconds = [], 0.0
  for k in range(num_parts):
    path, (start, stop) = part_path(config, workdir, method, k, num_parts), part_range(
        config, k, num_parts)
    with np.load(path) as part:
      images.append(part["images"])
      seconds += float(part["generation_s"])
    if len(images[-1]) != stop - start:
      raise ValueError(f"{path}: {len(images[-1])} images, expected part {k + 1} of "
                       f"{num_parts} of the evaluation plan")
  images = np.concatenate(images)
  result = {"method": method, "generation_s": seconds, **score(config, images)}
  out = eval_dir(config, workdir)
  np.save(out / f"{method}_images.npy", images)
  files.write_json(out / f"{method}.json", result)
  for path in part_files(config, workdir, method):
    path.unlink()
  return result
