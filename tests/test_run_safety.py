"""Runs that cannot go silently wrong: resume fingerprint, workdir lock, damaged checkpoints,
metrics after resume, interruption exit status, one-line config errors (tiny UNet, CPU)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scdpo_jax import jobs, lock
from scdpo_jax.errors import ConfigError
from scdpo_jax.train import loop, resume
from scdpo_jax.train.checkpoint import Checkpointer
from tests.train_utils import ROOT, tiny_train_config, xla_flags


@pytest.fixture(scope="module")
def base(tiny_train_base):
  return tiny_train_base


def _config(base, **overrides):
  return tiny_train_config(**{"model.pretrained": base, **overrides})


def _metrics(workdir: Path) -> list[dict]:
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_resume_refuses_changed_settings_and_names_them(base, tmp_path):
  loop.run(_config(base, **{"train.num_steps": 2}), tmp_path)
  with pytest.raises(resume.ResumeMismatchError) as err:
    loop.run(_config(base, **{"train.num_steps": 3, "train.beta": 60.0,
                              "train.safety_mode": "none"}), tmp_path)
  text = str(err.value)
  assert "config.train.beta: 50.0 -> 60.0" in text
  assert 'config.train.safety_mode: "margin" -> "none"' in text
  assert "resume.allow_changes=train.beta,train.safety_mode" in text
  # a changed model folder: same architecture, other weights
  other = tmp_path / "other_base"
  shutil.copytree(base, other)
  weights = other / "unet" / "diffusion_pytorch_model.safetensors"
  data = bytearray(weights.read_bytes())
  data[-4:] = b"\x00\x00\x80\x3f"
  weights.write_bytes(bytes(data))
  with pytest.raises(resume.ResumeMismatchError) as err:
    loop.run(_config(str(other), **{"train.num_steps": 3}), tmp_path)
  assert "base_model.unet/diffusion_pytorch_model.safetensors" in str(err.value)
  assert "config.model.pretrained" in str(err.value)
  # allowed: more steps; accepted on request: the initial lambda (refused without the request;
  # a fingerprinted setting that leaves the compiled step as it is, so no second compile)
  with pytest.raises(resume.ResumeMismatchError, match=r"config\.train\.lam: 1\.0 -> 2\.0"):
    loop.run(_config(base, **{"train.num_steps": 3, "train.lam": 2.0}), tmp_path)
  result = loop.run(_config(base, **{"train.num_steps": 3, "train.lam": 2.0,
                                     "resume.allow_changes": "train.lam"}), tmp_path)
  assert result["start_step"] == 2 and result["end_step"] == 3


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_weights_file_is_named(base, tmp_path, damage):
  from scdpo_jax.models import io
  other = tmp_path / "base"
  shutil.copytree(base, other)
  weights = other / "unet" / "diffusion_pytorch_model.safetensors"
  weights.write_bytes(weights.read_bytes()[:1000] if damage == "truncated" else b"")
  with pytest.raises(io.CheckpointReadError, match=f"cannot read {weights}.*truncated"):
    loop.run(_config(str(other)), tmp_path / "w")


def test_invalid_hyper_parameters_are_refused_before_loading(base, tmp_path):
  for key, value in (("train.beta", -5.0), ("train.lam", -1.0), ("optimizer.lr", 0.0),
                     ("train.gamma", -1.0)):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
      loop.run(_config(base, **{key: value}), tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_workdir_lock_names_the_holder_and_a_dead_holder_never_blocks(base, tmp_path):
  (tmp_path / lock.LOCK_NAME).write_text('{"pid": 1, "host": "gone", "started": "x"}')
  with lock.WorkdirLock(tmp_path):  # a lock file left behind by a killed run: no flock held
    config = _config(base)
    with pytest.raises(lock.WorkdirLockedError, match=f"pid {os.getpid()} on .*started"):
      jobs.run(config, str(tmp_path))
  # a process killed while holding the lock
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; sys.path.insert(0, sys.argv[1]);"
      "from scdpo_jax.lock import WorkdirLock; l = WorkdirLock(sys.argv[2]); l.acquire();"
      "print('locked', flush=True); time.sleep(600)"), str(ROOT), str(tmp_path)],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(lock.WorkdirLockedError, match=f"pid {holder.pid}"):
    lock.WorkdirLock(tmp_path).acquire()
  holder.kill()
  holder.wait()
  with lock.WorkdirLock(tmp_path):
    pass


def test_damaged_checkpoints_fall_back_to_the_newest_readable_one(base, tmp_path):
  config = _config(base, **{"train.num_steps": 4, "checkpoint.every_steps": 2})
  loop.run(config, tmp_path)
  ckpt_dir = tmp_path / "checkpoints"
  for path in (ckpt_dir / "4" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"garbage")
  (ckpt_dir / "50").mkdir()  # a stray folder named like a step
  result = loop.run(_config(base, **{"train.num_steps": 5, "checkpoint.every_steps": 2}),
                    tmp_path)
  assert result["start_step"] == 2 and result["end_step"] == 5
  saved = json.loads((tmp_path / "train_result.json").read_text())
  fallbacks = saved["restore_fallbacks"]
  assert len(fallbacks) == 4, fallbacks
  assert "checkpoints/50 cannot be read" in fallbacks[0]
  assert "checkpoints/4 cannot be read" in fallbacks[1]
  assert all("moved the unreadable" in line for line in fallbacks[2:])
  aside = sorted(p.name.split(".")[0] for p in (tmp_path / "checkpoints_unreadable").iterdir())
  assert aside == ["4", "50"]  # set aside, not deleted
  assert Checkpointer(ckpt_dir).all_steps() == [2, 4, 5][-config.checkpoint.keep:]
  assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def cut_run(base, tmp_path_factory):
  """4 steps straight; and 3 steps (checkpoints at 2 and 3, TensorBoard on) whose step-3
  checkpoint is then removed, as if killed after step 3 was logged, resumed to 4 steps. The
  metrics and the TensorBoard tests below check the two logs of this one resumed run."""
  tmp = tmp_path_factory.mktemp("cut_run")
  straight = tmp / "straight"
  loop.run(_config(base, **{"train.num_steps": 4}), straight)
  cut = tmp / "cut"
  loop.run(_config(base, **{"train.num_steps": 3, "checkpoint.every_steps": 2,
                            "log.tensorboard": True}), cut)
  shutil.rmtree(cut / "checkpoints" / "3")  # as if killed after step 3 was logged
  first = json.loads((cut / "train_result.json").read_text())
  resumed = loop.run(_config(base, **{"train.num_steps": 4, "checkpoint.every_steps": 2,
                                      "log.tensorboard": True}), cut)
  assert resumed["start_step"] == 2 and resumed["end_step"] == 4
  return straight, cut, first


def test_metrics_after_resume_equal_an_uninterrupted_run(base, cut_run):
  straight, cut, first = cut_run
  rows, want = _metrics(cut), _metrics(straight)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for key in ("objective", "loss/all", "grad_norm", "logit/harmful"):
    np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in want], atol=1e-6,
                               err_msg=key)
  # a rerun of the finished run keeps its result
  finished = json.loads((cut / "train_result.json").read_text())
  again = loop.run(_config(base, **{"train.num_steps": 4}), cut)
  assert again["already_finished"]
  assert json.loads((cut / "train_result.json").read_text()) == finished
  assert finished["losses"] and first["losses"]


def _tensorboard_purges(folder: Path) -> list[int]:
  """Steps of the SessionLog.START events (TensorBoard's purge markers) in every event file."""
  import struct
  from tensorboardX.proto import event_pb2

  steps = []
  for path in sorted(folder.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == 1:  # START
        steps.append(event.step)
  return steps


def test_tensorboard_purges_events_after_the_restored_step(cut_run):
  _, cut, _ = cut_run  # 3 steps, the step-3 checkpoint removed, resumed from step 2 to 4
  assert _tensorboard_purges(cut / "tensorboard") == [3]  # events from step 3 on replaced


def test_full_disk_is_one_line_naming_the_folder(tmp_path, monkeypatch):
  import errno
  from scdpo_jax.train import checkpoint
  ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)

  def no_space(*args, **kwargs):
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
      raise RuntimeError("Event loop is closed") from e

  monkeypatch.setattr(ckpt.manager, "save", no_space)
  with pytest.raises(checkpoint.CheckpointDiskFullError) as err:
    ckpt.save(1, {"x": np.zeros(2)}, {}, {})
  assert str(err.value).count("\n") == 0
  assert f"writing checkpoints to {tmp_path / 'checkpoints'}" in str(err.value)


def _tiny_train_overrides() -> list[str]:
  """`--config.` overrides that turn configs/scdpo_tiny.py into this file's `tiny_train_config()`
  in every key that shapes the compiled train step (batch, accumulation, focusing, beta,
  optimizer): the CLI runs below then train the program the in-process runs above compiled, a
  compile-cache hit instead of a compile in the subprocess. Step counts and logging / checkpoint
  intervals stay the test's own."""
  from configs import scdpo_tiny

  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out

  shipped, tests = flat(scdpo_tiny.get_config().to_dict()), flat(tiny_train_config().to_dict())
  keys = [k for k in tests if shipped.get(k) != tests[k] and k.startswith(
      ("train.", "optimizer.", "data.", "model.")) and k not in ("train.num_steps",
                                                                 "train.export_at_end")]
  assert "train.pairs_per_step" in keys and "train.grad_accum" in keys
  return [f"--config.{k}={tests[k]}" for k in keys]


def _cli(args, cwd=ROOT, **kwargs):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_unknown_override_is_one_line_with_a_suggestion(tmp_path):
  proc = _cli(["--config", str(ROOT / "configs" / "scdpo_tiny.py"), "--workdir",
               str(tmp_path), "--config.train.betaa=1"])
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2
  lines = [l for l in err.splitlines() if l.strip()]
  assert lines == ["error: a config override was rejected: unknown key 'betaa'. Did you mean "
                   "\"beta\" instead of \"betaa\"? (overrides: --config.train.betaa=1)"]


def test_ctrl_c_saves_then_exits_with_the_interrupted_status(base, tmp_path):
  proc = _cli(["--config", str(ROOT / "configs" / "scdpo_tiny.py"), "--workdir",
               str(tmp_path), f"--config.model.pretrained={base}", *_tiny_train_overrides(),
               "--config.train.num_steps=100000", "--config.log.every_steps=1",
               "--config.checkpoint.every_steps=100000"])
  deadline = time.time() + 600
  while not (tmp_path / "metrics.jsonl").is_file() or not _metrics(tmp_path):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == jobs.EXIT_INTERRUPTED, err[-3000:]
  assert "overrides: --config.model.pretrained=" in err
  step = Checkpointer(tmp_path / "checkpoints").latest_step()
  assert step is not None and step >= 1
  result = json.loads((tmp_path / "train_result.json").read_text())
  assert result["interrupted_by"] == "SIGINT" and result["end_step"] == step


def test_multi_host_run_locks_on_process_0_and_every_process_learns_it(base, tmp_path):
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  run_dir = tmp_path / "mh"
  with lock.WorkdirLock(run_dir):  # another run holds the workdir
    procs = []
    for pid in range(2):
      spec = {"runs": {"mh": {"model.pretrained": base,
                              "distributed.coordinator_address": f"127.0.0.1:{port}",
                              "distributed.num_processes": 2, "distributed.process_id": pid}},
              "workdir": str(tmp_path), "result": str(tmp_path / f"result{pid}.json")}
      path = tmp_path / f"spec{pid}.json"
      path.write_text(json.dumps(spec))
      env = {**os.environ, "PYTHONPATH": str(ROOT),
             "XLA_FLAGS": xla_flags(1)}
      procs.append(subprocess.Popen([sys.executable, "-m", "tests.train_utils", str(path)],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  result = json.loads((tmp_path / "result0.json").read_text())["mh"]  # process 0 writes it
  assert "WorkdirLockedError" in result["error"] and f"pid {os.getpid()}" in result["error"]
  assert not (run_dir / "checkpoints").exists()


def test_second_ctrl_c_aborts_at_once_without_a_checkpoint(base, tmp_path):
  log = tmp_path / "stderr.log"
  with open(log, "w") as err_file:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs" / "scdpo_tiny.py"),
         "--workdir", str(tmp_path / "w"), f"--config.model.pretrained={base}",
         *_tiny_train_overrides(), "--config.train.num_steps=100000", "--config.log.every_steps=1",
         "--config.checkpoint.every_steps=100000", "--config.checkpoint.async_save=False"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
        stderr=err_file, text=True)
    deadline = time.time() + 600

    def wait_for(text):
      while text not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)

    wait_for("step 1/100000")
    proc.send_signal(signal.SIGINT)
    wait_for("SIGINT received")  # the first one is handled: the run will save at step end
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
  err = log.read_text()
  if "interrupted; the state is saved" in err:  # the step and its save beat the second signal
    pytest.xfail("timing: the run finished its checkpoint before the second SIGINT arrived")
  assert proc.returncode not in (0, jobs.EXIT_INTERRUPTED), err[-3000:]
  assert "second SIGINT: stopping now" in err


def test_run_sh_takes_paths_relative_to_where_the_user_stands(tmp_path):
  proc = subprocess.run(["bash", str(ROOT / "scripts" / "run.sh"), "--config",
                         str(ROOT / "configs" / "scdpo_tiny.py"), "--workdir", "rel_workdir",
                         "--config.train.beta=-5"], cwd=tmp_path, capture_output=True, text=True,
                        timeout=600, env={**os.environ, "SCDPO_VENV": sys.prefix})
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "train.beta must be > 0" in proc.stderr
  assert (tmp_path / "rel_workdir").is_dir() and not (ROOT / "rel_workdir").exists()
