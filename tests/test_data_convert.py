"""Converters: Pick-a-Pic (parquet + jsonl), CoProV2 (long and paired CSV), generic CSV.

Every input is generated here from Pillow-drawn images; each test checks which image won, the
tags/categories, and that every bad row is reported under its reason with its row id.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from data_utils import png, solid
from scdpo_jax.data import convert, tfds_pairs
from scdpo_jax.data.images import decode_image
from scdpo_jax.models import tokenizer as tok


def colour(i: int, side: int) -> tuple[int, int, int]:
  return (10 * i + 5, 200 if side == 0 else 40, 100)


def write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def records(dataset_dir):
  ds = tfds_pairs.open_pairs(dataset_dir)
  src = ds.source("train")
  return ds, [src[i] for i in range(len(src))]


def check_accounting(report: convert.ConversionReport):
  assert report.rows_total == report.rows_used + len(report.ties_dropped) + report.bad_count


@pytest.fixture(scope="module")
def pickapic_dir(tmp_path_factory):
  """6 parquet rows (2 bad, 1 tie) + 4 jsonl rows (2 bad)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  root = tmp_path_factory.mktemp("pickapic")
  labels = [1.0, 0.0, 0.5, 2.0, 1.0, 0.0]
  jpg_0 = [png(solid(colour(i, 0))) for i in range(6)]
  jpg_1 = [png(solid(colour(i, 1))) for i in range(6)]
  jpg_1[4] = b"not an image at all"  # unreadable_image
  captions = ["a cat", "a dog on the left", "a tie", "bad label", "broken image", "a bird"]
  table = pa.table({"caption": captions, "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": labels,
                    "label_1": [1.0 - x for x in labels], "extra": list(range(6))})
  pq.write_table(table, root / "train-00000.parquet", row_group_size=4)
  sub = root / "more"
  sub.mkdir()
  for i in range(6, 9):
    (sub / f"{i}_0.png").write_bytes(png(solid(colour(i, 0))))
    (sub / f"{i}_1.png").write_bytes(png(solid(colour(i, 1))))
  lines = [json.dumps({"caption": "jsonl one", "jpg_0": "6_0.png", "jpg_1": "6_1.png",
                       "label_0": 0}),
           "{this is not json",
           json.dumps({"caption": "missing file", "jpg_0": "nope.png", "jpg_1": "7_1.png",
                       "label_0": 1}),
           json.dumps({"caption": "jsonl two", "jpg_0": "8_0.png", "jpg_1": "8_1.png",
                       "label_0": 1})]
  (sub / "extra.jsonl").write_text("\n".join(lines) + "\n")
  return root


def test_pickapic_winners_ties_and_bad_rows(pickapic_dir, tmp_path):
  tok_dir = tok.write_byte_level_tokenizer(tmp_path / "tok", 16)
  path, report = convert.convert_pickapic(pickapic_dir, tmp_path / "out", tokenizer=str(tok_dir),
                                          max_bad_fraction=0.5, workers=2)
  check_accounting(report)
  assert report.rows_total == 10
  assert report.ties_dropped == ["train-00000.parquet:2"]
  assert report.bad_rows == {"bad_label": ["train-00000.parquet:3"],
                             "unreadable_image": ["train-00000.parquet:4"],
                             "bad_json": ["more/extra.jsonl:1"],
                             "missing_image": ["more/extra.jsonl:2"]}
  assert report.pairs_written == 5
  ds, recs = records(path)
  assert ds.schema == tfds_pairs.PairSchema(token_length=16, images=True)
  # (source row, winning side) in file order
  expected = [(6, 1), (8, 0), (0, 0), (1, 1), (5, 1)]  # more/extra.jsonl sorts first
  assert len(recs) == len(expected)
  tokenizer = tok.load_tokenizer(tok_dir, 16)
  for rec, (i, side) in zip(recs, expected):
    np.testing.assert_array_equal(decode_image(rec["image_w"]), solid(colour(i, side)))
    np.testing.assert_array_equal(decode_image(rec["image_l"]), solid(colour(i, 1 - side)))
    assert int(rec["is_harmful"]) == 0 and tfds_pairs.text(rec["category"]) == ""
    assert math.isnan(float(rec["reward_w"])) and math.isnan(float(rec["cost_l"]))
    prompt = tfds_pairs.text(rec["prompt"])
    np.testing.assert_array_equal(rec["input_ids"], tok.tokenize(tokenizer, [prompt], 16)[0])
    assert int(rec["hflip_ok"]) == (0 if "left" in prompt else 1)
  saved = json.loads((tmp_path / "out" / convert.REPORT_NAME).read_text())
  assert saved["bad_count"] == 4 and saved["pairs_written"] == 5
  assert ds.metadata["conversion_report"]["pairs_written"] == 5


def test_too_many_bad_rows_fails_and_leaves_no_dataset(pickapic_dir, tmp_path):
  out = tmp_path / "out"
  with pytest.raises(convert.TooManyBadRowsError, match="4 of 10 rows are bad"):
    convert.convert_pickapic(pickapic_dir, out, max_bad_fraction=0.2)
  with pytest.raises(FileNotFoundError):
    tfds_pairs.find_dataset_dir(out)
  saved = json.loads((out / convert.REPORT_NAME).read_text())
  assert saved["bad_rows"]["missing_image"] == ["more/extra.jsonl:2"]
  # The command line reports the failure with exit status 1.
  assert convert.main(["pickapic", "--input", str(pickapic_dir), "--output",
                       str(tmp_path / "cli"), "--max_bad_fraction", "0.2"]) == 1
  assert convert.main(["pickapic", "--input", str(pickapic_dir), "--output",
                       str(tmp_path / "cli_ok"), "--max_bad_fraction", "0.5"]) == 0
  assert tfds_pairs.open_pairs(tmp_path / "cli_ok").splits == {"train": 5}


def test_coprov2_long_shape(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  rows = []
  for key in range(1, 5):
    rows.append((f"unsafe prompt {key}", f"u_{key}_0.png", "Violence" if key % 2 else "Hate"))
    rows.append((f"safe prompt {key}", f"s_{key}_0.png", "Violence" if key % 2 else "Hate"))
  rows.append(("unsafe alone", "u_9_0.png", "Hate"))  # no s_9
  rows.append(("odd name", "picture.png", "Hate"))  # neither u_ nor s_
  for _, name, _ in rows:
    side = 0 if name.startswith("s_") else 1
    key = int(name.split("_")[1]) if name[1] == "_" else 0
    (images / name).write_bytes(png(solid(colour(key, side))))
  (images / "s_3_0.png").unlink()  # the safe image of key 3 is missing
  write_csv(tmp_path / "coprov2.csv", ["prompt", "image", "category"], rows)
  path, report = convert.convert_coprov2(tmp_path / "coprov2.csv", images, tmp_path / "out",
                                         max_bad_fraction=0.5)
  check_accounting(report)
  assert report.rows_total == 10 and report.rows_used == 6 and report.pairs_written == 3
  assert report.bad_rows == {"missing_image": ["coprov2.csv:5"],
                             "unpaired": ["coprov2.csv:4", "coprov2.csv:8", "coprov2.csv:9"]}
  _, recs = records(path)
  assert [tfds_pairs.text(r["pair_id"]) for r in recs] == ["coprov2:1", "coprov2:2", "coprov2:4"]
  for rec, key in zip(recs, (1, 2, 4)):
    assert tfds_pairs.text(rec["prompt"]) == f"unsafe prompt {key}"  # conditioned on unsafe
    assert int(rec["is_harmful"]) == 1
    assert tfds_pairs.text(rec["category"]) == ("Violence" if key % 2 else "Hate")
    np.testing.assert_array_equal(decode_image(rec["image_w"]), solid(colour(key, 0)))  # safe
    np.testing.assert_array_equal(decode_image(rec["image_l"]), solid(colour(key, 1)))


def test_coprov2_paired_shape(tmp_path):
  for i in range(3):
    (tmp_path / f"safe{i}.png").write_bytes(png(solid(colour(i, 0))))
    (tmp_path / f"unsafe{i}.png").write_bytes(png(solid(colour(i, 1))))
  write_csv(tmp_path / "pairs.csv",
            ["unsafe_prompt", "safe_prompt", "unsafe_image", "safe_image", "category"],
            [(f"bad {i}", f"good {i}", f"unsafe{i}.png", f"safe{i}.png", "Sexual")
             for i in range(3)] + [("bad 3", "good 3", "", "safe0.png", "Sexual")])
  path, report = convert.convert_coprov2(tmp_path / "pairs.csv", tmp_path, tmp_path / "out",
                                         max_bad_fraction=0.3)
  check_accounting(report)
  assert report.bad_rows == {"missing_image": ["pairs.csv:3"]}
  _, recs = records(path)
  assert [tfds_pairs.text(r["prompt"]) for r in recs] == ["bad 0", "bad 1", "bad 2"]
  for i, rec in enumerate(recs):
    np.testing.assert_array_equal(decode_image(rec["image_w"]), solid(colour(i, 0)))
    assert tfds_pairs.text(rec["category"]) == "Sexual"


def test_generic_csv(tmp_path):
  for i in range(5):
    (tmp_path / f"w{i}.png").write_bytes(png(solid(colour(i, 0))))
    (tmp_path / f"l{i}.png").write_bytes(png(solid(colour(i, 1))))
  (tmp_path / "broken.png").write_bytes(png(solid(colour(0, 0)))[:40])  # truncated PNG
  header = ["id", "prompt", "image_w", "image_l", "tag", "category", "reward_w", "reward_l",
            "cost_w", "cost_l", "hflip_ok"]
  rows = [
      ("a", "p0", "w0.png", "l0.png", "harmful", "Hate", "0.5", "0.1", "-1", "2", ""),
      ("", "p1 turn right", "w1.png", "l1.png", "clean", "", "", "", "", "", ""),
      ("c", "p2", "w2.png", "l2.png", "maybe", "", "", "", "", "", ""),  # bad tag
      ("d", "p3", "w3.png", "l3.png", "1", "", "abc", "", "", "", ""),  # bad reward
      ("e", "p4", "broken.png", "l4.png", "0", "", "", "", "", "", ""),  # unreadable
      ("f", "p5", "w4.png", "l4.png", "0", "", "1", "0", "", "", "0"),
  ]
  write_csv(tmp_path / "pairs.csv", header, rows)
  path, report = convert.convert_csv(tmp_path / "pairs.csv", tmp_path, tmp_path / "out",
                                     max_bad_fraction=0.5)
  check_accounting(report)
  assert report.bad_rows == {"bad_label": ["pairs.csv:2", "pairs.csv:3"],
                             "unreadable_image": ["pairs.csv:4"]}
  _, recs = records(path)
  assert [tfds_pairs.text(r["pair_id"]) for r in recs] == ["csv:a", "csv:pairs.csv:1", "csv:f"]
  a, b, f = recs
  assert int(a["is_harmful"]) == 1 and tfds_pairs.text(a["category"]) == "Hate"
  assert (float(a["reward_w"]), float(a["reward_l"]), float(a["cost_w"]), float(a["cost_l"])) == (
      0.5, pytest.approx(0.1), -1.0, 2.0)
  assert int(b["is_harmful"]) == 0 and math.isnan(float(b["reward_w"]))
  assert int(b["hflip_ok"]) == 0  # "right" in the prompt
  assert int(f["hflip_ok"]) == 0  # explicit column
  np.testing.assert_array_equal(decode_image(f["image_w"]), solid(colour(4, 0)))


def test_missing_columns_are_errors_not_bad_rows(tmp_path):
  write_csv(tmp_path / "x.csv", ["prompt", "image_w"], [("p", "a.png")])
  with pytest.raises(ValueError, match="image_l"):
    convert.convert_csv(tmp_path / "x.csv", tmp_path, tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="parquet"):
    convert.convert_pickapic(tmp_path / "nothing_here", tmp_path / "out2")


def test_duplicate_pair_ids_and_empty_inputs_are_one_line_errors(tmp_path):
  for i in range(2):
    (tmp_path / f"w{i}.png").write_bytes(png(solid(colour(i, 0))))
    (tmp_path / f"l{i}.png").write_bytes(png(solid(colour(i, 1))))
  header = ["id", "prompt", "image_w", "image_l"]
  write_csv(tmp_path / "dup.csv", header, [("a", "p0", "w0.png", "l0.png"),
                                           ("a", "p1", "w1.png", "l1.png")])
  with pytest.raises(tfds_pairs.DuplicatePairIdError, match="pair_id 'csv:a' occurs twice"):
    convert.convert_csv(tmp_path / "dup.csv", tmp_path, tmp_path / "out_dup")
  write_csv(tmp_path / "empty.csv", header, [])
  with pytest.raises(tfds_pairs.EmptySplitError, match="no pairs to write"):
    convert.convert_csv(tmp_path / "empty.csv", tmp_path, tmp_path / "out_empty")
