"""Inference programs with a mesh are traced under the config's logical axis rules: the sampler
(`TextToImage`), the latent cache (`PairEncoder`) and the cost model's CLIP tower
(`make_embedder`) on 8 simulated CPU devices. Every sharding constraint emitted while they are
traced (the models' `layers.constrain` calls) is recorded with its mesh spec, which must be what
the active rules say; the batch size check follows the rules' `batch` entry; the sharded sampler
gives the images of the single-device one. Plus `TextToImage.with_unet_params` (in-process).

`python -m tests.test_sampling_sharding OUT.json [TINY_FOLDER]` is the 8-device worker (the test
passes the tiny pipeline folder it built: its random init is a compile, which a process with other
XLA_FLAGS cannot take from the compile cache).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.test_train import _subprocess_env
from tests.train_utils import ROOT

# batch over data only, token positions over tensor, channels unsharded
CUSTOM_RULES = (("batch", "data"), ("length", "tensor"), ("kv_length", None), ("height", None),
                ("width", None), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
                ("vocab", None), ("conv_in", "fsdp"), ("conv_out", None), ("norm", None))
CASES = {"default_data2_tensor4": ((2, 1, 4), None), "custom_2x2x2": ((2, 2, 2), CUSTOM_RULES)}
PROMPTS = ["a red square", "a blue circle", "", "a green triangle on a black background"]


def _record_constraints():
  """Patch `jax.lax.with_sharding_constraint` to record (program, mesh spec per dimension) of
  every constraint emitted while tracing (the models' `layers.constrain` calls and the
  sampler's carry)."""
  import jax

  original = jax.lax.with_sharding_constraint
  log: list[dict] = []
  current = {"program": None}

  def recording(x, sharding):
    spec = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))
    log.append({"program": current["program"], "shape": list(x.shape),
                "spec": [list(a) if isinstance(a, tuple) else a for a in spec]})
    return original(x, sharding)

  jax.lax.with_sharding_constraint = recording
  return log, current


def main(out_path: str, folder: str | None = None) -> None:
  import jax

  from configs.default import tiny_pipeline_config
  from scdpo_jax import parallel
  from scdpo_jax.cost_model.model import make_embedder, random_vision_tower
  from scdpo_jax.data import cache
  from scdpo_jax.models import pipeline, tiny
  from scdpo_jax.sampling import generate

  assert jax.device_count() == 8, jax.devices()
  log, current = _record_constraints()
  if folder is None:
    folder = tiny.tiny_pipeline_folder(tiny_pipeline_config(), Path(tempfile.mkdtemp()) / "tiny")
  sd = pipeline.load_stable_diffusion(folder)
  settings = generate.SamplingSettings(num_steps=2)
  args = (PROMPTS, [1, 2, 3, 4], [0, 0, 1, 0], [7.5, 7.5, 3.0, 1.0])
  single = generate.TextToImage(sd, settings, batch_size=4)(*args)
  vision, vision_params = random_vision_tower(dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=12, patch_size=4, projection_dim=32))  # 9 patches + CLS: an even length
  images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  result = {}
  for name, ((data, fsdp, tensor), rules) in CASES.items():
    mesh = parallel.make_mesh(data, fsdp, tensor)
    kw = {} if rules is None else {"rules": rules}
    current["program"] = "sampler"
    t2i = generate.TextToImage(sd, settings, batch_size=4, mesh=mesh, **kw)
    sharded = t2i(*args)
    current["program"] = "cache"
    enc = cache.PairEncoder(sd.vae, sd.vae_params, sd.text_encoder, sd.text_encoder_params,
                            sd.tokenizer, batch_size=4, mesh=mesh, **kw)
    enc.encode_images(images, np.arange(4), np.zeros(4))
    enc.encode_text(enc.tokenize(PROMPTS))
    current["program"] = "embedder"
    make_embedder(vision, vision_params, batch_size=4, mesh=mesh, **kw)(images)
    current["program"] = None
    batch_of_2 = {}
    for which, r in (("config", kw), ("default", {})):
      try:
        generate.TextToImage(sd, settings, batch_size=2, mesh=mesh, **r)
        batch_of_2[which] = "accepted"
      except ValueError as e:
        batch_of_2[which] = str(e)
    result[name] = {"constraints": [c for c in log if c["program"]],
                    "max_abs_diff_to_one_device": float(np.abs(sharded - single).max()),
                    "batch_of_2": batch_of_2}
    log.clear()
  Path(out_path).write_text(json.dumps(result))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
  """The tiny random pipeline of configs/default.py, written once for this file (the 8-device
  worker and the in-process tests load it)."""
  from configs.default import tiny_pipeline_config
  from scdpo_jax.models import tiny

  return tiny.tiny_pipeline_folder(tiny_pipeline_config(), tmp_path_factory.mktemp("sd") / "tiny")


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_folder):
  out = tmp_path_factory.mktemp("inference_sharding") / "result.json"
  proc = subprocess.run([sys.executable, "-m", "tests.test_sampling_sharding", str(out),
                         str(tiny_folder)],
                        cwd=ROOT, env=_subprocess_env(8), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())


def _specs(case, program, rank):
  """Mesh specs of the program's constraints of this rank on a batch the mesh's data axis (2)
  divides (e.g. not the sampler's single unconditional prompt, which stays replicated)."""
  return {json.dumps(c["spec"]) for c in case["constraints"]
          if c["program"] == program and len(c["spec"]) == rank and c["shape"][0] % 2 == 0}


@pytest.mark.parametrize("program", ["sampler", "cache", "embedder"])
def test_every_program_is_traced_under_the_rules(cases, program):
  for name, case in cases.items():
    assert any(c["program"] == program for c in case["constraints"]), (name, program)


def test_default_rules_shard_batch_over_data_and_channels_over_tensor(cases):
  case = cases["default_data2_tensor4"]
  for program in ("sampler", "cache"):  # UNet / VAE blocks (NHWC)
    assert json.dumps(["data", None, None, "tensor"]) in _specs(case, program, 4), program
  for program in ("sampler", "cache", "embedder"):  # CLIP / attention tokens (B, T, D)
    assert _specs(case, program, 3) and all(
        json.loads(s)[0] == "data" for s in _specs(case, program, 3)), program


def test_config_rules_decide_activation_and_batch_sharding(cases):
  case = cases["custom_2x2x2"]
  nhwc = _specs(case, "sampler", 4) | _specs(case, "cache", 4)
  assert nhwc and all(json.loads(s)[0] == "data" and json.loads(s)[3] is None for s in nhwc)
  for program in ("sampler", "cache", "embedder"):  # length -> tensor
    assert any(json.loads(s)[:2] == ["data", "tensor"] for s in _specs(case, program, 3)), program
  # a generation batch must divide over the rules' batch axes: data (2) under these rules,
  # data x fsdp (4) under the default ones
  assert case["batch_of_2"]["config"] == "accepted"
  assert "data x fsdp = 4" in case["batch_of_2"]["default"]
  assert cases["default_data2_tensor4"]["batch_of_2"]["config"] == "accepted"


def test_sharded_sampler_gives_the_single_device_images(cases):
  for name, case in cases.items():
    assert case["max_abs_diff_to_one_device"] < 1e-5, name


# ----------------------------------------------------------------------------- with_unet_params


@pytest.fixture(scope="module")
def tiny_sd(tiny_folder):
  from scdpo_jax.models import pipeline

  return pipeline.load_stable_diffusion(tiny_folder)


def test_with_unet_params_swaps_the_unet_and_keeps_the_original(tiny_sd):
  import jax

  from scdpo_jax.models.pipeline import StableDiffusion
  from scdpo_jax.sampling import generate

  settings = generate.SamplingSettings(num_steps=2)
  args = (PROMPTS[:2], [1, 2], [0, 0], [7.5, 7.5])
  t2i = generate.TextToImage(tiny_sd, settings, batch_size=2)
  base = t2i(*args)
  other = jax.tree.map(lambda x: np.asarray(x) * 1.5, tiny_sd.unet_params)
  swapped = t2i.with_unet_params(other)
  expected = generate.TextToImage(StableDiffusion(**{**vars(tiny_sd), "unet_params": other}),
                                  settings, batch_size=2)(*args)
  np.testing.assert_array_equal(swapped(*args), expected)
  assert np.abs(expected - base).max() > 1e-3
  np.testing.assert_array_equal(t2i(*args), base)  # the original sampler is unchanged
  assert swapped._fn is t2i._fn  # one compiled program
  with pytest.raises(ValueError, match="do not match"):
    t2i.with_unet_params({"conv_in": tiny_sd.unet_params["conv_in"]})


if __name__ == "__main__":
  main(*sys.argv[1:3])
