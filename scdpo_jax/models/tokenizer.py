"""CLIP tokenizer: transformers' `CLIPTokenizer` read from a model folder's `tokenizer/`.

`write_byte_level_tokenizer` writes a complete, download-free CLIP tokenizer whose vocabulary is
the 256 byte symbols of CLIP's BPE: with no merges it tokenizes character by character; given
`words`, BPE merges make each of those words one token (as real CLIP's vocabulary does for
common words) and other words still fall back to characters. Tests and the embedded synthetic
world use it; real checkpoints ship their own `tokenizer/` folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scdpo_jax.models import io

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def load_tokenizer(folder, max_length: int | None = None):
  """`CLIPTokenizer.from_pretrained(folder)` with a clear error and a sane `model_max_length`."""
  from transformers import CLIPTokenizer

  folder = io.require_dir(folder, "tokenizer")
  has_slow = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
  if not (has_slow or (folder / "tokenizer.json").is_file()):
    raise io.CheckpointNotFoundError(
        f"tokenizer in {folder}: expected vocab.json + merges.txt or tokenizer.json (a "
        f"CLIPTokenizer folder); found {sorted(p.name for p in folder.iterdir()) or 'nothing'}")
  tok = CLIPTokenizer.from_pretrained(str(folder))
  if max_length is not None:
    tok.model_max_length = max_length
  elif tok.model_max_length > 10_000:  # transformers' "no limit" sentinel breaks max_length padding
    tok.model_max_length = 77
  return tok


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None) -> np.ndarray:
  """Token ids (B, max_length) int32, padded and truncated the way SD pipelines do."""
  max_length = max_length or tokenizer.model_max_length
  ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="np")["input_ids"]
  return ids.astype(np.int32)


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable-unicode table."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(symbols: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
  """CLIP's BPE on one word: repeatedly merge (every occurrence of) the adjacent pair of the
  lowest rank until no ranked pair is left."""
  word = tuple(symbols)
  while len(word) > 1:
    pairs = {(a, b) for a, b in zip(word, word[1:])}
    best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
    if best not in ranks:
      break
    merged, i = [], 0
    while i < len(word):
      if i + 1 < len(word) and (word[i], word[i + 1]) == best:
        merged.append(word[i] + word[i + 1])
        i += 2
      else:
        merged.append(word[i])
        i += 1
    word = tuple(merged)
  return word


def word_merges(words) -> list[tuple[str, str]]:
  """BPE merges, in rank order, under which each of `words` (lower-cased) is one `word</w>`
  token (CLIP's BPE marks a word's last symbol with `</w>`). Words are added one by one: the
  word is split by the merges so far, then new merges, ranked after all earlier ones, join its
  pieces left to right. A later merge is only ever chosen when no earlier one applies, so it
  cannot break a word that the earlier merges already build."""
  table = _bytes_to_unicode()
  merges: list[tuple[str, str]] = []
  ranks: dict[tuple[str, str], int] = {}
  for word in sorted({w.lower() for w in words if w}):
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    pieces = _bpe(tuple(symbols), ranks)
    left = pieces[0]
    for right in pieces[1:]:
      if (left, right) not in ranks:
        ranks[(left, right)] = len(merges)
        merges.append((left, right))
      left += right
  return merges


def write_byte_level_tokenizer(folder, max_length: int = 77, pad_token: str = EOS,
                               words=()) -> Path:
  """Write vocab.json/merges.txt/tokenizer_config.json of a character-level CLIP tokenizer.

  Vocabulary: 256 byte symbols, the same with the `</w>` end-of-word suffix, then BOS and EOS
  (ids 512 and 513; pad = EOS as in SD's tokenizer, or `pad_token`, e.g. "!" (id 0) as in
  SDXL's `tokenizer_2`); size 514. `words` (pre-tokenized words such as "square"; CLIP's
  pre-tokenizer splits on spaces and punctuation) add `word_merges(words)` and their products
  as ids 514 and up, so that each of those words is one token.
  """
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  symbols = list(_bytes_to_unicode().values())
  vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
  vocab[BOS] = len(vocab)
  vocab[EOS] = len(vocab)
  merges = word_merges(words)
  for left, right in merges:
    vocab.setdefault(left + right, len(vocab))
  (folder / "vocab.json").write_text(json.dumps(vocab))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(
      f"{left} {right}\n" for left, right in merges))
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS,
      "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS, "do_lower_case": True}))
  (folder / "special_tokens_map.json").write_text(json.dumps({
      "bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}))
  return folder
