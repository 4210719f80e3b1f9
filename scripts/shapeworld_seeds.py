"""Retrain the ShapeWorld study's rows with other training seeds on the same data, and report
each seed's numbers and claims and their mean +- standard error over the seeds.

  python scripts/shapeworld_seeds.py --workdir runs/seeds --shared runs/shapeworld \
      --seeds 0,1,2 --methods base,sc_dpo,sc_dpo_no_focus,sc_dpo_margin

The study's table trains each row once (config.training_seed, default config.seed = 0), so its
standard errors cover the sampling seeds only. This script answers the other question: does a
claim survive another training run? The data stages (base, candidates, world CLIP, cost model,
pairs) are made once in <workdir>/shared, or linked from an existing study workdir with
--shared (its input records are checked: shapeworld/inputs.py); then, for every training seed N,
<workdir>/seed<N>/ trains and evaluates the rows with config.training_seed = N on the split of
config.evaluate.split (the held-out test split by default: nothing here is tuned) and writes its
report. Writes <workdir>/seeds.json and seeds.md. A claim that needs a row not run here (the
Pareto front needs Diffusion-DPO and the guards) is left out of that seed's claims.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCORE = ("unsafe_rate_harmful", "unsafe_rate_adversarial", "fidelity_clean", "reward_clean")


def summarize(per_seed: dict[int, dict[str, dict]], claims: dict[int, dict]) -> dict:
  """{method: {metric: {"per_seed": [...], "mean": m, "se": s}}} over the training seeds, the
  DFM score (report.dfm_score) included, and each seed's claims."""
  from scdpo_jax.shapeworld import report as report_lib

  seeds = sorted(per_seed)
  methods = list(per_seed[seeds[0]])
  out: dict = {"training_seeds": seeds, "methods": {}, "claims": {str(s): claims[s] for s in seeds}}
  for m in methods:
    rows = [per_seed[s][m] for s in seeds]
    values = {k: [float(r[k]) for r in rows] for k in SCORE}
    values["dfm_score"] = [float(report_lib.dfm_score(r)) for r in rows]
    out["methods"][m] = {k: {"per_seed": v, "mean": statistics.fmean(v),
                             "se": statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0}
                         for k, v in values.items()}
  return out


def markdown(summary: dict, split: str) -> str:
  seeds = summary["training_seeds"]
  lines = [f"# ShapeWorld rows over training seeds {', '.join(map(str, seeds))} ({split} split)",
           "", "Mean +- standard error over the training seeds (each seed's value is the mean "
           "over the study's sampling seeds); score = fidelity - mean unsafe rate (the DFM "
           "criterion).", "",
           "| method | " + " | ".join(SCORE + ("dfm_score",)) + " |",
           "|---|" + "---|" * (len(SCORE) + 1)]
  for m, v in summary["methods"].items():
    lines.append(f"| {m} | " + " | ".join(
        f"{v[k]['mean']:.3f} +- {v[k]['se']:.3f}" for k in SCORE + ("dfm_score",)) + " |")
  lines += ["", "Per training seed (unsafe harmful / unsafe adversarial / fidelity):", "",
            "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|" + "---|" * len(seeds)]
  for m, v in summary["methods"].items():
    lines.append(f"| {m} | " + " | ".join(
        f"{v['unsafe_rate_harmful']['per_seed'][i]:.3f} / "
        f"{v['unsafe_rate_adversarial']['per_seed'][i]:.3f} / "
        f"{v['fidelity_clean']['per_seed'][i]:.3f}" for i in range(len(seeds))) + " |")
  lines += ["", "Claims per training seed (those whose rows were run):", ""]
  for s in seeds:
    claims = summary["claims"][str(s)]
    lines.append(f"* seed {s}: " + (", ".join(f"{k} {v}" for k, v in claims.items())
                                   if claims else "none (sc_dpo or base not run)"))
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, type=Path)
  parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
  parser.add_argument("--methods", default="base,sc_dpo,sc_dpo_no_focus",
                      help="rows (shapeworld/methods.py), comma-separated")
  parser.add_argument("--shared", type=Path, default=None,
                      help="a study workdir whose data stages to link (default: made in "
                      "<workdir>/shared)")
  parser.add_argument("--config", default="configs/shapeworld.py",
                      help="configs/shapeworld.py or configs/shapeworld_ci.py")
  parser.add_argument("--set", action="append", default=[],
                      help="key=value applied to every run; a list as JSON, e.g. "
                      "evaluate.seeds=[0,1,2,3,4,5]")
  args = parser.parse_args(argv)

  import importlib

  from absl import logging

  from scdpo_jax import cli, files
  from scdpo_jax.shapeworld import evaluation as ev, study, variants

  logging.set_verbosity(logging.INFO)
  cli.enable_compilation_cache()
  config_module = importlib.import_module(
      Path(args.config).with_suffix("").as_posix().replace("/", "."))
  seeds = [int(s) for s in args.seeds.split(",")]
  fixed = variants.parse_assignments(args.set)
  probe = config_module.get_config()
  probe.methods = args.methods
  try:  # the study's own reading of config.methods (rows and groups)
    rows = study.selected_methods(probe)
  except ValueError as e:
    raise SystemExit(f"--methods: {e}") from None
  for m in rows:
    variants.check_not_overridden(m, [k for k, _ in fixed])

  def config_for(seed: int | None):
    config = config_module.get_config()
    for k, v in fixed:
      variants.set_key(config, k, v)
    config.methods = args.methods
    if seed is not None:
      config.training_seed = seed  # the rows' seeds only: the data stages keep config.seed
    return config

  shared = args.shared
  if shared is None:
    shared = args.workdir / "shared"
    data = config_for(None)
    data.only = variants.SHARED_STAGES
    study.run(data, shared)
  per_seed, claims = {}, {}
  split = ev.eval_split(config_for(None))
  for seed in seeds:
    wd = args.workdir / f"seed{seed}"
    variants.link_shared(shared, wd)
    config = config_for(seed)
    config.only = "finetune,evaluate,report"
    study.run(config, wd)
    report = json.loads((wd / f"report{ev.report_suffix(config)}.json").read_text())
    per_seed[seed] = {m: report["methods"][m] for m in args.methods.split(",")}
    claims[seed] = report.get("claims", {})
  summary = summarize(per_seed, claims)
  summary["split"], summary["config"] = split, args.config
  files.write_json(args.workdir / "seeds.json", summary)
  text = markdown(summary, split)
  files.write_text(args.workdir / "seeds.md", text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
