"""Tune the ShapeWorld study's SC-DPO configuration on the VALIDATION split (never the test split).

  python scripts/shapeworld_tune.py --workdir runs/shapeworld_tune \
      --grid finetune.train.margin_form=bonus,offset --grid finetune.train.gamma=0,1,2

Runs the study's shared stages once (pretrain -> candidates -> world CLIP -> cost model ->
pairs) in
<workdir>/shared with configs/shapeworld.py (plus --set overrides), then, for every combination
of the --grid values, the `sc_dpo` fine-tune and its evaluation on the validation split in
<workdir>/variants/<name>/ (the shared stages linked in), and the base model once. Writes
<workdir>/tune.json and tune.md: one row per variant (rows of earlier grids run in the same
workdir are kept) with the validation metrics and the
selection score. The score is the study's DFM criterion, stated before any run: clean fidelity
minus the mean of the harmful and adversarial unsafe rates (report.dfm_score). Copy the chosen
values into configs/shapeworld.py by hand; the test split is only run by the study itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, type=Path)
  parser.add_argument("--grid", action="append", default=[],
                      help="key=v1,v2,... (a config key of configs/shapeworld.py)")
  parser.add_argument("--set", action="append", default=[],
                      help="key=value applied to every run (shared stages included); a "
                      "list as JSON, e.g. evaluate.seeds=[0,1,2,3,4,5]")
  parser.add_argument("--method", default="sc_dpo", help="the method whose config is tuned")
  args = parser.parse_args(argv)

  from absl import logging

  from configs import shapeworld
  from scdpo_jax import cli, files
  from scdpo_jax.shapeworld import report as report_lib, study, variants

  logging.set_verbosity(logging.INFO)
  cli.enable_compilation_cache()  # as main.py: each variant's programs are the same
  fixed = variants.parse_assignments(args.set)
  grid = [(k, [variants.parse_value(x) for x in v.split(",")])
          for k, v in (g.split("=", 1) for g in args.grid)]
  variants.check_not_overridden(args.method, [k for k, _ in fixed + grid])

  def config_for(values):
    config = shapeworld.get_config()
    for k, v in fixed + list(values):
      variants.set_key(config, k, v)
    config.evaluate.split = "validation"
    return config

  shared = args.workdir / "shared"
  base_cfg = config_for([])
  base_cfg.only, base_cfg.methods = variants.SHARED_STAGES + ",evaluate", "base"
  study.run(base_cfg, shared)
  rows = {"base": json.loads((shared / "eval/validation/base.json").read_text())}
  previous = args.workdir / "tune.json"
  if previous.is_file():  # another grid in the same workdir: its rows stay in the table
    rows = {**json.loads(previous.read_text())["rows"], **rows}
  for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in grid]):
    name = "_".join(f"{k.split('.')[-1]}={v}" for k, v in combo) or "default"
    wd = args.workdir / "variants" / name
    variants.link_shared(shared, wd)
    config = config_for(combo)
    config.only, config.methods = "finetune,evaluate", args.method
    study.run(config, wd)
    rows[name] = json.loads((wd / f"eval/validation/{args.method}.json").read_text())
    rows[name]["values"] = dict(combo)
  out = {"method": args.method, "split": "validation", "fixed": dict(fixed),
         "grid": dict(grid), "rows": rows,
         "score": {n: report_lib.dfm_score(r) for n, r in rows.items()}}
  files.write_json(args.workdir / "tune.json", out)
  lines = ["| variant | unsafe harmful | unsafe adversarial | fidelity clean | reward clean | "
           "score |", "|---|---|---|---|---|---|"]
  for n, r in rows.items():
    lines.append(f"| {n} | {r['unsafe_rate_harmful']:.3f} | {r['unsafe_rate_adversarial']:.3f}"
                 f" | {r['fidelity_clean']:.3f} | {r['reward_clean']:.3f} | "
                 f"{out['score'][n]:.3f} |")
  text = "\n".join(lines) + "\n"
  files.write_text(args.workdir / "tune.md", text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
