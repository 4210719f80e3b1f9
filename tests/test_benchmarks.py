"""The GPU benchmark scripts run (tiny sizes, CPU): a broken script is found here, not on a lease."""

import subprocess
import sys
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args):
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])


def test_dpo_step_benchmark_runs_tiny():
  r = _run("benchmarks/bench_dpo_step.py", "ours", "--tiny", "--pairs", "2", "--dtype", "float32",
           "--attention", "xla")
  assert r["finite"] and r["pairs_per_s"] > 0 and r["impl"] == "scdpo-jax"


def test_sampling_benchmark_runs_tiny():
  r = _run("benchmarks/bench_sampling.py", "ours", "--tiny", "--dtype", "float32")
  assert r["finite"] and r["images_per_s"] > 0
