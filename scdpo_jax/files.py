"""Host file helpers every job shares: atomic writes and JSON-lines manifests.

Atomic: the content goes to `<name>.tmp<pid>.<thread>` next to the target, then `os.replace`
renames it, so a reader (or a resumed run after a crash) sees the old file or the new one, never
a partial one; the process and thread ids keep writers of the same path (two processes, or two
of the ShapeWorld study's worker threads) from sharing a temporary file. Parent folders are
created.

JSON lines: `append_jsonl` adds records to a manifest in one write, `read_jsonl` reads it back and
skips a last line cut by a crash (the caller redoes that record), `write_jsonl` rewrites a whole
file atomically.

May import: the standard library and NumPy only (every layer of the package uses it).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np


def _tmp_path(path: Path) -> Path:
  return path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
  """Write `data` to `path` atomically."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_path(path)
  tmp.write_bytes(data)
  os.replace(tmp, path)
  return path


def write_text(path: str | os.PathLike, text: str) -> Path:
  """Write `text` (UTF-8) to `path` atomically."""
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
  """`json.dumps(obj, indent=indent)` to `path` atomically."""
  return write_text(path, json.dumps(obj, indent=indent))


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
  """`np.savez(path, **arrays)` atomically (the file name is kept as given)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_path(path)
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)
  return path


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
  """Append one JSON line per record to `path` (one write call; nothing for no records)."""
  lines = "".join(json.dumps(r) + "\n" for r in records)
  if lines:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
      f.write(lines)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
  """Replace `path` with one JSON line per record, atomically."""
  return write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The records of a JSON-lines file ([] if it does not exist). Blank lines and lines that
  do not parse (a line cut by a crash) are skipped."""
  path = Path(path)
  if not path.is_file():
    return []
  out = []
  for line in path.read_text().splitlines():
    line = line.strip()
    if line:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


_IDENTITY_BYTES = 1 << 20


def file_identity(path: str | os.PathLike) -> str:
  """`<size>:<hash>` of a file from its size and its first and last MiB: cheap for multi-GB
  weights, and it changes when they change (used to recognise a model across runs)."""
  import hashlib

  path = Path(path)
  size = path.stat().st_size
  h = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    h.update(f.read(_IDENTITY_BYTES))
    if size > _IDENTITY_BYTES:
      f.seek(max(size - _IDENTITY_BYTES, _IDENTITY_BYTES))
      h.update(f.read())
  return f"{size}:{h.hexdigest()[:16]}"


def folder_identity(folder: str | os.PathLike, suffixes=(".json", ".safetensors")) -> str:
  """One identity for the config and weights files of a model folder (e.g. a pipeline's vae/)."""
  import hashlib

  folder = Path(folder)
  rows = [f"{p.name}={file_identity(p)}" for p in sorted(folder.glob("*")) if p.suffix in suffixes]
  return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16] if rows else "missing"
