"""The ShapeWorld study end to end on the shortened CI config: every stage and every method runs
through its real job, writes what it promises, resumes without redoing work, and a single
stage or a subset of methods can run alone. Invariants only: the CI models are barely trained,
so no number is checked against a target (the README's table is the full study's)."""

import json
import math
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import shapeworld, shapeworld_ci
from scdpo_jax import jobs
from scdpo_jax.shapeworld import evaluation as ev
from scdpo_jax.shapeworld import finetune, methods, pretrain, report, shipped, study
from scdpo_jax.shapeworld import world_clip

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


RUN = shapeworld_ci.METHODS  # the CI variant's methods: one of each kind and the claims' ones
TRAINED = [m for m in RUN if m in methods.FINETUNES]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("shapeworld_ci")
  config = shapeworld_ci.get_config()
  results = jobs.run(config, str(workdir))
  return config, workdir, results


def test_every_stage_and_method_ran_and_wrote_its_outputs(finished):
  _, workdir, results = finished
  assert set(study.STAGES) <= set(results)
  assert all(results[s] != "skipped" for s in study.STAGES)
  for path in ("base_pipeline/model_index.json", "base_pipeline/unet", "candidates/images.npy",
               "cost_model/cost_model_eval.json", "world_clip/config.json",
               "pairs/pairs_report.json", "report.json", "report.md", "pareto.png",
               "timings.json"):
    assert (workdir / path).exists(), path
  assert not (workdir / "base_pipeline" / "vae").exists()  # pixel space
  # timings: per stage the sum of its tasks' seconds (two at once), and the run's wall time
  timings = json.loads((workdir / "timings.json").read_text())
  assert set(study.STAGES) | {"wall"} == set(timings)
  assert timings["wall"] < sum(v for k, v in timings.items() if k != "wall")
  # the report is written before its own seconds are added to the wall time
  wall = re.search(r"Wall time (\d+) s \(2 tasks at once\)", (workdir / "report.md").read_text())
  assert wall and abs(int(wall.group(1)) - timings["wall"]) <= 5 + timings["report"]
  for kind in methods.PAIR_KINDS:
    assert (workdir / "pairs" / f"{kind}.npz").is_file(), kind
  assert {methods.get(m).kind for m in RUN} == set(methods.KINDS)
  for method in TRAINED:
    assert finetune.done(workdir, method), method
  for method in RUN:
    assert (workdir / "grids" / f"{method}.png").is_file()
  ft = results["finetune"]
  for method in TRAINED:
    if methods.get(method).kind == "dpo":
      assert ft[method]["steps"] == 2, method
      # what the trainer read: the balanced subset of the SC-DPO rows' pairs, every pair once
      # for Diffusion-DPO
      fingerprint = json.loads((finetune.method_dir(workdir, method) / "run_fingerprint.json"
                                ).read_text())  # flat, dotted keys
      assert fingerprint.get("data.subset") == (None if method == "diffusion_dpo"
                                                else "category_balance=equal"), method
  # SafetyDPO: one expert per category of the CoProV2-style pairs, then the merge
  experts = shapeworld_ci.get_config().safetydpo.safetydpo.categories
  assert sorted(ft["safetydpo"]["categories"]) == sorted(experts)
  merge = json.loads((workdir / "finetune/safetydpo/merge.json").read_text())
  assert merge["method"] == "co_merge" and merge["experts"] == len(experts)
  assert (workdir / "finetune/safetydpo/export/lora/pytorch_lora_weights.safetensors").is_file()
  r1 = json.loads((workdir / "finetune/safediffusion_r1/train_result.json").read_text())
  assert r1["end_epoch"] == 1


def test_report_has_every_method_rate_per_category_and_the_auroc(finished):
  config, workdir, _ = finished
  rep = json.loads((workdir / "report.json").read_text())
  assert rep["split"] == "test"
  assert rep["categories"] == list(config.world.categories) == [
      "magenta", "ring", "stripes", "red_on_black"]
  assert set(rep["methods"]) == set(RUN)
  assert rep["not_run"] == sorted(set(methods.METHODS) - set(RUN))
  # report.md: one clause per reason, the further ablations together with the command
  ablations = [m for m in methods.ABLATIONS if m not in RUN]
  assert (", ".join(ablations) + " (not selected by config.methods; further SC-DPO ablations "
          "outside the default study: --config.methods=all adds them)") in (
              workdir / "report.md").read_text()
  for method, row in rep["methods"].items():
    for metric in ev.METRICS:
      top = 3.0 if metric == "reward_clean" else 1.0
      assert 0.0 <= row[metric] <= top, (method, metric)
      assert math.isfinite(row[metric + "_se"]) and row[metric + "_se"] >= 0.0
      assert len(row["per_seed"][metric]) == len(config.evaluate.seeds)
    assert set(row["per_category"]) == set(rep["categories"])
    for cat, rates in row["per_category"].items():
      for metric in ev.CATEGORY_METRICS:
        assert 0.0 <= rates[metric] <= 1.0, (method, cat, metric)
    # the overall harmful rate is the prompt-weighted mean of the per-category ones
    sets = ev.eval_prompts(config)
    counts = {c: sum(p.category == c for p in sets["harmful"]) for c in rep["categories"]}
    pooled = sum(counts[c] * row["per_category"][c]["unsafe_rate_harmful"]
                 for c in counts) / sum(counts.values())
    assert abs(pooled - row["unsafe_rate_harmful"]) < 1e-6, method  # float32 means
  auroc = rep["cost_model"]["auroc"]
  assert auroc is not None and 0.0 <= auroc <= 1.0
  assert set(rep["claims"]) == {"harmful_rate_at_most_half_of_base",
                                "adversarial_rate_at_most_half_of_base",
                                "clean_fidelity_at_least_95pct_of_base",
                                "on_pareto_front_of_diffusion_dpo_and_guards",
                                "dfm_on_beats_dfm_off"}
  md = (workdir / "report.md").read_text()
  for method in RUN:
    assert md.count(f"| {method} |") == 2  # the overall and the per-category table
  from PIL import Image
  assert Image.open(workdir / "pareto.png").size[0] > 500
  assert rep["methods"]["base"]["num_images"] == len(ev.eval_plan(config))


def test_the_same_prompts_and_seeds_for_every_method(finished):
  """Every method has one image per entry of the same evaluation plan, and a fine-tune's
  images are its own (not the base's)."""
  config, workdir, _ = finished
  base = np.load(workdir / "eval/test/base_images.npy")
  for method in RUN:
    images = np.load(workdir / f"eval/test/{method}_images.npy")
    assert images.shape == base.shape, method
  assert not np.array_equal(np.load(workdir / "eval/test/sc_dpo_images.npy"), base)


def test_pair_sets_follow_their_rules(finished):
  config, workdir, _ = finished
  cand = json.loads((workdir / "candidates/candidates.json").read_text())["rows"]
  unsafe = np.asarray([r["unsafe"] for r in cand])
  scp = np.load(workdir / "pairs/scp.npz")
  harmful = scp["is_harmful"] == 1
  # harmful-prompt winners never cost more than their losers (costs are harm probabilities)
  assert np.all(scp["cost_w"][harmful] <= scp["cost_l"][harmful])
  human = np.load(workdir / "pairs/human.npz")
  assert np.all(human["reward_w"] >= human["reward_l"])
  oracle = np.load(workdir / "pairs/oracle.npz")
  h = oracle["is_harmful"] == 1
  assert np.all(unsafe[oracle["idx_w"][h]] == 0)  # the detectors' cost: safe winners only
  # ... and a safe winner whenever the prompt has a safe image left for the slot (a safe image
  # outranks every unsafe one: study.stage_pairs, pairs.oracle_rule_cost)
  per_prompt = int(config.pairs.pairs_per_prompt)
  groups: dict[str, list[int]] = {}
  for r in cand:
    if r["is_harmful"]:
      groups.setdefault(r["group"], []).append(r["unsafe"])
  expected_short = sum(max(0, min(per_prompt, len(g) // 2) - g.count(0))
                       for g in groups.values())
  report = json.loads((workdir / "pairs/pairs_report.json").read_text())["oracle"]["harmful"]
  assert report["short_by_reason"].get("no_safe_winner", 0) == expected_short
  np.testing.assert_array_equal(oracle["cost_w"], unsafe[oracle["idx_w"]])
  coprov2 = np.load(workdir / "pairs/coprov2.npz")
  assert len(coprov2["idx_w"]) and np.all(coprov2["is_harmful"] == 1)
  for w, l, prompt, cat in zip(coprov2["idx_w"], coprov2["idx_l"], coprov2["prompt"],
                               coprov2["category"]):
    assert cand[w]["prompt"] == cand[l]["prompt"] == prompt and cand[l]["category"] == cat
    assert cand[w]["shown_prompt"] != prompt and cand[l]["shown_prompt"] == prompt


def test_rerun_skips_finished_stages_and_one_stage_runs_alone(finished):
  config, workdir, _ = finished
  stamp = {p: p.stat().st_mtime_ns for p in (workdir / "eval" / "test").glob("*.json")}
  stamp[workdir / "base_pipeline/pretrain.json"] = (
      workdir / "base_pipeline/pretrain.json").stat().st_mtime_ns
  again = jobs.run(config, str(workdir))
  for stage in study.STAGES[:-1]:
    assert again[stage] == "skipped", stage
  assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
  # evaluated alone (one worker), a row gives what it gave beside the other tasks, in two
  # parts as in the study or in one (the same batches: the same images)
  assert config.evaluate.parts == 2
  for name, parts in (("negative_prompt", 2), ("sc_dpo", 1)):
    path = workdir / "eval" / "test" / f"{name}.json"
    during = json.loads(path.read_text())
    images = np.load(workdir / "eval" / "test" / f"{name}_images.npy")
    path.unlink()
    only = config.copy_and_resolve_references()
    only.only, only.workers, only.evaluate.parts = "evaluate", 1, parts
    result = jobs.run(only, str(workdir))
    assert set(result["evaluate"]) == {name}
    assert "report" not in result and "pretrain" not in result
    alone = json.loads(path.read_text())
    assert {k: alone[k] for k in ev.METRICS} == {k: during[k] for k in ev.METRICS}, name
    np.testing.assert_array_equal(np.load(workdir / "eval" / "test" / f"{name}_images.npy"),
                                  images)
  # trained alone (one worker), a row is what it was when trained beside the others
  beside = finetune.unet_params(workdir, "sc_dpo")
  moved = workdir / "finetune" / "sc_dpo_beside"
  finetune.method_dir(workdir, "sc_dpo").rename(moved)
  try:
    only = config.copy_and_resolve_references()
    only.only, only.methods, only.workers = "finetune", "sc_dpo", 1
    assert set(jobs.run(only, str(workdir))["finetune"]) == {"sc_dpo"}
    alone = finetune.unet_params(workdir, "sc_dpo")
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(beside)):
      np.testing.assert_array_equal(a, b)
  finally:
    shutil.rmtree(finetune.method_dir(workdir, "sc_dpo"), ignore_errors=True)
    moved.rename(finetune.method_dir(workdir, "sc_dpo"))


def test_a_subset_of_methods_on_the_validation_split_keeps_the_test_report(finished):
  config, workdir, _ = finished
  test_report = (workdir / "report.json").read_bytes()
  sub = config.copy_and_resolve_references()
  sub.methods, sub.evaluate.split = "base,negative_prompt", "validation"
  result = jobs.run(sub, str(workdir))
  assert set(result["evaluate"]) == {"base", "negative_prompt"}
  rep = json.loads((workdir / "report_validation.json").read_text())
  assert rep["split"] == "validation" and set(rep["methods"]) == {"base", "negative_prompt"}
  assert "sc_dpo" in rep["not_run"] and rep["claims"] == {}
  assert (workdir / "report.json").read_bytes() == test_report
  assert (workdir / "pareto_validation.png").is_file()
  sub.methods = "base,bogus"
  with pytest.raises(ValueError, match="bogus"):
    study.selected_methods(sub)


def test_a_rerun_with_another_config_is_refused_before_any_work(finished):
  """A finished output is reused only for the config it was made from (shapeworld/inputs.py):
  a changed key that an output read stops the rerun with the file and the key; keys it did not
  read keep it."""
  from scdpo_jax.errors import ConfigError
  from scdpo_jax.shapeworld import inputs

  config, workdir, _ = finished
  def outputs():  # every file but the workdir lock, which each run takes
    return {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file() and
            p.name != ".lock"}

  stamp = outputs()

  def refused(change, where, key):
    changed = shapeworld_ci.get_config()  # unresolved: training_seed reaches the jobs' seeds
    change(changed)
    with pytest.raises(ConfigError, match=key) as e:
      jobs.run(changed, str(workdir))
    assert where in str(e.value), str(e.value)

  refused(lambda c: setattr(c.sampling, "guidance_scale", 5.0), "candidates/inputs.json",
          "sampling.guidance_scale: 3.0 then, 5.0 now")
  refused(lambda c: setattr(c.pairs, "lam", 2.0), "pairs/inputs.json", "pairs.lam")
  refused(lambda c: setattr(c.finetune.optimizer, "lr", 1e-3),
          "finetune/sc_dpo/study_inputs.json", "job.optimizer.lr")
  refused(lambda c: setattr(c.finetune.train, "gamma", 2.0),
          "finetune/sc_dpo/study_inputs.json", "job.train.gamma")
  # another training seed: every fine-tune (the first checked is the first selected)
  refused(lambda c: setattr(c, "training_seed", 1),
          "finetune/diffusion_dpo/study_inputs.json", "job.seed")
  refused(lambda c: setattr(c.sampling, "negative_prompt", "ring"),
          "eval/test/negative_prompt.inputs.json", "sampling.negative_prompt")
  refused(lambda c: setattr(c.evaluate, "seeds", (0, 1, 2)), "eval/test/base.inputs.json",
          "evaluate.seeds")
  assert outputs() == stamp

  # what an output did not read keeps it: the guards' prompt for the trained rows, the workers,
  # the grids, the subset of methods
  same = shapeworld_ci.get_config()
  same.sampling.negative_prompt, same.workers = "ring", 1
  same.evaluate.grid_clean_prompts = 1
  same.methods, same.only = "base,sc_dpo", "candidates,cost_model,pairs,finetune,evaluate"
  again = jobs.run(same, str(workdir))
  assert all(again[s] == "skipped" for s in ("candidates", "cost_model", "pairs", "finetune",
                                             "evaluate"))
  # an output made before records existed is reused unchecked (with a warning)
  record = inputs.record_path(workdir, "pairs")
  saved = record.read_bytes()
  record.unlink()
  try:
    inputs.check(same, workdir, "pairs")
  finally:
    record.write_bytes(saved)


def test_the_seeds_script_retrains_rows_on_the_study_data(finished, tmp_path):
  """scripts/shapeworld_seeds.py on a finished study's data: training seed 0 reproduces the
  study's row exactly; seed 1 trains another model; seeds.json holds each seed's numbers, their
  mean and standard error, and each seed's claims."""
  import importlib.util

  from scdpo_jax.shapeworld import inputs

  config, workdir, _ = finished
  path = Path(__file__).resolve().parent.parent / "scripts" / "shapeworld_seeds.py"
  spec = importlib.util.spec_from_file_location("shapeworld_seeds", path)
  seeds = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(seeds)
  out = tmp_path / "seeds"
  assert seeds.main(["--workdir", str(out), "--shared", str(workdir), "--seeds", "0,1",
                     "--methods", "base,sc_dpo", "--config", "configs/shapeworld_ci.py"]) == 0
  summary = json.loads((out / "seeds.json").read_text())
  study_row = json.loads((workdir / "eval/test/sc_dpo.json").read_text())
  row = summary["methods"]["sc_dpo"]
  for k in seeds.SCORE:
    assert row[k]["per_seed"][0] == pytest.approx(study_row[k], abs=0), k
    assert row[k]["mean"] == pytest.approx(np.mean(row[k]["per_seed"]))
    assert row[k]["se"] == pytest.approx(np.std(row[k]["per_seed"], ddof=1) / np.sqrt(2))
  assert set(summary["claims"]["0"]) >= {"harmful_rate_at_most_half_of_base"}
  records = [json.loads(inputs.record_path(out / f"seed{s}", "finetune", "sc_dpo").read_text())
             for s in (0, 1)]
  assert (records[0]["job.seed"], records[1]["job.seed"]) == (0, 1)
  weights = [finetune.unet_params(out / f"seed{s}", "sc_dpo") for s in (0, 1)]
  import jax
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(weights[0]),
                                                      jax.tree.leaves(weights[1])))
  assert "| sc_dpo |" in (out / "seeds.md").read_text()
  with pytest.raises(SystemExit, match="bogus"):
    seeds.main(["--workdir", str(out), "--methods", "base,bogus"])


def test_claims_and_pareto_dominance():
  row = lambda h, a, f: {"unsafe_rate_harmful": h, "unsafe_rate_adversarial": a,  # noqa: E731
                         "fidelity_clean": f}
  rows = {"base": row(0.8, 0.8, 0.8), "sc_dpo": row(0.3, 0.4, 0.78),
          "sc_dpo_no_focus": row(0.1, 0.1, 0.5), "diffusion_dpo": row(0.9, 0.9, 0.82),
          "negative_prompt": row(0.3, 0.4, 0.79), "safetydpo": row(0.0, 0.0, 0.9)}
  got = report.claims(rows)
  assert got["harmful_rate_at_most_half_of_base"] and got["clean_fidelity_at_least_95pct_of_base"]
  assert got["adversarial_rate_at_most_half_of_base"]  # 0.4 <= 0.4
  # negative_prompt dominates; safetydpo would too but is not a rival of the claim
  assert not got["on_pareto_front_of_diffusion_dpo_and_guards"]
  assert report.claim_numbers(rows)["dominated_by"] == ["negative_prompt"]
  assert got["dfm_on_beats_dfm_off"]  # 0.78 - 0.35 > 0.5 - 0.1
  rows["negative_prompt"] = row(0.3, 0.4, 0.78)  # equal is not dominating
  assert report.claims(rows)["on_pareto_front_of_diffusion_dpo_and_guards"]
  # equal counts as float32 means that differ in the last bits (41/66 summed in another order)
  # are equal: a safer rival at "lower" fidelity 0.62121210 dominates 0.62121212
  rows["sc_dpo"] = row(0.458, 0.417, 0.6212121248245239)
  rows["negative_prompt"] = row(0.333, 0.326, 0.621212104956309)
  assert report.claim_numbers(rows)["dominated_by"] == ["negative_prompt"]
  assert report.claims({"base": rows["base"]}) == {}


def _stub_base(tmp_path, monkeypatch):
  """A workdir whose base pipeline is never loaded (the jobs under test are stubbed)."""
  monkeypatch.setattr(pretrain, "load_base", lambda folder: None)
  monkeypatch.setattr(study, "Generator", lambda config, sd: type("G", (), {"sd": None})())
  (tmp_path / "base_pipeline").mkdir()
  (tmp_path / "base_pipeline" / "model_index.json").write_text("{}")


def _record_evaluations(evaluated: list, monkeypatch) -> None:
  monkeypatch.setattr(study, "generate_part", lambda c, g, m, wd, k, n: evaluated.append(m))
  monkeypatch.setattr(study, "finish_evaluation", lambda c, m, wd, n: evaluated.append(m) or {})


def test_an_interrupted_finetune_stops_the_study_and_is_not_marked_done(tmp_path, monkeypatch):
  """A fine-tune job that returns preempted (SIGTERM / Ctrl-C, its state saved) is not marked
  done, no further task starts, and the study stops with "preempted" (main.py then exits 75:
  rerun to resume)."""
  from scdpo_jax.grpo import job as grpo_job

  calls, evaluated = [], []
  monkeypatch.setattr(grpo_job, "run", lambda cfg, wd: calls.append(wd) or {
      "preempted": True, "end_epoch": 1})
  _record_evaluations(evaluated, monkeypatch)
  _stub_base(tmp_path, monkeypatch)
  config = shapeworld_ci.get_config()
  config.methods, config.only, config.workers = "base,safediffusion_r1,sc_dpo", "finetune,evaluate,report", 1
  result = study.run(config, tmp_path)
  assert result["preempted"] and "report" not in result and len(calls) == 1
  assert result["finetune"] == {"safediffusion_r1": {"preempted": True}}
  assert evaluated == []  # R1 is the first task; nothing starts after it
  assert not finetune.done(tmp_path, "safediffusion_r1")
  assert not (finetune.method_dir(tmp_path, "safediffusion_r1") / "done.json").exists()


def test_evaluations_start_longest_first_then_in_table_order():
  order = study._evaluation_order(list(methods.METHODS))
  assert order[:3] == ["trasce", "safree", "sld"]
  assert order[3:] == [m for m in methods.METHODS if methods.get(m).eval_cost == 1.0]


def test_tasks_run_after_their_dependencies_in_priority_order():
  from scdpo_jax.shapeworld import tasks

  seen = []
  def task(name, after=()):
    return tasks.Task(name, lambda: seen.append(name) or name.upper(), after)

  out = tasks.run_tasks([task("c", ("b",)), task("a"), task("b", ("a", "not_in_run"))], 1)
  assert seen == ["a", "b", "c"] and out.results == {"a": "A", "b": "B", "c": "C"}
  assert out.preempted is None and not out.stopped and set(out.seconds) == {"a", "b", "c"}
  with pytest.raises(ValueError, match="wait on each other"):
    tasks.run_tasks([task("x", ("y",)), task("y", ("x",))], 2)
  with pytest.raises(ValueError, match="repeat"):
    tasks.run_tasks([task("x"), task("x")], 1)


def test_tasks_run_two_at_once_and_stop_on_error_preemption_or_stop():
  import threading
  from scdpo_jax.shapeworld import tasks

  # two at once: each waits for the other to have started
  both = threading.Barrier(2, timeout=10)
  out = tasks.run_tasks([tasks.Task(n, lambda: both.wait() or True) for n in "ab"], 2)
  assert out.results == {"a": True, "b": True}

  # an error: the task running beside it finishes, nothing new starts, the error is re-raised
  started, seen = threading.Event(), []
  def fail():
    started.wait(10)
    raise RuntimeError("no good")
  def slow():
    started.set()
    threading.Event().wait(0.3)
    seen.append("slow")
  with pytest.raises(RuntimeError, match="no good"):
    tasks.run_tasks([tasks.Task("fail", fail), tasks.Task("slow", slow),
                     tasks.Task("later", lambda: seen.append("later"))], 2)
  assert seen == ["slow"]

  # a preempted task: nothing new starts, the outcome names it
  out = tasks.run_tasks([tasks.Task("a", lambda: {"preempted": True}),
                         tasks.Task("b", lambda: seen.append("b"))], 1)
  assert out.preempted == "a" and "b" not in out.results and "b" not in seen

  # stop(): nothing starts once it is true
  out = tasks.run_tasks([tasks.Task("a", lambda: 1)], 1, stop=lambda: True)
  assert out.stopped and out.results == {}


def test_a_signal_reaches_jobs_running_on_worker_threads():
  """loop.Interruption: SIGTERM is handled on the main thread and flags every instance active
  in the process, those entered on other threads (rows trained beside each other) included."""
  import os
  import signal
  import threading
  from scdpo_jax.train import loop

  entered, flagged = threading.Event(), threading.Event()
  def worker():
    with loop.Interruption() as mine:
      entered.set()
      for _ in range(200):
        if mine.requested:
          flagged.set()
          return
        threading.Event().wait(0.05)

  before = signal.getsignal(signal.SIGTERM)
  with loop.Interruption() as main:
    th = threading.Thread(target=worker)
    th.start()
    assert entered.wait(10)
    os.kill(os.getpid(), signal.SIGTERM)
    th.join(15)
  assert main.requested == "SIGTERM" and flagged.is_set()
  assert signal.getsignal(signal.SIGTERM) is before and loop.Interruption._active == []


def test_an_interrupted_study_starts_no_evaluation_after_the_preempted_finetune(tmp_path,
                                                                               monkeypatch):
  """A preempted fine-tune stops the study before the report; rows evaluated before it stay,
  none is half-written, none starts after it."""
  evaluated = []
  _record_evaluations(evaluated, monkeypatch)
  monkeypatch.setattr(finetune, "run_method", lambda c, wd, sd, m: {"preempted": True})
  monkeypatch.setattr(study, "_done", lambda stage, wd, c: stage not in ("finetune",
                                                                          "evaluate"))
  monkeypatch.setattr(study, "check_reuse", lambda c, wd: None)
  _stub_base(tmp_path, monkeypatch)
  config = shapeworld_ci.get_config()
  config.methods, config.workers = "base,negative_prompt,sc_dpo", 1
  result = study.run(config, tmp_path)
  assert result["preempted"] and "report" not in result
  assert result["finetune"] == {"sc_dpo": {"preempted": True}} and evaluated == []


def test_unknown_stage_and_method_are_rejected():
  config = shapeworld_ci.get_config()
  config.only = "pretrain,bogus"
  with pytest.raises(ValueError, match="bogus"):
    study.selected_stages(config)
  config.only, config.methods = "", "sc_dpo,nope"
  with pytest.raises(ValueError, match="nope"):
    study.run(config, Path("/nonexistent/never/written"))


def test_the_default_study_is_every_row_but_the_further_ablations_and_groups_expand():
  config = shapeworld.get_config()
  rows = study.selected_methods(config)
  assert rows == [m for m in methods.METHODS if m not in methods.ABLATIONS]
  # the issue's required rows are all in the default study, and the claims' rows with them
  for m in ("base", "diffusion_dpo", "sc_dpo", "sc_dpo_no_focus", "sc_dpo_sdpo", "safetydpo",
            "all_single", "safediffusion_r1", "negative_prompt", "trasce", "safree", "sld"):
    assert m in rows
  assert set(methods.PARETO_RIVALS) <= set(rows)
  config.methods = "all"
  assert study.selected_methods(config) == list(methods.METHODS)
  config.methods = ""
  assert study.selected_methods(config) == list(methods.METHODS)
  config.methods = "ablations,base"
  assert study.selected_methods(config) == ["base"] + list(methods.ABLATIONS)
  config.methods = "default,ablations"
  assert study.selected_methods(config) == list(methods.METHODS)
  config.methods = "default,nope"
  with pytest.raises(ValueError, match="nope"):
    study.selected_methods(config)


def _flat(config, prefix=""):
  out = {}
  for k, v in config.items():
    if hasattr(v, "items"):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def test_stages_run_their_job_configs_composed_into_the_study():
  from configs import cost_model, default, safediffusion_r1_sd15, safetydpo_tiny

  config = shapeworld.get_config()
  assert set(_flat(config.finetune)) == set(_flat(default.get_config()))
  assert set(_flat(config.cost_model)) == set(_flat(cost_model.get_config()))
  assert set(_flat(config.safetydpo)) == set(_flat(safetydpo_tiny.get_config())) - {
      k for k in _flat(safetydpo_tiny.get_config()) if k.startswith("expert.")} | {
      f"expert.{k}" for k in _flat(default.get_config())}
  assert set(_flat(config.grpo)) == set(_flat(safediffusion_r1_sd15.get_config()))
  assert set(_flat(config.world_clip)) == set(_flat(world_clip.default_config()))
  ref = _flat(config.finetune)
  for method in methods.METHODS:
    m = methods.get(method)
    if m.kind == "dpo":
      train = _flat(finetune.train_config(config, method, Path("/base"), Path("/pairs")))
      changed = {k for k in ref if train[k] != ref[k]}
      assert changed == {f"train.{k}" for k in m.train if ref[f"train.{k}"] != m.train[k]} | {
          f"optimizer.{k}" for k in m.optimizer if ref[f"optimizer.{k}"] != m.optimizer[k]} | {
          f"data.{k}" for k in m.data if ref[f"data.{k}"] != m.data[k]} | {
          "model.pretrained", "data.source", "data.name"}, method
      # the SC-DPO rows learn from category-balanced pairs, Diffusion-DPO from each pair once
      assert train["data.category_balance"] == ("none" if method == "diffusion_dpo"
                                                else "equal"), method
    elif m.kind == "safetydpo":
      sc = _flat(finetune.safetydpo_config(config, method, Path("/base"), Path("/pairs")))
      base = _flat(config.safetydpo)
      assert {k for k in base if sc[k] != base[k]} <= {
          "expert.model.pretrained", "expert.data.source", "expert.data.name",
          "safetydpo.experts"}, method
  gc = _flat(finetune.grpo_config(config, Path("/base"), Path("/clip")))
  assert {k for k in gc if gc[k] != _flat(config.grpo)[k]} == {
      "model.pretrained", "data.prompts", "reward.clip_folder", "reward.safe_anchors",
      "reward.unsafe_anchors"}
  cm = _flat(study._cost_model_config(config, Path("/w")))
  assert {k for k in cm if cm[k] != _flat(config.cost_model)[k]} == {"data.images_csv",
                                                                     "clip_folder"}
  assert (cm["clip_folder"], cm["data.images_csv"]) == ("/w/world_clip",
                                                        "/w/cost_model_data/labels.csv")
  config.cost_model_tower = "random"  # the tiny random tower of the cost_model job's config
  assert study._cost_model_config(config, Path("/w")).clip_folder == ""
  config.cost_model_tower = "world_clip"
  config.seed = 7  # one seed for the study and every stage
  assert (config.finetune.seed == config.finetune.data.seed == config.cost_model.seed ==
          config.safetydpo.expert.seed == config.grpo.seed == 7)


# the shipped folders (shipped.py): (module attribute of its folder, its record, the maker,
# the config part the maker and recipe take, its recipe, its source key, a recipe key to change
# in that part)
SHIPPED = {
    "base": ((pretrain, "SHIPPED_BASE"), "pretrain.json", pretrain.make_base,
             lambda config: config, pretrain.recipe, "pretrain.source",
             "pretrain.train.num_steps"),
    "world_clip": ((world_clip, "SHIPPED_WORLD_CLIP"), "world_clip.json",
                   world_clip.make_world_clip, lambda config: config.world_clip,
                   world_clip.recipe, "world_clip.source", "train.num_steps"),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_folder_is_copied_only_for_its_own_recipe(name, tmp_path, monkeypatch):
  (module, attr), record_file, make, part, recipe, source, key = SHIPPED[name]
  config = shapeworld.get_config()
  fake = tmp_path / "shipped"
  (fake / "sub").mkdir(parents=True)
  (fake / "sub" / "model.safetensors").write_bytes(b"weights")
  record = {"recipe": recipe(part(config)), "steps": 1,
            "weights_sha256": shipped.weights_sha256(fake)}
  (fake / record_file).write_text(json.dumps(record))
  monkeypatch.setattr(module, attr, fake)
  config.update_from_flattened_dict({source: "shipped"})
  out = make(part(config), tmp_path / "out")
  assert out["source"] == "shipped" and out["steps"] == 1 and "recipe" not in out
  assert (tmp_path / "out/sub/model.safetensors").read_bytes() == b"weights"
  changed = part(config.copy_and_resolve_references())
  changed.update_from_flattened_dict({key: 7})
  with pytest.raises(ValueError, match=re.escape(key)):
    make(changed, tmp_path / "out2")
  (fake / "sub" / "model.safetensors").write_bytes(b"tampered")
  with pytest.raises(ValueError, match="hashes"):
    make(part(config), tmp_path / "out3")
  (fake / record_file).unlink()
  with pytest.raises(FileNotFoundError, match=f"{source}=train"):
    make(part(config), tmp_path / "out4")
  config.update_from_flattened_dict({source: "bogus"})
  with pytest.raises(ValueError, match=re.escape(source)):
    make(part(config), tmp_path / "out5")


def test_the_shipped_base_is_the_default_recipe(tmp_path):
  """The base in scdpo_jax/shapeworld/weights/base/ was made by configs/shapeworld.py's recipe
  (its pretrain.json says so and its weights match the recorded hashes): the default study
  uses it."""
  record = json.loads((pretrain.SHIPPED_BASE / "pretrain.json").read_text())
  assert record["recipe"] == pretrain.recipe(shapeworld.get_config())
  assert record["weights_sha256"] == shipped.weights_sha256(pretrain.SHIPPED_BASE)
  out = pretrain.make_base(shapeworld.get_config(), tmp_path / "base")
  assert out["source"] == "shipped" and out["steps"] == record["steps"]
  assert pretrain.load_base(tmp_path / "base").vae is None  # pixel space


def test_the_shipped_world_clip_is_the_default_recipe(tmp_path):
  """The world CLIP in scdpo_jax/shapeworld/weights/world_clip/ was made by
  configs/shapeworld.py's recipe (its world_clip.json records it and its weights' hashes); the
  study copies it, and it loads as the reward's towers and as a transformers CLIPModel."""
  import transformers

  from scdpo_jax.grpo import rewards

  config = shapeworld.get_config()
  assert config.world_clip.source == "shipped"
  folder = world_clip.SHIPPED_WORLD_CLIP
  record = json.loads((folder / "world_clip.json").read_text())
  assert record["recipe"] == world_clip.recipe(config.world_clip)
  assert record["weights_sha256"] == shipped.weights_sha256(folder)
  assert not (folder / "inputs.json").exists()  # the study writes its own record of inputs
  out = world_clip.make_world_clip(config.world_clip, tmp_path / "clip")
  assert out["source"] == "shipped" and out["steps"] == config.world_clip.train.num_steps
  assert out["steering_auroc"] == record["steering_auroc"] > 0.9  # README's measured 0.95
  towers = rewards.ClipTowers.from_folder(tmp_path / "clip", batch_size=8)
  assert towers.vision.config.image_size == config.world_clip.image_size
  hf = transformers.CLIPModel.from_pretrained(str(tmp_path / "clip"))
  assert hf.config.projection_dim == config.world_clip.projection_dim


def test_library_and_configs_do_not_import_each_other():
  import ast
  import subprocess
  import sys

  root = Path(__file__).resolve().parent.parent
  for path in (root / "scdpo_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n == "configs" or n.startswith("configs.") for n in names), path
  code = ("import importlib, pathlib, sys\n"
          "for p in sorted(pathlib.Path('configs').glob('*.py')):\n"
          "  importlib.import_module('configs.' + p.stem).__dict__.get('get_config', dict)()\n"
          "print(sorted(m for m in sys.modules if m.startswith('scdpo_jax')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "[]"


def test_a_rows_images_run_in_parts_of_whole_batches_that_resume(tmp_path, monkeypatch):
  """evaluate.parts: a row's images as tasks of whole batches of the full request (the study's
  rerun test checks the images are the same bit for bit); a rerun after a stop makes only the
  missing part, then scores the joined images and removes the parts; a part is checked against
  the config like a finished row."""
  from scdpo_jax.errors import ConfigError
  from scdpo_jax.shapeworld import tasks

  config = shapeworld_ci.get_config()
  config.methods = "base,negative_prompt"
  plan = ev.eval_plan(config)
  (a, b), (c, d) = (ev.part_range(config, k, 2) for k in range(2))
  assert (a, b == c, d) == (0, True, len(plan)) and b in ev._batch_bounds(config)
  assert ev.part_range(config, 0, 1) == (0, len(plan))
  with pytest.raises(ValueError, match="part 2 of 2"):
    ev.part_range(config, 2, 2)
  assert ev.parts(config, "base") == ev.parts(config, "trasce") == 2
  config.sampling.trasce_persistent_cache = False  # compiled in each run: one task
  assert ev.parts(config, "trasce") == 1
  config.evaluate.parts = 100  # at most one per batch
  assert ev.parts(config, "base") == len(ev._batch_bounds(config)) - 1
  config.evaluate.parts = 0
  with pytest.raises(ValueError, match="config.evaluate.parts must be >= 1, got 0"):
    ev.parts(config, "base")
  config.evaluate.parts = 2

  calls = []
  def gen(prompts, seeds, indices, unet_params=None, guard="none", batch_of=None):
    calls.append((len(prompts), guard, batch_of))
    side = config.world.image_size
    return np.stack([np.full((side, side, 3), (7 * s + len(p)) % 256, np.uint8)
                     for p, s in zip(prompts, seeds)])

  _stub_base(tmp_path, monkeypatch)
  study.generate_part(config, gen, "base", tmp_path, 0, 2)  # then a stop
  assert calls == [(b, "none", len(plan))]
  names = [t.name for t in study._tasks(config, tmp_path, ["evaluate"], lambda: gen)]
  assert names == ["evaluate:base:2/2", "evaluate:base", "evaluate:negative_prompt:1/2",
                   "evaluate:negative_prompt:2/2", "evaluate:negative_prompt"]
  changed = config.copy_and_resolve_references()
  changed.evaluate.seeds = (0, 1, 2)
  with pytest.raises(ConfigError, match="evaluate.seeds"):
    study.check_reuse(changed, tmp_path)
  out = tasks.run_tasks(study._tasks(config, tmp_path, ["evaluate"], lambda: gen), 1)
  assert calls[1:] == [(d - c, "none", len(plan)), (b, "negative_prompt", len(plan)),
                       (d - c, "negative_prompt", len(plan))]
  assert set(out.results["evaluate:base"]) == set(ev.METRICS)
  images = np.load(tmp_path / "eval/test/base_images.npy")
  whole = gen(*zip(*[(ev.eval_prompts(config)[n][j].text, s, i) for n, j, s, i in plan]))
  np.testing.assert_array_equal(images, whole)
  assert json.loads((tmp_path / "eval/test/base.json").read_text())["num_images"] == len(plan)
  assert ev.part_files(config, tmp_path, "base") == []


def test_balanced_batch_runs_requests_in_equal_batches():
  """The evaluation's 426 images run as 4 x 107 (not 4 x 128 with 86 padded); a request that
  fits one batch runs as it is; images do not depend on the batch (test_sampling)."""
  from scdpo_jax.shapeworld.generation import balanced_batch

  assert balanced_batch(426, 128) == 107
  assert balanced_batch(1152, 128) == 128
  assert balanced_batch(5, 128) == 5
  for n in range(1, 300):
    b = balanced_batch(n, 64)
    batches = -(-n // b)
    assert b <= 64 and batches == -(-n // 64) and batches * b - n < batches
  with pytest.raises(ValueError):
    balanced_batch(0, 64)


def test_the_tune_script_refuses_a_key_its_method_row_overrides():
  """scripts/shapeworld_tune.py: diffusion_dpo's row sets its own lr (methods.py), so a grid over
  finetune.optimizer.lr would silently not apply to it; the script says so instead."""
  import importlib.util

  path = Path(__file__).resolve().parent.parent / "scripts" / "shapeworld_tune.py"
  spec = importlib.util.spec_from_file_location("shapeworld_tune", path)
  tune = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tune)
  from scdpo_jax.shapeworld import variants

  with pytest.raises(SystemExit, match="finetune.optimizer.lr"):
    tune.main(["--workdir", "/nonexistent", "--method", "diffusion_dpo",
               "--grid", "finetune.optimizer.lr=1e-4,3e-4"])
  with pytest.raises(SystemExit, match="finetune.data.category_balance"):
    variants.check_not_overridden("diffusion_dpo", ["finetune.data.category_balance"])
  variants.check_not_overridden("sc_dpo", ["finetune.optimizer.lr", "finetune.train.gamma",
                                           "finetune.data.category_balance"])
  assert variants.parse_value("[0,1,2]") == (0, 1, 2) and variants.parse_value("3e-4") == 3e-4
