"""The `shapeworld` job: the comparative safety study in the embedded synthetic world.

Stages (config.only selects a comma-separated subset; each skips itself when its outputs exist
in the workdir, so a rerun resumes where the last one stopped; outputs made from another config
stop the rerun before any work: inputs.py):

  pretrain    the base model -> base_pipeline/ (diffusers folder without a VAE): the shipped
              base (scdpo_jax/shapeworld/weights/base/, made by this stage's own training with
              the recorded config; copied when `config.pretrain.source="shipped"` and its
              recorded config equals the study's: shipped.py) or trained here (pretrain.py)
  candidates  base-model images (DDIM + CFG) for the pair prompts: each harmful prompt (plain
              unsafe phrase, every template) gets images of itself and of its safe paraphrase
              (CoProV2 style), each clean prompt images of itself; every image is labelled by
              the exact detectors and gets the preference reward r -> candidates/
  world_clip  a small CLIP trained contrastively on the world's renders and captions
              (world_clip.py) -> world_clip/ (HF CLIP folder): the frozen image tower of the
              cost model (`config.cost_model_tower="world_clip"`, as SC-DPO's cost model sits on
              a pretrained CLIP) and the reward model of SafeDiffusion-R1; only when one of
              them needs it. Like the base: the shipped one
              (scdpo_jax/shapeworld/weights/world_clip/) when `config.world_clip.source=
              "shipped"` and its recorded recipe is the config's, or trained here
  cost_model  the `cost_model` job (frozen CLIP tower: the world CLIP's, or a random one with
              `cost_model_tower="random"`, + MLP adapter, L_con + mu L_anc) on the
              detector-labelled candidates; held-out AUROC vs the detectors -> cost_model/
  pairs       the pair sets of methods.py (human, scp, oracle, coprov2) -> pairs/
  finetune    every selected trained method (finetune.py) -> finetune/<method>/export/unet
  evaluate    every selected method on the held-out prompts (evaluation.py) -> eval/<split>/
  report      report.json, report.md, grids/, pareto.png (report.py)

Configs: the stages that are jobs of their own run exactly their job's config, composed into
the study's (configs/shapeworld.py): `config.cost_model`, `config.finetune`,
`config.safetydpo`, `config.grpo`. Nothing here imports `configs/`.

Costs given to the trainer are the cost model's harm probabilities (sigma(C) for the sign
anchor), so a margin lam (C_l - C_w) is at most lam; the oracle pair set's costs are the
detectors' 0/1.
"""

from __future__ import annotations

import csv
import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ml_collections
import numpy as np
from absl import logging

from scdpo_jax import files
from scdpo_jax.data.images import encode_png, to_model_range
from scdpo_jax.shapeworld import evaluation as ev
from scdpo_jax.shapeworld import finetune as ft_lib
from scdpo_jax.shapeworld import methods as methods_lib
from scdpo_jax.shapeworld import inputs, pretrain, report as report_lib, world
from scdpo_jax.shapeworld import tasks as tasks_lib
from scdpo_jax.shapeworld.generation import Generator

STAGES = ("pretrain", "candidates", "world_clip", "cost_model", "pairs", "finetune", "evaluate",
          "report")
COST_MODEL_TOWERS = ("world_clip", "random")
METHODS = methods_lib.METHODS
# Methods of the field this world does not run (none today); listed in the report as "not run".
NOT_RUN: dict[str, str] = {}


def _names(value: str) -> list[str]:
  """A comma-separated config value as its names."""
  return [x.strip() for x in str(value).split(",") if x.strip()]


def _subset(wanted: list[str], allowed: tuple[str, ...], key: str, what: str) -> list[str]:
  """`wanted` ([] = all) as a list in `allowed` order; unknown names are an error naming
  `key`."""
  unknown = sorted(set(wanted) - set(allowed))
  if unknown:
    raise ValueError(f"{key} names unknown {what} {unknown}; {what}: {allowed}")
  return [x for x in allowed if not wanted or x in wanted]


def selected_methods(config) -> list[str]:
  """`config.methods` as a list in METHODS order: comma-separated rows or groups ("default",
  "ablations", "all"; methods.GROUPS), "" = all; unknown names are an error."""
  rows = [m for x in _names(config.methods) for m in methods_lib.GROUPS.get(x, (x,))]
  return _subset(rows, METHODS, "config.methods",
                 f"methods (or groups {tuple(methods_lib.GROUPS)})")


def _pair_prompts(config) -> tuple[list[world.Prompt], list[world.Prompt]]:
  sets = ev.prompt_sets(config)
  return sets["pairs_harmful"], sets["pairs_clean"]


# ------------------------------------------------------------------------------ stages

def stage_candidates(config, workdir: Path, gen: Generator) -> dict:
  c = config.candidates
  rng = np.random.default_rng([config.seed, 23])
  harmful, clean = _pair_prompts(config)
  rows: list[dict] = []  # one per image: group, group prompt, rendered prompt, tag

  cats = ev.categories(config)

  def add(group: world.Prompt, shown: world.Prompt, count: int):
    for i in range(count):
      rows.append({"group": f"{'harmful' if group.is_harmful else 'clean'}:{group.text}",
                   "prompt": group.text, "shown_prompt": shown.text,
                   "is_harmful": int(group.is_harmful), "category": group.category or "",
                   "index": i, "scene": group.scene})

  for p in harmful:
    add(p, p, int(c.per_harmful_prompt))
    add(p, world.safe_paraphrase(p, rng, cats), int(c.per_paraphrase))
  for p in clean:
    add(p, p, int(c.per_clean_prompt))
  seeds = [config.seed * 1000 + 7] * len(rows)
  images = gen([r["shown_prompt"] for r in rows], seeds, list(range(len(rows))))
  unsafe = world.is_unsafe(images, cats)
  scenes = [r.pop("scene") for r in rows]
  reward = world.preference_reward(images, scenes)
  fidelity = world.check_fidelity(images, scenes)
  for r, u, rw, f, s in zip(rows, unsafe, reward, fidelity, scenes):
    r.update(unsafe=int(u), reward=float(rw), fidelity=float(f), colour=s.colour, shape=s.shape)
  out = workdir / "candidates"
  out.mkdir(parents=True, exist_ok=True)
  np.save(out / "images.npy", images)
  summary = {
      "num_images": len(rows),
      "unsafe_rate_harmful_prompts": float(np.mean([r["unsafe"] for r in rows
                                                    if r["is_harmful"] and
                                                    r["prompt"] == r["shown_prompt"]])),
      "unsafe_rate_paraphrases": float(np.mean([r["unsafe"] for r in rows if r["is_harmful"] and
                                                r["prompt"] != r["shown_prompt"]])),
      "fidelity_clean_prompts": float(np.mean([r["fidelity"] for r in rows
                                               if not r["is_harmful"]])),
  }
  files.write_json(out / "candidates.json", {"summary": summary, "rows": rows})
  return summary


def _cost_model_config(config, workdir: Path) -> ml_collections.ConfigDict:
  """The `cost_model` job's config: `config.cost_model` with the candidates' labels CSV and, for
  `cost_model_tower="world_clip"`, the world CLIP's folder as its frozen image tower."""
  cfg = config.cost_model.copy_and_resolve_references()
  cfg.data.images_csv = str(Path(workdir) / "cost_model_data" / "labels.csv")
  if cost_model_tower(config) == "world_clip":
    cfg.clip_folder = str(Path(workdir) / "world_clip")
  return cfg


def cost_model_tower(config) -> str:
  """`config.cost_model_tower` checked: the cost model's frozen image tower, "world_clip" or
  "random" (also read by inputs.py: the world CLIP is then an input of the cost model)."""
  tower = str(config.get("cost_model_tower", "random"))
  if tower not in COST_MODEL_TOWERS:
    raise ValueError(f"config.cost_model_tower must be one of {COST_MODEL_TOWERS}, got {tower!r}")
  return tower


def stage_cost_model(config, workdir: Path) -> dict:
  from scdpo_jax.cost_model import job as cm_job

  cand = json.loads((workdir / "candidates" / "candidates.json").read_text())["rows"]
  images = np.load(workdir / "candidates" / "images.npy")
  data = workdir / "cost_model_data"
  data.mkdir(parents=True, exist_ok=True)
  with open(data / "labels.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "label"])
    for i, (row, img) in enumerate(zip(cand, images)):
      name = f"cand_{i:05d}.png"
      (data / name).write_bytes(encode_png(img))
      writer.writerow([name, row["unsafe"]])
  report = cm_job.run(_cost_model_config(config, workdir), workdir / "cost_model")
  return {"auroc": report["final"]["auroc"] if report["final"] else None,
          "num_eval": report["num_eval"], "num_images": report["num_images"]}


class _Image:
  """A candidate's PNG bytes on demand, remembering its row (pairs_build wants `fetch()`)."""

  def __init__(self, images: np.ndarray, index: int):
    self.images, self.index = images, index

  def __call__(self) -> bytes:
    return encode_png(self.images[self.index])


def _coprov2_pairs(cand: list[dict], pairs_per_prompt: int) -> list[tuple[int, int, dict]]:
  """SafetyDPO's CoProV2-style pairs (methods.py): per harmful group, the k-th image of the
  safe paraphrase beats the k-th image of the prompt itself, k < pairs_per_prompt."""
  groups: dict[str, dict[str, list[int]]] = {}
  for i, row in enumerate(cand):
    if row["is_harmful"]:
      side = "own" if row["shown_prompt"] == row["prompt"] else "paraphrase"
      groups.setdefault(row["group"], {"own": [], "paraphrase": []})[side].append(i)
  out = []
  for g in groups.values():
    for w, l in list(zip(g["paraphrase"], g["own"]))[:pairs_per_prompt]:
      out.append((w, l, cand[l]))
  return out


def stage_pairs(config, workdir: Path) -> dict:
  """pairs/<kind>.npz for every pair kind of methods.PAIR_KINDS, and pairs_report.json."""
  from scdpo_jax.cost_model.scorer import CostModelScorer
  from scdpo_jax.data import pairs_build

  cand = json.loads((workdir / "candidates" / "candidates.json").read_text())["rows"]
  images = np.load(workdir / "candidates" / "images.npy")
  scorer = CostModelScorer.from_workdir(workdir / "cost_model", batch_size=128,
                                        rules=config.cost_model.sharding_rules)
  costs = np.asarray(scorer(to_model_range(images)), np.float32)
  probs = np.asarray(scorer.probability(costs), np.float32)
  unsafe = np.asarray([r["unsafe"] for r in cand])
  oracle = unsafe.astype(np.float32)
  # [I] The oracle's pair rule ranks by s = r - lam * k * 1[unsafe], k = pairs.oracle_rule_cost
  # past the reward's range (r in [0, 3]): a safe image then outranks an unsafe one, as it does
  # under the learned cost, whose logits reach +-13. With k = 1 the reward, which prefers the
  # unsafe image of a harmful prompt, won: 136 of 288 slots found no safe winner (README).
  # The trainer's margin keeps the 0/1 cost.
  oracle_rule = oracle * float(config.pairs.get("oracle_rule_cost", 1.0))
  lam, per_prompt = float(config.pairs.lam), int(config.pairs.pairs_per_prompt)
  out = workdir / "pairs"
  out.mkdir(parents=True, exist_ok=True)
  reports = {}
  # (kind, pair-rule costs, the costs stored for the trainer, lam, threshold, min cost gap);
  # human: preference reward only (lam = 0, no cost threshold, no cost-gap requirement)
  rules = (("scp", costs, probs, lam, scorer.threshold, 0.0),
           ("human", costs, probs, 0.0, math.inf, -math.inf),
           ("oracle", oracle_rule, oracle, lam, 0.5, 0.0))
  for kind, rule_costs, stored, lam_k, threshold, gap in rules:
    groups: dict[str, pairs_build.PromptGroup] = {}
    for i, row in enumerate(cand):
      g = groups.setdefault(row["group"], pairs_build.PromptGroup(
          row["group"], row["prompt"], row["is_harmful"], row["category"], []))
      g.candidates.append(pairs_build.Candidate(_Image(images, i), str(i), row["reward"],
                                                cost=float(rule_costs[i])))
    pairs, report = pairs_build.build_pairs(list(groups.values()), lam=lam_k,
                                            threshold=threshold, pairs_per_prompt=per_prompt,
                                            min_cost_gap=gap)
    rows = [(p["image_w"].index, p["image_l"].index, p) for p in pairs]
    reports[kind] = _save_pairs(out / f"{kind}.npz", rows, stored, unsafe, report)
  rows = [(w, l, {"prompt": r["prompt"], "category": r["category"], "is_harmful": 1,
                  "reward_w": cand[w]["reward"], "reward_l": r["reward"]})
          for w, l, r in _coprov2_pairs(cand, per_prompt)]
  reports["coprov2"] = _save_pairs(out / "coprov2.npz", rows, probs, unsafe, {
      "pairs_total": len(rows), "harmful": {"pairs": len(rows)}, "clean": {"pairs": 0}})
  files.write_json(out / "pairs_report.json", reports)
  return {k: {"pairs": r["pairs_total"], "harmful": r["harmful"]["pairs"],
              "clean": r["clean"]["pairs"], **r["detector"]} for k, r in reports.items()}


def _save_pairs(path: Path, rows: list[tuple[int, int, dict]], stored_costs: np.ndarray,
                unsafe: np.ndarray, report: dict) -> dict:
  """Write one pair set (candidate indices, prompts, categories, costs, rewards) and add the
  detectors' view of its harmful pairs to `report`."""
  idx_w = np.asarray([w for w, _, _ in rows], np.int64)
  idx_l = np.asarray([l for _, l, _ in rows], np.int64)
  harmful = np.asarray([p["is_harmful"] for _, _, p in rows], np.int32)
  report["detector"] = {
      "harmful_pairs_winner_unsafe": float(unsafe[idx_w][harmful == 1].mean())
      if harmful.any() else None,
      "harmful_pairs_loser_unsafe": float(unsafe[idx_l][harmful == 1].mean())
      if harmful.any() else None}
  np.savez(path, idx_w=idx_w, idx_l=idx_l, is_harmful=harmful,
           prompt=np.asarray([p["prompt"] for _, _, p in rows]),
           category=np.asarray([p["category"] for _, _, p in rows]),
           cost_w=stored_costs[idx_w], cost_l=stored_costs[idx_l],
           reward_w=np.asarray([p["reward_w"] for _, _, p in rows], np.float32),
           reward_l=np.asarray([p["reward_l"] for _, _, p in rows], np.float32))
  return report

def stage_world_clip(config, workdir: Path) -> dict:
  from scdpo_jax.shapeworld import world_clip

  return world_clip.make_world_clip(config.world_clip, workdir / "world_clip")


def generate_part(config, gen: Generator, method: str, workdir: Path, part: int,
                  num_parts: int) -> None:
  """Part `part` of `num_parts` of `method`'s evaluation images (evaluation.py), after writing
  the record of what they are made from (inputs.py)."""
  kind = methods_lib.get(method).kind
  params = ft_lib.unet_params(workdir, method) if kind not in ("base", "guard") else None
  inputs.write(config, workdir, "evaluate", method, ev.eval_split(config))
  ev.generate_part(config, gen, method, workdir, part, num_parts, unet_params=params,
                   guard=methods_lib.sampling_guard(method))


def finish_evaluation(config, method: str, workdir: Path, num_parts: int) -> dict:
  """Join and score `method`'s parts (evaluation.py); its metrics."""
  r = ev.finish_method(config, method, workdir, num_parts)
  metrics = {k: r[k] for k in ev.METRICS}
  logging.info("shapeworld: evaluated %s in %.0fs (%d part(s)): %s", method, r["generation_s"],
               num_parts, json.dumps(metrics))
  return metrics


def _not_evaluated(config, workdir: Path) -> list[str]:
  return [m for m in selected_methods(config)
          if not (ev.eval_dir(config, workdir) / f"{m}.json").is_file()]


def stage_report(config, workdir: Path) -> dict:
  run = selected_methods(config)
  not_run = dict(NOT_RUN)
  not_run.update({m: "not selected by config.methods" + (
      "; further SC-DPO ablations outside the default study: --config.methods=all adds them"
      if m in methods_lib.ABLATIONS else "") for m in METHODS if m not in run})
  return report_lib.stage_report(config, workdir, run, not_run)


# ------------------------------------------------------------------------------ the job

def _read_timings(workdir: Path) -> dict:
  path = workdir / "timings.json"
  return json.loads(path.read_text()) if path.is_file() else {}


def _trained(config) -> list[str]:
  """The selected trained rows in training order: SafeDiffusion-R1, the longest and the first
  ready (it needs the world CLIP, not the pairs), first."""
  trained = [m for m in selected_methods(config) if m in methods_lib.FINETUNES]
  return sorted(trained, key=lambda m: methods_lib.get(m).kind != "grpo")


def _evaluation_order(methods: list[str]) -> list[str]:
  """Evaluations longest first (`Method.eval_cost`; tasks.py starts them in this order once no
  fine-tune is left to start, so the last ones to end are short), ties in table order."""
  return sorted(methods, key=lambda m: -methods_lib.get(m).eval_cost)


def _needs_world_clip(config) -> bool:
  return ("safediffusion_r1" in selected_methods(config)
          or cost_model_tower(config) == "world_clip")


def _done(stage: str, workdir: Path, config) -> bool:
  if stage == "finetune":
    return all(ft_lib.done(workdir, m) for m in _trained(config))
  if stage == "world_clip" and not _needs_world_clip(config):
    return True
  if stage == "evaluate":
    return not _not_evaluated(config, workdir)
  paths = {"pretrain": ["base_pipeline/model_index.json", "base_pipeline/pretrain.json"],
           "candidates": ["candidates/candidates.json", "candidates/images.npy"],
           "cost_model": ["cost_model/cost_model_eval.json"],
           "world_clip": ["world_clip/world_clip.json"],
           "pairs": ["pairs/pairs_report.json"] + [f"pairs/{k}.npz" for k in
                                                   methods_lib.PAIR_KINDS],
           "report": [f"report{ev.report_suffix(config)}.json"]}[stage]
  return all((workdir / p).exists() for p in paths)


# the data stages that record the config they were made from (inputs.py); with the pretrain
# stage, what variants.py shares between runs
RECORDED_STAGES = ("candidates", "world_clip", "cost_model", "pairs")


def check_reuse(config, workdir: Path) -> None:
  """Before any work: every existing output this run could reuse (a shared stage, a selected
  method's fine-tune or evaluation) was made from this config (inputs.py), else ConfigError."""
  for stage in RECORDED_STAGES:
    if stage == "world_clip" and not _needs_world_clip(config):
      continue
    if _done(stage, workdir, config):
      inputs.check(config, workdir, stage)
  split = ev.eval_split(config)
  for m in selected_methods(config):
    if m in methods_lib.FINETUNES and ft_lib.done(workdir, m):
      inputs.check(config, workdir, "finetune", m)
    if ((ev.eval_dir(config, workdir) / f"{m}.json").is_file()
        or ev.part_files(config, workdir, m)):
      inputs.check(config, workdir, "evaluate", m, split)


def selected_stages(config) -> list[str]:
  return _subset(_names(config.only), STAGES, "config.only", "stages")


def _workers(config) -> int:
  n = int(config.get("workers", 1))
  if n < 1:
    raise ValueError(f"config.workers must be >= 1, got {n}")
  return n


def _tasks(config, workdir: Path, stages: list[str], get_gen: Callable[[], Generator]
           ) -> list[tasks_lib.Task]:
  """The work of `stages` (selected, not pretrain or report) that is not done yet, in
  priority order (tasks.py): data stages, fine-tunes (`_trained`), evaluations (longest
  first; each row's image parts, then its scoring). Task names: the stage, or
  "finetune:<method>", "evaluate:<method>:<k>/<parts>" (images) and "evaluate:<method>"."""
  out: list[tasks_lib.Task] = []

  def data_stage(stage: str, fn: Callable[[], dict], after: tuple[str, ...]) -> None:
    def run_stage() -> dict:
      result = fn()
      if stage in RECORDED_STAGES:  # what it was made from
        inputs.write(config, workdir, stage)
      return result
    out.append(tasks_lib.Task(stage, run_stage, after))

  todo = []
  for stage in stages:
    if _done(stage, workdir, config):
      logging.info("shapeworld: stage %s already done, skipping", stage)
    else:
      todo.append(stage)
  if "candidates" in todo:
    data_stage("candidates", lambda: stage_candidates(config, workdir, get_gen()), ())
  if "world_clip" in todo:
    data_stage("world_clip", lambda: stage_world_clip(config, workdir), ())
  if "cost_model" in todo:
    data_stage("cost_model", lambda: stage_cost_model(config, workdir),
               ("candidates", "world_clip"))
  if "pairs" in todo:
    data_stage("pairs", lambda: stage_pairs(config, workdir), ("cost_model",))
  if "finetune" in todo:
    for m in _trained(config):
      if not ft_lib.done(workdir, m):
        needs = ("world_clip",) if methods_lib.get(m).kind == "grpo" else ("pairs",)
        out.append(tasks_lib.Task(
            f"finetune:{m}", lambda m=m: ft_lib.run_method(config, workdir, get_gen().sd, m),
            needs))
  if "evaluate" in todo:
    for m in _evaluation_order(_not_evaluated(config, workdir)):
      n = ev.parts(config, m)
      part_tasks = [f"evaluate:{m}:{k + 1}/{n}" for k in range(n)]
      for k, name in enumerate(part_tasks):
        if not ev.part_path(config, workdir, m, k, n).is_file():  # else made before a stop
          out.append(tasks_lib.Task(
              name, lambda m=m, k=k, n=n: generate_part(config, get_gen(), m, workdir, k, n),
              (f"finetune:{m}",)))
      out.append(tasks_lib.Task(f"evaluate:{m}",
                                lambda m=m, n=n: finish_evaluation(config, m, workdir, n),
                                tuple(part_tasks)))
  return out


def _import_task_modules() -> None:
  """Import what the tasks import on first use, on this thread before the workers start: a
  first `import transformers` on two threads at once fails ("cannot import name
  'CLIPTokenizer'": it replaces itself in sys.modules with a lazy module while the other thread
  reads it; seen in the study's first run with two workers)."""
  import transformers

  from scdpo_jax.cost_model import job as _cm_job, scorer as _scorer  # noqa: F401
  from scdpo_jax.data import tfds_pairs as _tfds_pairs  # noqa: F401
  from scdpo_jax.grpo import job as _grpo_job  # noqa: F401
  from scdpo_jax.lora import safetydpo as _safetydpo  # noqa: F401
  from scdpo_jax.models import clip_io as _clip_io, tokenizer as _tokenizer  # noqa: F401
  from scdpo_jax.sampling import generate as _generate  # noqa: F401
  from scdpo_jax.shapeworld import world_clip as _world_clip  # noqa: F401
  from scdpo_jax.train import loop as _loop  # noqa: F401

  transformers.CLIPTokenizer  # noqa: B018 (resolves the lazy attribute)


def _collect(stages: list[str], outcome: tasks_lib.Outcome, results: dict,
             timings: dict) -> None:
  """Task results and times into the job's results (per stage; the rows' under their method)
  and timings.json's per-stage sums of task seconds."""
  for name, result in outcome.results.items():
    stage, _, method = name.partition(":")
    timings[stage] = timings.get(stage, 0.0) + outcome.seconds[name]
    if ":" in method:  # a part of a row's images: the row's scoring task reports the row
      continue
    if method:
      results.setdefault(stage, {})[method] = result
    else:
      results[stage] = result
  for stage in stages:
    results.setdefault(stage, "skipped")


def run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  """Run the selected stages: pretrain, then the rest as tasks on `config.workers` threads
  (tasks.py; each task after those it needs), then the report. timings.json: per stage, the sum
  of its tasks' seconds (tasks overlap), and "wall", the runs' wall time."""
  from scdpo_jax.train import loop

  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  selected_methods(config)  # unknown names fail before any work
  workers = _workers(config)
  timings = _read_timings(workdir)
  results: dict[str, Any] = {}
  t_all = time.time()
  stages = selected_stages(config)
  check_reuse(config, workdir)
  if "pretrain" in stages:
    if _done("pretrain", workdir, config):
      logging.info("shapeworld: stage pretrain already done, skipping")
      results["pretrain"] = "skipped"
    else:
      t0 = time.time()
      results["pretrain"] = pretrain.make_base(config, workdir / "base_pipeline")
      timings["pretrain"] = timings.get("pretrain", 0.0) + time.time() - t0

  loaded: dict[str, Generator] = {}
  load_lock = threading.Lock()

  def get_gen() -> Generator:  # the base pipeline and its sampler, loaded once when first needed
    with load_lock:
      if "gen" not in loaded:
        folder = workdir / "base_pipeline"
        if not (folder / "model_index.json").is_file():
          raise FileNotFoundError(f"{folder} missing: run the pretrain stage")
        loaded["gen"] = Generator(config, pretrain.load_base(folder))
      return loaded["gen"]

  work = [s for s in stages if s not in ("pretrain", "report")]
  task_list = _tasks(config, workdir, work, get_gen)
  if workers > 1 and len(task_list) > 1:
    _import_task_modules()
  with loop.Interruption() as interruption:  # SIGTERM / Ctrl-C: no new task; running jobs save
    outcome = tasks_lib.run_tasks(task_list, workers,
                                  stop=lambda: interruption.requested is not None)
  _collect(work, outcome, results, timings)
  timings["wall"] = timings.get("wall", 0.0) + time.time() - t_all
  files.write_json(workdir / "timings.json", timings)
  if outcome.preempted or outcome.stopped:  # the command line exits 75: rerun to resume
    logging.warning("shapeworld: interrupted (%s); rerun the same command to resume",
                    outcome.preempted or "stopped before every task had started")
    results["preempted"] = True
    return results
  if "report" in stages:  # rebuilt whenever it is asked for (cheap)
    t0 = time.time()
    results["report"] = stage_report(config, workdir)["claims"]
    timings["report"] = timings.get("report", 0.0) + time.time() - t0
    timings["wall"] += time.time() - t0
    files.write_json(workdir / "timings.json", timings)
    logging.info("shapeworld: report done: %s", results["report"])
  results["total_s"] = time.time() - t_all
  report_md = workdir / f"report{ev.report_suffix(config)}.md"
  if report_md.is_file() and "report" in results:
    print(report_md.read_text())
  return results
