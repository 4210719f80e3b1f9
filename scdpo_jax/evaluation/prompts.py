"""Benchmark prompt sets from CSV: I2P and the adversarial nudity sets.

Column detection (first match, case-insensitive; each can be forced by name):

* prompt: `prompt`, `adv_prompt` (MMA-Diffusion), `sensitive prompt` (Ring-A-Bell),
  `prompts`, `text`, `caption`;
* seed: `sd_seed` (I2P), `evaluation_seed` (UnlearnDiffAtk / P4D), `seed`;
* guidance scale: `sd_guidance_scale` (I2P), `evaluation_guidance`, `guidance_scale`, `guidance`;
* categories: `categories` (I2P: comma-separated, e.g. "sexual, shocking"), `category`,
  `concept`.

A row without a seed / guidance value (or a CSV without the column) uses the fallback from the
config. Seeds are reduced mod 2^32 (JAX PRNG seeds are uint32). The CSV seed picks *our* JAX
noise: images are not pixel-identical to PyTorch runs that used `torch.manual_seed(seed)`.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Sequence

PROMPT_COLUMNS = ("prompt", "adv_prompt", "sensitive prompt", "prompts", "text", "caption")
SEED_COLUMNS = ("sd_seed", "evaluation_seed", "seed")
GUIDANCE_COLUMNS = ("sd_guidance_scale", "evaluation_guidance", "guidance_scale", "guidance")
CATEGORY_COLUMNS = ("categories", "category", "concept")


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One prompt of a set; `index` is its 0-based row in the CSV (stable across runs)."""

  index: int
  prompt: str
  seed: int
  guidance_scale: float
  categories: tuple[str, ...] = ()


def _find(header: Sequence[str], wanted: str, candidates: Sequence[str], what: str,
          path: Path, required: bool) -> str | None:
  lower = {h.strip().lower(): h for h in header}
  if wanted:
    if wanted.strip().lower() not in lower:
      raise ValueError(f"{path}: no {what} column {wanted!r}; columns are {list(header)}")
    return lower[wanted.strip().lower()]
  for name in candidates:
    if name in lower:
      return lower[name]
  if required:
    raise ValueError(f"{path}: found no {what} column (looked for {list(candidates)}); columns "
                     f"are {list(header)}; set the column name in the config")
  return None


def _number(text: str | None, parse, fallback):
  if text is None or not str(text).strip():
    return fallback
  try:
    value = parse(float(str(text).strip()))
  except ValueError:
    return fallback
  return fallback if isinstance(value, float) and math.isnan(value) else value


def split_categories(text: str | None) -> tuple[str, ...]:
  if not text:
    return ()
  return tuple(c.strip() for c in str(text).split(",") if c.strip())


def read_prompt_csv(path: str | Path, *, prompt_column: str = "", seed_column: str = "",
                    guidance_column: str = "", category_column: str = "",
                    default_seed: int = 42, default_guidance_scale: float = 7.5,
                    start: int = 0, limit: int = 0,
                    categories: Sequence[str] = ()) -> list[PromptRecord]:
  """Read a prompt CSV. `start`/`limit` (0 = all) select rows by position; `categories` keeps
  only prompts having at least one of them (after the start/limit selection)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"prompt CSV {path} does not exist")
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    p_col = _find(header, prompt_column, PROMPT_COLUMNS, "prompt", path, True)
    s_col = _find(header, seed_column, SEED_COLUMNS, "seed", path, False)
    g_col = _find(header, guidance_column, GUIDANCE_COLUMNS, "guidance", path, False)
    c_col = _find(header, category_column, CATEGORY_COLUMNS, "category", path, False)
    rows = list(reader)
  stop = len(rows) if limit <= 0 else min(len(rows), start + limit)
  wanted = {c.strip().lower() for c in categories}
  out = []
  for index in range(start, stop):
    row = rows[index]
    cats = split_categories(row.get(c_col)) if c_col else ()
    if wanted and not wanted & {c.lower() for c in cats}:
      continue
    out.append(PromptRecord(
        index=index, prompt=(row.get(p_col) or "").strip(),
        seed=_number(row.get(s_col) if s_col else None, int, int(default_seed)) % 2 ** 32,
        guidance_scale=_number(row.get(g_col) if g_col else None, float,
                               float(default_guidance_scale)),
        categories=cats))
  return out


def write_prompt_csv(path: str | Path, records: Sequence[PromptRecord]) -> Path:
  """Write records in I2P's column layout (prompt, categories, sd_seed, sd_guidance_scale)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["prompt", "categories", "sd_seed", "sd_guidance_scale"])
    for r in records:
      writer.writerow([r.prompt, ", ".join(r.categories), r.seed, r.guidance_scale])
  return path
