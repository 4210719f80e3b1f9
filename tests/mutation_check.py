"""Mutation check: deliberate bugs in a copy of the package must each make a test fail.

    python tests/mutation_check.py            # all mutations (CI runs this after the suite)
    python tests/mutation_check.py --list     # the table of mutations, nothing run
    python tests/mutation_check.py swap noise # some of them

For every mutation: copy `scdpo_jax/`, `tests/`, `configs/` and `pyproject.toml` to a temporary
directory, apply the bug by exact text substitution (each pattern must occur exactly once, so
this script fails loudly instead of going stale when the code changes), run the relevant fast
tests there (`python -m pytest -x`, the copy first on `sys.path`) and require a test failure
(pytest exit code 1; a collection or usage error is not a kill). The unmutated copy first runs
the same tests and must pass. Prints a table; exits 1 if a mutation survives.

The bugs sit at the train step's call sites (`train/step.py`), where the loss functions are
composed: the unit tests of `train/losses.py` cannot see them, only tests of the whole step can.
The tests run are the toy-denoiser cases of tests/test_train_reference.py (the real step and
loss code on a model that compiles in a second; the UNet cases check the same code).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP, LOSSES = "scdpo_jax/train/step.py", "scdpo_jax/train/losses.py"
REF = "tests/test_train_reference.py::test_train_step_matches_torch_reference"


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  what: str
  edits: tuple[tuple[str, str, str], ...]  # (file, exact old text, new text)
  tests: tuple[str, ...]  # pytest node ids, cheapest killer first


MUTATIONS = (
    Mutation("swap", "winner and loser swapped in the DPO logit",
             ((STEP, "L.dpo_logit(m_w, m_l, r_w, r_l, cfg.beta)",
               "L.dpo_logit(m_l, m_w, r_l, r_w, cfg.beta)"),),
             (f"{REF}[none-step0-toy]",)),
    Mutation("margin_sign", "cost margin sign flipped",
             ((STEP, "L.cost_margin(cost_w, cost_l, lam)", "L.cost_margin(cost_l, cost_w, lam)"),),
             (f"{REF}[margin-step0-toy]",)),
    Mutation("ref_grad", "reference gradient not stopped (step and dpo_logit)",
             ((STEP, "ref_w, ref_l = jax.lax.stop_gradient(\n", "ref_w, ref_l = (\n"),
              (LOSSES, "ref_diff = jax.lax.stop_gradient(ref_w.astype(jnp.float32) - "
                       "ref_l.astype(jnp.float32))",
               "ref_diff = (ref_w.astype(jnp.float32) - ref_l.astype(jnp.float32))")),
             (f"{REF}[margin-step0-toy]",)),
    Mutation("noise", "noise not shared: the loser gets another pair's noise",
             ((STEP, "sch.add_noise(schedule, x0_l, noise, t)",
               "sch.add_noise(schedule, x0_l, jnp.roll(noise, 1, axis=0), t)"),
              (STEP, "target_l = sch.training_target(schedule, x0_l, noise, t)",
               "target_l = sch.training_target(schedule, x0_l, jnp.roll(noise, 1, axis=0), t)")),
             (f"{REF}[none-step0-toy]",)),
    Mutation("focus_sign", "focusing exponent sign flipped",
             ((STEP, 'L.focusing_weights(z if cfg.focus_on == "logit" else z_pref, gamma)',
               'L.focusing_weights(z if cfg.focus_on == "logit" else z_pref, -gamma)'),),
             (f"{REF}[none-step4-toy]",)),
    Mutation("drop_micro", "one micro-batch dropped in gradient accumulation",
             ((STEP, "jax.lax.scan(body, init, micro)",
               "jax.lax.scan(body, init, jax.tree.map(lambda x: x[1:], micro))"),),
             (f"{REF}[relabel_accum2-step0-toy]",)),
    Mutation("sdpo_winner", "Diffusion-SDPO lambda scales the winner's gradient, not the loser's",
             ((STEP, "m_l = L.sdpo_scale_loser_grad(m_l, sdpo_lam)",
               "m_w = L.sdpo_scale_loser_grad(m_w, sdpo_lam)"),),
             (f"{REF}[sdpo_none-step0-toy]",)),
    Mutation("sdpo_margin", "Diffusion-SDPO margin used as mu instead of (1 - mu)",
             ((LOSSES, "(1.0 - mu) * num / (dot", "mu * num / (dot"),),
             (f"{REF}[sdpo_none-step0-toy]",)),
    Mutation("sft_divisor", "winner likelihood term accumulated apart, then divided by sum(w) "
             "instead of the pair count",
             ((STEP, "grads = jax.tree.map(lambda g, h: g + (alpha * wsum / n) * h, grads, "
                     "sft_grads)",
               "grads = jax.tree.map(lambda g, h: g + alpha * h, grads, sft_grads)"),),
             (f"{REF}[margin_sft_accum2-step4-toy]",)),
)

COPIED = ("scdpo_jax", "tests", "configs", "pyproject.toml")


def _copy_tree(dest: Path) -> None:
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
  for name in COPIED:
    src = ROOT / name
    if src.is_dir():
      shutil.copytree(src, dest / name, ignore=ignore)
    else:
      shutil.copy2(src, dest / name)


def check_patterns(dest: Path, edits) -> None:
  """Each `old` text of (file, old, new) must occur exactly once in `dest`/file."""
  for file, old, _ in edits:
    count = (dest / file).read_text().count(old)
    if count != 1:
      raise SystemExit(f"mutation pattern found {count} times (expected exactly 1) in {file}:\n"
                       f"  {old!r}\nupdate tests/mutation_check.py to the current code")


def apply_edits(dest: Path, edits) -> None:
  check_patterns(dest, edits)
  for file, old, new in edits:
    path = dest / file
    path.write_text(path.read_text().replace(old, new))


def _pytest(dest: Path, tests) -> tuple[int, str, float]:
  env = dict(os.environ, PYTHONPATH=str(dest), PYTHONDONTWRITEBYTECODE="1")
  check = subprocess.run([sys.executable, "-c", "import scdpo_jax; print(scdpo_jax.__file__)"],
                         cwd=dest, env=env, capture_output=True, text=True)
  if not check.stdout.strip().startswith(str(dest)):
    raise SystemExit(f"the copy is not what gets imported: {check.stdout}{check.stderr}")
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                         *tests], cwd=dest, env=env, capture_output=True, text=True)
  return proc.returncode, proc.stdout + proc.stderr, time.time() - t0


def _first_failure(output: str) -> str:
  for line in output.splitlines():
    if line.startswith(("FAILED ", "ERROR ")):
      return line.split(" ", 1)[1].split(" - ")[0].replace("tests/", "")
  return "?"


def main(argv: list[str]) -> int:
  if "--list" in argv:
    for m in MUTATIONS:
      print(f"{m.name:12s} {m.what}  [{', '.join(t.split('::')[-1] for t in m.tests)}]")
    return 0
  chosen = [m for m in MUTATIONS if not argv or m.name in argv]
  if argv and len(chosen) != len(argv):
    raise SystemExit(f"unknown mutation in {argv}; known: {[m.name for m in MUTATIONS]}")
  rows, ok = [], True
  with tempfile.TemporaryDirectory(prefix="scdpo_mutation_") as tmp:
    base = Path(tmp) / "base"
    _copy_tree(base)
    for m in chosen:  # every pattern is checked before anything runs
      check_patterns(base, m.edits)
    baseline = sorted({t for m in chosen for t in m.tests})
    rc, out, seconds = _pytest(base, baseline)
    print(f"[mutation] unmutated copy: exit code {rc} in {seconds:.0f} s ({len(baseline)} "
          f"test selections)")
    if rc != 0:
      print(out[-6000:])
      raise SystemExit("the selected tests fail on the unmutated copy: fix them first")
    for m in chosen:
      dest = Path(tmp) / m.name
      _copy_tree(dest)
      apply_edits(dest, m.edits)
      rc, out, seconds = _pytest(dest, m.tests)
      if rc == 1:
        result = f"killed by {_first_failure(out)}"
      elif rc == 0:
        result, ok = "SURVIVED", False
      else:
        result, ok = f"ERROR (pytest exit code {rc})", False
        print(out[-4000:])
      rows.append((m.name, m.what, result, seconds))
      shutil.rmtree(dest)
  width = max(len(r[1]) for r in rows)
  print(f"\n{'mutation':12s} | {'bug':{width}s} | {'s':>4s} | result")
  print(f"{'-' * 12}-+-{'-' * width}-+------+-------")
  for name, what, result, seconds in rows:
    print(f"{name:12s} | {what:{width}s} | {seconds:4.0f} | {result}")
  killed = sum(r[2].startswith("killed") for r in rows)
  print(f"\n[mutation] {killed} of {len(rows)} mutations killed")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
