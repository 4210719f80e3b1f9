"""Converters from the public preference-data shapes to the pair dataset of `tfds_pairs.py`.

One command per input shape (`python -m scdpo_jax.data.convert <kind> ...`):

  pickapic  --input DIR       Pick-a-Pic style: every *.parquet / *.jsonl file under DIR, with
                              columns caption, jpg_0, jpg_1, label_0 (label_1 optional). jpg_* hold
                              the encoded image bytes (parquet, as on the Hub) or a path relative
                              to the file's folder. label_0 = 1 -> image 0 wins, 0 -> image 1 wins,
                              0.5 -> tie: dropped and counted. Clean prompts (is_harmful = 0).
  coprov2   --csv F --images D  CoProV2 style. Winner = image of the safe prompt, loser = image of
                              the unsafe prompt, conditioned on the *unsafe* prompt, category kept,
                              is_harmful = 1. Two CSV shapes are read:
                                paired: one row per pair, columns unsafe_prompt (or prompt),
                                        unsafe_image, safe_image, [safe_prompt], [category];
                                long:   one row per image, columns prompt, image, [category],
                                        image names starting `u_<key>` (unsafe) / `s_<key>` (safe),
                                        joined on <key> (the released CoProV2 naming).
  csv       --csv F --images D  generic: columns prompt, image_w, image_l and optionally
                              tag (harmful|clean|1|0) or is_harmful, category, reward_w, reward_l,
                              cost_w, cost_l, id, hflip_ok.

Common options: --output DIR (a new folder), --split NAME (default train), --tokenizer DIR (a
CLIPTokenizer folder, or an SD folder with tokenizer/; adds input_ids), --max_length,
--max_bad_fraction (default 0.01), --workers (threads decoding images).

Row accounting: every input row ends in exactly one of *used*, *tie dropped* or *bad* (by reason:
missing_image, unreadable_image, bad_label, missing_prompt, bad_json, unpaired), with its row id
(`<file>:<row>`, rows 0-based, header excluded). The report is printed and written to
`<output>/conversion_report.json` (and into the dataset's metadata). If bad rows exceed
`max_bad_fraction` of all rows, the run fails (TooManyBadRowsError) and no dataset is left.
Every image is fully decoded once to detect unreadable files; the original encoded bytes are
stored unchanged. `hflip_ok` is 0 when the prompt contains the word "left" or "right".
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import csv
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from scdpo_jax import files
from scdpo_jax.data import tfds_pairs
from scdpo_jax.data.images import UnreadableImageError, decode_image

REPORT_NAME = "conversion_report.json"
_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_COPRO_SIDE = re.compile(r"^(?P<side>[us])_(?P<key>[^_.]+)")


class BadRow(ValueError):
  """A row that cannot become a pair; `reason` is one of the report's reason names."""

  def __init__(self, reason: str, message: str, culprit: int = 0):
    super().__init__(message)
    self.reason = reason
    self.culprit = culprit  # which of a multi-row task's rows is at fault


class TooManyBadRowsError(RuntimeError):
  pass


@dataclasses.dataclass
class ConversionReport:
  """Where every input row went. Invariant: rows_total = rows_used + ties + bad rows."""

  kind: str
  source: str
  rows_total: int = 0
  rows_used: int = 0
  pairs_written: int = 0
  ties_dropped: list[str] = dataclasses.field(default_factory=list)
  bad_rows: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  first_error: dict[str, str] = dataclasses.field(default_factory=dict)
  max_bad_fraction: float = 0.01

  def add_bad(self, reason: str, row_id: str, message: str) -> None:
    self.bad_rows.setdefault(reason, []).append(row_id)
    self.first_error.setdefault(reason, f"{row_id}: {message}")

  @property
  def bad_count(self) -> int:
    return sum(len(v) for v in self.bad_rows.values())

  @property
  def bad_fraction(self) -> float:
    return self.bad_count / self.rows_total if self.rows_total else 0.0

  def check(self) -> None:
    """Raise if rows are unaccounted for or if there are too many bad rows."""
    accounted = self.rows_used + len(self.ties_dropped) + self.bad_count
    if accounted != self.rows_total:
      raise RuntimeError(f"conversion bookkeeping error: {self.rows_total} rows read but "
                         f"{accounted} accounted for ({self.summary()})")
    if self.bad_fraction > self.max_bad_fraction:
      raise TooManyBadRowsError(
          f"{self.bad_count} of {self.rows_total} rows are bad ({self.bad_fraction:.2%} > "
          f"max_bad_fraction {self.max_bad_fraction:.2%}): {self.summary()}")

  def summary(self) -> str:
    parts = [f"{self.kind}: {self.rows_total} rows -> {self.pairs_written} pairs"]
    if self.ties_dropped:
      parts.append(f"{len(self.ties_dropped)} ties dropped")
    for reason, ids in sorted(self.bad_rows.items()):
      shown = ", ".join(ids[:5]) + (f", ... (+{len(ids) - 5})" if len(ids) > 5 else "")
      parts.append(f"{len(ids)} bad ({reason}: {shown})")
    return "; ".join(parts)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["bad_count"] = self.bad_count
    d["bad_fraction"] = self.bad_fraction
    return d


# ---------------------------------------------------------------------------------------------
# Row parsing helpers
# ---------------------------------------------------------------------------------------------


def hflip_allowed(prompt: str) -> int:
  """0 when a horizontal flip could contradict the prompt (it mentions left or right), else 1."""
  return 0 if _LEFT_RIGHT.search(prompt) else 1


def read_image_ref(ref: Any, base_dir: Path) -> bytes:
  """Encoded image bytes from bytes, a {'bytes': ...} struct (Hub parquet), a `base64:` string
  or a file path (relative to `base_dir`); decoded once to make sure it is readable."""
  if isinstance(ref, dict):
    ref = ref.get("bytes") or ref.get("path")
  if ref is None or (isinstance(ref, float) and math.isnan(ref)) or (
      isinstance(ref, (str, bytes)) and len(ref) == 0):
    raise BadRow("missing_image", "no image given")
  if isinstance(ref, (bytes, bytearray, memoryview)):
    data = bytes(ref)
  elif isinstance(ref, str) and ref.startswith("base64:"):
    try:
      data = base64.b64decode(ref[len("base64:"):], validate=True)
    except ValueError as e:
      raise BadRow("unreadable_image", f"bad base64 image: {e}") from e
  else:
    path = Path(str(ref))
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
      raise BadRow("missing_image", f"image file {path} not found")
    data = path.read_bytes()
  try:
    decode_image(data)
  except UnreadableImageError as e:
    raise BadRow("unreadable_image", str(e)) from e
  return data


def parse_float(value: Any, what: str) -> float:
  """A finite float, or NaN for an empty value; anything else is a bad label."""
  if value is None or (isinstance(value, str) and value.strip() == ""):
    return math.nan
  try:
    out = float(value)
  except (TypeError, ValueError) as e:
    raise BadRow("bad_label", f"{what}={value!r} is not a number") from e
  if math.isinf(out):
    raise BadRow("bad_label", f"{what}={value!r} is infinite")
  return out


def parse_tag(value: Any) -> int:
  """harmful/unsafe/1/true -> 1, clean/safe/0/false -> 0."""
  v = str(value).strip().lower()
  if v in ("harmful", "unsafe", "1", "true", "yes"):
    return 1
  if v in ("clean", "safe", "0", "false", "no"):
    return 0
  raise BadRow("bad_label", f"tag {value!r} is not harmful/clean/1/0")


def _prompt(value: Any) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    raise BadRow("missing_prompt", "no prompt/caption")
  return str(value)


# ---------------------------------------------------------------------------------------------
# Driver shared by all converters
# ---------------------------------------------------------------------------------------------

# A row task: (row ids it consumes, function returning a pair example dict, or None for a tie,
# or raising BadRow). Most tasks consume one row; a CoProV2 long-shape pair consumes two.
RowTask = tuple[tuple[str, ...], Callable[[], "dict | None"]]


def _run_tasks(tasks: Iterable[RowTask], report: ConversionReport, workers: int
               ) -> Iterator[dict]:
  """Run row tasks (in threads, order kept) and account for each of their rows in `report`.

  A BadRow marks its culprit row with its reason and the task's other rows as `unpaired`.
  """

  def run(task: RowTask):
    row_ids, fn = task
    try:
      return row_ids, fn(), None
    except BadRow as e:
      return row_ids, None, e

  def chunks(it, n):
    chunk = []
    for x in it:
      chunk.append(x)
      if len(chunk) == n:
        yield chunk
        chunk = []
    if chunk:
      yield chunk

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for chunk in chunks(tasks, 64 * max(1, workers)):
      for row_ids, example, error in pool.map(run, chunk):
        report.rows_total += len(row_ids)
        if error is not None:
          culprit = row_ids[error.culprit]
          report.add_bad(error.reason, culprit, str(error))
          for other in row_ids:
            if other != culprit:
              report.add_bad("unpaired", other, f"partner row {culprit} is bad ({error.reason})")
        elif example is None:
          report.ties_dropped.extend(row_ids)
        else:
          report.rows_used += len(row_ids)
          yield example


class PromptTokenizer:
  """Optional prompt tokenisation (adds input_ids)."""

  def __init__(self, folder: str | None, max_length: int | None):
    self.tokenizer = None
    if folder:
      from scdpo_jax.models import tokenizer as tok
      path = Path(folder)
      if (path / "tokenizer").is_dir():
        path = path / "tokenizer"
      self.tokenizer = tok.load_tokenizer(path, max_length)
      self.length = int(max_length or self.tokenizer.model_max_length)

  @property
  def token_length(self) -> int:
    return self.length if self.tokenizer is not None else 0

  def __call__(self, prompt: str) -> np.ndarray | None:
    if self.tokenizer is None:
      return None
    from scdpo_jax.models import tokenizer as tok
    return tok.tokenize(self.tokenizer, [prompt], self.length)[0]


def convert(kind: str, tasks: Iterable[RowTask], output: str | Path, *, source: str,
            split: str = "train", tokenizer: str | None = None, max_length: int | None = None,
            max_bad_fraction: float = 0.01, workers: int = 4) -> tuple[Path, ConversionReport]:
  """Run `tasks`, write the pairs as a dataset in `output`, return (dataset dir, report).

  The report is written whether or not the run succeeds.
  """
  output = Path(output)
  output.mkdir(parents=True, exist_ok=True)
  report = ConversionReport(kind=kind, source=source, max_bad_fraction=max_bad_fraction)
  tok = PromptTokenizer(tokenizer, max_length)
  schema = tfds_pairs.PairSchema(token_length=tok.token_length, images=True)

  def examples():
    for ex in _run_tasks(tasks, report, workers):
      if tok.tokenizer is not None:
        ex["input_ids"] = tok(ex["prompt"])
      report.pairs_written += 1
      yield ex
    _write_report(output, report)
    report.check()  # raising here aborts the tfds write: no dataset is left behind

  try:
    path = tfds_pairs.write_pairs(
        output, {split: examples()}, schema,
        description=f"SC-DPO preference pairs converted from {kind}: {source}",
        metadata={"conversion_report": _report_metadata(report)})
  except Exception:
    _write_report(output, report)
    raise
  # tfds stored the metadata dict before the generator ran: rewrite it with final numbers.
  _update_metadata(path, {"conversion_report": _report_metadata(report)})
  _write_report(output, report)
  print(report.summary())
  return path, report


def _report_metadata(report: ConversionReport) -> dict:
  return report.to_dict()


def _write_report(output: Path, report: ConversionReport) -> None:
  files.write_json(output / REPORT_NAME, report.to_dict())


def _update_metadata(dataset_dir: Path, values: dict) -> None:
  meta_path = dataset_dir / "metadata.json"
  meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
  meta.update(values)
  files.write_json(meta_path, meta, indent=None)


# ---------------------------------------------------------------------------------------------
# Pick-a-Pic
# ---------------------------------------------------------------------------------------------

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


def _pickapic_pair(row: dict, row_id: str, base_dir: Path) -> dict | None:
  prompt = _prompt(row.get("caption"))
  label_0 = parse_float(row.get("label_0"), "label_0")
  if math.isnan(label_0) or label_0 not in (0.0, 0.5, 1.0):
    raise BadRow("bad_label", f"label_0={row.get('label_0')!r} is not 0, 0.5 or 1")
  if "label_1" in row and row["label_1"] is not None:
    label_1 = parse_float(row["label_1"], "label_1")
    if not math.isnan(label_1) and label_0 + label_1 != 1.0:
      raise BadRow("bad_label", f"label_0={label_0} and label_1={label_1} do not sum to 1")
  if label_0 == 0.5:
    return None
  img0 = read_image_ref(row.get("jpg_0"), base_dir)
  img1 = read_image_ref(row.get("jpg_1"), base_dir)
  winner, loser = (img0, img1) if label_0 == 1.0 else (img1, img0)
  return {"pair_id": f"pickapic:{row_id}", "prompt": prompt, "is_harmful": 0, "category": "",
          "image_w": winner, "image_l": loser, "hflip_ok": hflip_allowed(prompt)}


def pickapic_tasks(input_dir: str | Path) -> Iterator[RowTask]:
  """Row tasks for every *.parquet / *.jsonl file under `input_dir` (sorted, recursive)."""
  input_dir = Path(input_dir)
  files = sorted(p for p in input_dir.rglob("*") if p.suffix in (".parquet", ".jsonl"))
  if not files:
    raise FileNotFoundError(f"no *.parquet or *.jsonl files under {input_dir}")
  for path in files:
    rel = path.relative_to(input_dir).as_posix()
    if path.suffix == ".parquet":
      import pyarrow.parquet as pq
      pf = pq.ParquetFile(path)
      names = set(pf.schema_arrow.names)
      missing = [c for c in PICKAPIC_COLUMNS if c not in names]
      if missing:
        raise ValueError(f"{path}: missing Pick-a-Pic columns {missing}; has {sorted(names)}")
      cols = list(PICKAPIC_COLUMNS) + (["label_1"] if "label_1" in names else [])
      i = 0
      for batch in pf.iter_batches(batch_size=64, columns=cols):
        for row in batch.to_pylist():
          row_id = f"{rel}:{i}"
          yield (row_id,), (lambda row=row, row_id=row_id, base=path.parent: _pickapic_pair(
              row, row_id, base))
          i += 1
    else:
      with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
          row_id = f"{rel}:{i}"
          yield (row_id,), (lambda line=line, row_id=row_id, base=path.parent: _pickapic_pair(
              _json_row(line), row_id, base))


def _json_row(line: str) -> dict:
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise BadRow("bad_json", f"not a JSON object: {e}") from e
  if not isinstance(row, dict):
    raise BadRow("bad_json", "line is not a JSON object")
  return row


# ---------------------------------------------------------------------------------------------
# CoProV2
# ---------------------------------------------------------------------------------------------


def _read_csv(path: str | Path) -> tuple[list[str], list[dict]]:
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def coprov2_tasks(csv_path: str | Path, images_dir: str | Path) -> list[RowTask]:
  """Row tasks for a CoProV2 CSV (paired or long shape, see the module docstring).

  In the long shape one task consumes the u_ and the s_ row of a key; a row without a partner
  (or with a duplicate key, or an unparsable name) is reported as `unpaired`.
  """
  csv_path, images_dir = Path(csv_path), Path(images_dir)
  columns, rows = _read_csv(csv_path)
  name = csv_path.name
  if {"unsafe_image", "safe_image"} <= set(columns):
    prompt_col = "unsafe_prompt" if "unsafe_prompt" in columns else "prompt"
    if prompt_col not in columns:
      raise ValueError(f"{csv_path}: paired CoProV2 CSV needs unsafe_prompt (or prompt)")

    def paired(row, row_id):
      prompt = _prompt(row.get(prompt_col))
      return {"pair_id": f"coprov2:{row_id}", "prompt": prompt, "is_harmful": 1,
              "category": (row.get("category") or "").strip(),
              "image_w": read_image_ref(row.get("safe_image"), images_dir),
              "image_l": read_image_ref(row.get("unsafe_image"), images_dir),
              "hflip_ok": hflip_allowed(prompt)}

    return [((f"{name}:{i}",), (lambda r=r, i=i: paired(r, f"{name}:{i}")))
            for i, r in enumerate(rows)]
  if not {"prompt", "image"} <= set(columns):
    raise ValueError(f"{csv_path}: not a CoProV2 CSV: need columns (unsafe_prompt|prompt, "
                     f"unsafe_image, safe_image) or (prompt, image[, category]); has {columns}")
  return _coprov2_long_tasks(rows, name, images_dir)


def _unpaired(message: str) -> Callable[[], None]:
  def fail():
    raise BadRow("unpaired", message)
  return fail


def _coprov2_long_tasks(rows: list[dict], name: str, images_dir: Path) -> list[RowTask]:
  """Tasks in order of first appearance: a pair at the position of its first row."""
  sides: dict[str, dict[str, tuple[str, dict]]] = {}
  order: list[tuple[str, Any]] = []  # ("key", key) or ("task", RowTask)
  for i, row in enumerate(rows):
    row_id = f"{name}:{i}"
    m = _COPRO_SIDE.match(Path(row.get("image") or "").name)
    if not m:
      order.append(("task", ((row_id,), _unpaired(
          f"image name {row.get('image')!r} does not start with u_<key> or s_<key>"))))
      continue
    entry = sides.setdefault(m["key"], {})
    if m["side"] in entry:
      order.append(("task", ((row_id,), _unpaired(
          f"second {m['side']}_ image for key {m['key']!r}"))))
      continue
    if not entry:
      order.append(("key", m["key"]))
    entry[m["side"]] = (row_id, row)

  def pair(key: str) -> dict:
    unsafe, safe = sides[key]["u"][1], sides[key]["s"][1]
    try:
      prompt = _prompt(unsafe.get("prompt"))
      image_l = read_image_ref(unsafe.get("image"), images_dir)
    except BadRow as e:
      raise BadRow(e.reason, str(e), culprit=0) from e
    try:
      image_w = read_image_ref(safe.get("image"), images_dir)
    except BadRow as e:
      raise BadRow(e.reason, str(e), culprit=1) from e
    return {"pair_id": f"coprov2:{key}", "prompt": prompt, "is_harmful": 1,
            "category": (unsafe.get("category") or safe.get("category") or "").strip(),
            "image_w": image_w, "image_l": image_l, "hflip_ok": hflip_allowed(prompt)}

  tasks: list[RowTask] = []
  for what, value in order:
    if what == "task":
      tasks.append(value)
      continue
    entry = sides[value]
    if set(entry) != {"u", "s"}:
      ((side, (row_id, _)),) = entry.items()
      other = "s" if side == "u" else "u"
      tasks.append(((row_id,), _unpaired(f"no {other}_ image for key {value!r}")))
    else:
      tasks.append(((entry["u"][0], entry["s"][0]), (lambda key=value: pair(key))))
  return tasks


# ---------------------------------------------------------------------------------------------
# Generic CSV
# ---------------------------------------------------------------------------------------------


def generic_csv_tasks(csv_path: str | Path, images_dir: str | Path) -> list[RowTask]:
  csv_path, images_dir = Path(csv_path), Path(images_dir)
  columns, rows = _read_csv(csv_path)
  missing = [c for c in ("prompt", "image_w", "image_l") if c not in columns]
  if missing:
    raise ValueError(f"{csv_path}: generic pair CSV needs columns prompt, image_w, image_l; "
                     f"missing {missing} (has {columns})")
  name = csv_path.name

  def parse(row, row_id):
    prompt = _prompt(row.get("prompt"))
    if "tag" in row:
      is_harmful = parse_tag(row["tag"])
    elif "is_harmful" in row:
      is_harmful = parse_tag(row["is_harmful"])
    else:
      is_harmful = 0
    ex = {"pair_id": f"csv:{(row.get('id') or '').strip() or row_id}", "prompt": prompt,
          "is_harmful": is_harmful, "category": (row.get("category") or "").strip(),
          "hflip_ok": hflip_allowed(prompt)}
    for k in tfds_pairs.SCALAR_FLOAT_KEYS:
      ex[k] = parse_float(row.get(k), k)
    if (row.get("hflip_ok") or "").strip():
      ex["hflip_ok"] = parse_tag(row["hflip_ok"])
    ex["image_w"] = read_image_ref(row.get("image_w"), images_dir)
    ex["image_l"] = read_image_ref(row.get("image_l"), images_dir)
    return ex

  return [((f"{name}:{i}",), (lambda r=r, i=i: parse(r, f"{name}:{i}")))
          for i, r in enumerate(rows)]


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def convert_pickapic(input_dir, output, **kw) -> tuple[Path, ConversionReport]:
  return convert("pickapic", pickapic_tasks(input_dir), output, source=str(input_dir), **kw)


def convert_coprov2(csv_path, images_dir, output, **kw) -> tuple[Path, ConversionReport]:
  return convert("coprov2", coprov2_tasks(csv_path, images_dir), output, source=str(csv_path),
                 **kw)


def convert_csv(csv_path, images_dir, output, **kw) -> tuple[Path, ConversionReport]:
  return convert("csv", generic_csv_tasks(csv_path, images_dir), output, source=str(csv_path),
                 **kw)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m scdpo_jax.data.convert",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="kind", required=True)
  p_pick = sub.add_parser("pickapic", help="Pick-a-Pic style parquet/jsonl folder")
  p_pick.add_argument("--input", required=True)
  for name, helptext in (("coprov2", "CoProV2 style CSV + image folder"),
                         ("csv", "generic CSV + image folder")):
    p = sub.add_parser(name, help=helptext)
    p.add_argument("--csv", required=True)
    p.add_argument("--images", required=True, help="folder the CSV's image paths are relative to")
  for p in sub.choices.values():
    p.add_argument("--output", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--max_length", type=int, default=None)
    p.add_argument("--max_bad_fraction", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=4)
  args = parser.parse_args(argv)
  kw = dict(split=args.split, tokenizer=args.tokenizer, max_length=args.max_length,
            max_bad_fraction=args.max_bad_fraction, workers=args.workers)
  try:
    if args.kind == "pickapic":
      path, _ = convert_pickapic(args.input, args.output, **kw)
    elif args.kind == "coprov2":
      path, _ = convert_coprov2(args.csv, args.images, args.output, **kw)
    else:
      path, _ = convert_csv(args.csv, args.images, args.output, **kw)
  except TooManyBadRowsError as e:
    print(f"conversion failed: {e}\nsee {Path(args.output) / REPORT_NAME}", file=sys.stderr)
    return 1
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
