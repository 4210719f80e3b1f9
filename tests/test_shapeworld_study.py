"""The ShapeWorld study end to end on the shortened CI config: every stage runs, writes what it
promises, resumes without redoing work, and a single stage can run alone. Invariants only: the
CI models are barely trained, so no number is checked against a target."""

import json
import math

import pytest

from configs import shapeworld_ci
from scdpo_jax import jobs
from scdpo_jax.shapeworld import study

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("shapeworld_ci")
  config = shapeworld_ci.get_config()
  results = jobs.run(config, str(workdir))
  return config, workdir, results


def test_every_stage_ran_and_wrote_its_outputs(finished):
  _, workdir, results = finished
  assert set(study.STAGES) <= set(results)
  assert all(results[s] != "skipped" for s in study.STAGES)
  for path in ("base_pipeline/model_index.json", "base_pipeline/unet", "candidates/images.npy",
               "cost_model/cost_model_eval.json", "pairs/scp.npz", "pairs/human.npz",
               "report.json", "report.md", "pareto.png", "timings.json"):
    assert (workdir / path).exists(), path
  assert not (workdir / "base_pipeline" / "vae").exists()  # pixel space
  for method in study.FINETUNES:
    assert (workdir / "finetune" / method / "export" / "unet").is_dir()
    train = json.loads((workdir / "finetune" / method / "train_result.json").read_text())
    assert train["end_step"] == 2
  for method in study.METHODS:
    assert (workdir / "grids" / f"{method}.png").is_file()


def test_report_has_every_method_rate_per_category_and_the_auroc(finished):
  config, workdir, _ = finished
  report = json.loads((workdir / "report.json").read_text())
  assert report["split"] == "test"
  assert report["categories"] == list(config.world.categories) == [
      "magenta", "ring", "stripes", "red_on_black"]
  assert set(report["methods"]) == set(study.METHODS)
  assert set(report["not_run"]) == set(study.NOT_RUN) and not set(report["not_run"]) & set(
      report["methods"])
  for method, row in report["methods"].items():
    for metric in study.METRICS:
      top = 3.0 if metric == "reward_clean" else 1.0
      assert 0.0 <= row[metric] <= top, (method, metric)
      assert math.isfinite(row[metric + "_se"]) and row[metric + "_se"] >= 0.0
    assert set(row["per_category"]) == set(report["categories"])
    for cat, rates in row["per_category"].items():
      for metric in study.CATEGORY_METRICS:
        assert 0.0 <= rates[metric] <= 1.0, (method, cat, metric)
    # the overall harmful rate is the prompt-weighted mean of the per-category ones
    sets = study.eval_prompts(config)
    counts = {c: sum(p.category == c for p in sets["harmful"]) for c in report["categories"]}
    pooled = sum(counts[c] * row["per_category"][c]["unsafe_rate_harmful"]
                 for c in counts) / sum(counts.values())
    assert abs(pooled - row["unsafe_rate_harmful"]) < 1e-6, method  # float32 means
  auroc = report["cost_model"]["auroc"]
  assert auroc is not None and 0.0 <= auroc <= 1.0
  assert set(report["claims"]) == {"harmful_rate_at_most_half_of_base",
                                   "adversarial_rate_at_most_half_of_base",
                                   "clean_fidelity_at_least_95pct_of_base",
                                   "on_pareto_front_of_diffusion_dpo_and_guards",
                                   "dfm_on_beats_dfm_off"}
  md = (workdir / "report.md").read_text()
  for method in study.METHODS:
    assert md.count(f"| {method} |") == 2  # the overall and the per-category table
  from PIL import Image
  assert Image.open(workdir / "pareto.png").size[0] > 500
  n_prompts = sum(len(v) for v in study.eval_prompts(config).values())
  expected = n_prompts * len(config.evaluate.seeds) * config.evaluate.images_per_prompt
  assert report["methods"]["base"]["num_images"] == expected


def test_pairs_follow_the_scp_rule(finished):
  _, workdir, _ = finished
  import numpy as np
  scp = np.load(workdir / "pairs" / "scp.npz")
  harmful = scp["is_harmful"] == 1
  # harmful-prompt winners never cost more than their losers (costs are harm probabilities)
  assert np.all(scp["cost_w"][harmful] <= scp["cost_l"][harmful])
  human = np.load(workdir / "pairs" / "human.npz")
  assert np.all(human["reward_w"] >= human["reward_l"])


def test_rerun_skips_finished_stages_and_one_stage_runs_alone(finished):
  config, workdir, _ = finished
  stamp = {p: p.stat().st_mtime_ns for p in (workdir / "eval" / "test").glob("*.json")}
  stamp[workdir / "base_pipeline/pretrain.json"] = (
      workdir / "base_pipeline/pretrain.json").stat().st_mtime_ns
  again = jobs.run(config, str(workdir))
  for stage in study.STAGES[:-1]:
    assert again[stage] == "skipped", stage
  assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
  (workdir / "eval" / "test" / "trasce.json").unlink()
  only = config.copy_and_resolve_references()
  only.only = "evaluate"
  result = jobs.run(only, str(workdir))
  assert set(result["evaluate"]) == {"trasce"}
  assert "report" not in result and "pretrain" not in result


def test_a_subset_of_methods_on_the_validation_split_keeps_the_test_report(finished):
  config, workdir, _ = finished
  test_report = (workdir / "report.json").read_bytes()
  sub = config.copy_and_resolve_references()
  sub.methods, sub.evaluate.split = "base,negative_prompt", "validation"
  result = jobs.run(sub, str(workdir))
  assert set(result["evaluate"]) == {"base", "negative_prompt"}
  report = json.loads((workdir / "report_validation.json").read_text())
  assert report["split"] == "validation" and set(report["methods"]) == {"base",
                                                                        "negative_prompt"}
  assert "sc_dpo" in report["not_run"] and report["claims"] == {}
  assert (workdir / "report.json").read_bytes() == test_report
  assert (workdir / "pareto_validation.png").is_file()
  sub.methods = "base,bogus"
  with pytest.raises(ValueError, match="bogus"):
    study.selected_methods(sub)


def test_claims_and_pareto_dominance():
  row = lambda h, a, f: {"unsafe_rate_harmful": h, "unsafe_rate_adversarial": a,  # noqa: E731
                         "fidelity_clean": f}
  methods = {"base": row(0.8, 0.8, 0.8), "sc_dpo": row(0.3, 0.4, 0.78),
             "sc_dpo_no_focus": row(0.1, 0.1, 0.5), "diffusion_dpo": row(0.9, 0.9, 0.82),
             "negative_prompt": row(0.3, 0.4, 0.79)}
  got = study.claims(methods)
  assert got["harmful_rate_at_most_half_of_base"] and got["clean_fidelity_at_least_95pct_of_base"]
  assert got["adversarial_rate_at_most_half_of_base"]  # 0.4 <= 0.4
  assert not got["on_pareto_front_of_diffusion_dpo_and_guards"]  # negative_prompt dominates
  assert got["dfm_on_beats_dfm_off"]  # 0.78 - 0.35 > 0.5 - 0.1
  methods["negative_prompt"] = row(0.3, 0.4, 0.78)  # equal is not dominating
  assert study.claims(methods)["on_pareto_front_of_diffusion_dpo_and_guards"]


def test_unknown_stage_is_rejected():
  config = shapeworld_ci.get_config()
  config.only = "pretrain,bogus"
  with pytest.raises(ValueError, match="bogus"):
    study.selected_stages(config)


def _flat(config, prefix=""):
  out = {}
  for k, v in config.items():
    if hasattr(v, "items"):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def test_stages_run_their_job_configs_composed_into_the_study():
  from pathlib import Path

  from configs import cost_model, default

  config = shapeworld_ci.get_config()
  assert set(_flat(config.finetune)) == set(_flat(default.get_config()))
  assert set(_flat(config.cost_model)) == set(_flat(cost_model.get_config()))
  finetune = _flat(config.finetune)
  for method, changed in (("sc_dpo", set()), ("sc_dpo_no_focus", {"train.gamma"}),
                          ("diffusion_dpo", {"train.gamma", "train.safety_mode"})):
    train = _flat(study._train_config(config, method, Path("/base"), Path("/pairs")))
    assert {k for k in finetune if train[k] != finetune[k]} == changed | {
        "model.pretrained", "data.source", "data.name"}, method
  cm = _flat(study._cost_model_config(config, Path("/labels.csv")))
  assert {k for k in cm if cm[k] != _flat(config.cost_model)[k]} == {"data.images_csv"}
  config.seed = 7  # one seed for the study and every stage
  assert config.finetune.seed == config.finetune.data.seed == config.cost_model.seed == 7


def test_library_and_configs_do_not_import_each_other():
  import ast
  import subprocess
  import sys
  from pathlib import Path

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
