"""scdpo_jax/files.py: atomic writes hold with several writers of one path."""

import json
import threading

from scdpo_jax import files


def test_threads_writing_one_path_at_once_each_leave_a_whole_file(tmp_path):
  """Two of the study's workers write the same record at once (a row's evaluation parts): no
  writer fails, the file is one writer's whole content, no temporary file is left."""
  path, errors = tmp_path / "record.json", []
  start = threading.Barrier(4)

  def writer(k):
    start.wait()
    try:
      for i in range(300):
        files.write_json(path, {"writer": k, "i": i, "pad": "x" * 2000})
    except Exception as e:  # noqa: BLE001 (reported below)
      errors.append(e)

  threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
  assert json.loads(path.read_text())["i"] == 299
  assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
