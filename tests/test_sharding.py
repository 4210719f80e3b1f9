"""Activation sharding is real: the train step lowered on 8 simulated CPU devices carries the
sharding constraints the config's logical axis rules ask for (the `layers.constrain` calls at
UNet block borders), and the input batch is sharded by the rules' `batch` entry."""

import json
import subprocess
import sys

import pytest

from tests.train_utils import ROOT
from tests.test_train import _subprocess_env

NHWC_RANK, BTD_RANK = 4, 3


@pytest.fixture(scope="module")
def lowered_cases(tmp_path_factory, tiny_train_base):
  out = tmp_path_factory.mktemp("sharding") / "result.json"
  proc = subprocess.run([sys.executable, "-m", "tests.sharding_worker", str(out),
                         tiny_train_base], cwd=ROOT,
                        env=_subprocess_env(8), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())


def _by_rank(case):
  ranks = {}
  for c in case["constraints"]:
    ranks.setdefault(len(c["shape"]), set()).add(json.dumps(c["axes"]))
  return {r: [json.loads(a) for a in sorted(v)] for r, v in ranks.items()}


def test_default_rules_shard_batch_over_data_and_channels_over_tensor(lowered_cases):
  ranks = _by_rank(lowered_cases["data2_tensor4"])
  assert ranks[NHWC_RANK] == [[["data"], [], [], ["tensor"]]]
  # (batch, length, embed): embed -> fsdp, a size-1 axis here, so only the batch is sharded.
  assert ranks[BTD_RANK] == [[["data"], [], []]]
  assert len(lowered_cases["data2_tensor4"]["constraints"]) >= 10


def test_fsdp_axis_takes_the_batch_and_is_not_reused_for_embed(lowered_cases):
  ranks = _by_rank(lowered_cases["fsdp2_tensor4"])
  assert ranks[NHWC_RANK] == [[["fsdp"], [], [], ["tensor"]]]
  assert ranks[BTD_RANK] == [[["fsdp"], [], []]]
  assert lowered_cases["fsdp2_tensor4"]["batch_specs"]["latents_w"][0] == ["data", "fsdp"]


def test_rules_from_the_config_decide_activation_and_batch_sharding(lowered_cases):
  case = lowered_cases["custom_rules"]
  found = {(json.dumps(c["axes"]), tuple(c["shape"])) for c in case["constraints"]}
  assert found == {
      (json.dumps([["data"], [], [], []]), (16, 8, 8, 32)),  # NHWC: conv_out -> None
      (json.dumps([["data"], ["tensor"], ["fsdp"]]), (16, 64, 32)),  # BTD: length -> tensor
      (json.dumps([["data"], [], ["fsdp"]]), (16, 32, 32)),  # text context: kv_length -> None
  }
  assert case["batch_specs"]["latents_w"] == ["data", None, None, None]
  assert case["batch_specs"]["is_harmful"] == ["data"]
  assert lowered_cases["data2_tensor4"]["batch_specs"]["latents_w"] == [
      ["data", "fsdp"], None, None, None]


def test_parameters_left_replicated_are_reported(lowered_cases):
  # conv_in and conv_out -> None leave the conv kernels (3x3 x C_in x C_out) replicated
  unsharded = lowered_cases["custom_rules"]["unsharded_params"]
  assert any(p.endswith("conv1/kernel") for p in unsharded), unsharded
  assert not lowered_cases["data2_tensor4"]["unsharded_params"]


def test_known_cpu_gradient_issue_is_flagged_only_for_its_layout():
  from scdpo_jax import parallel

  rules = parallel.DEFAULT_RULES  # batch -> (data, fsdp)
  bad = {"data": 2, "fsdp": 2, "tensor": 2}
  assert "wrong gradient" in parallel.known_cpu_gradient_issue(bad, rules, "cpu")
  assert parallel.known_cpu_gradient_issue(bad, rules, "gpu") is None
  for fine in ({"data": 1, "fsdp": 8, "tensor": 1}, {"data": 2, "fsdp": 1, "tensor": 4},
               {"data": 4, "fsdp": 2, "tensor": 1}):
    assert parallel.known_cpu_gradient_issue(fine, rules, "cpu") is None, fine
  data_only = tuple((n, "data" if n == "batch" else a) for n, a in rules)
  assert parallel.known_cpu_gradient_issue(bad, data_only, "cpu") is None
