"""A diffusers UNet config with a non-square `sample_size` ([height, width], which diffusers
accepts) loads, samples and trains; checked against PyTorch diffusers on a tiny pipeline."""

import json

import diffusers
import numpy as np
import pytest
import torch

from scdpo_jax.models import pipeline, unet_io
from scdpo_jax.sampling import generate, samplers
from scdpo_jax.train import loop
from tests.torch_refs import nchw_to_nhwc, nhwc_to_nchw, tiny_torch_pipeline, to_numpy
from tests.train_utils import tiny_train_config

HW = [4, 8]  # latent height, width


@pytest.fixture(scope="module")
def nonsquare(tmp_path_factory):
  folder = tmp_path_factory.mktemp("sd_nonsquare") / "pipe"
  pipe = tiny_torch_pipeline(folder, tmp_path_factory.mktemp("tok"),
                             unet_overrides={"sample_size": HW})
  pipe.set_progress_bar_config(disable=True)
  return pipe, folder


def test_nonsquare_unet_loads_and_matches_diffusers(nonsquare):
  pipe, folder = nonsquare
  module, params = unet_io.load_unet(folder / "unet")
  assert module.config.sample_hw == tuple(HW)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *HW, 4)).astype(np.float32)
  states = rng.standard_normal((2, 7, 32)).astype(np.float32)
  t = np.array([10, 900])
  ours = np.asarray(module.apply({"params": params}, x, t, states))
  with torch.no_grad():
    ref = pipe.unet(torch.from_numpy(nhwc_to_nchw(x).copy()), torch.from_numpy(t),
                    torch.from_numpy(states)).sample
  np.testing.assert_allclose(ours, nchw_to_nhwc(to_numpy(ref)), atol=1e-4, rtol=0)


def test_nonsquare_default_size_samples_like_the_diffusers_pipeline(nonsquare):
  pipe, folder = nonsquare
  sd = pipeline.load_stable_diffusion(folder)
  t2i = generate.TextToImage(sd, generate.SamplingSettings(sampler="ddim", num_steps=3),
                             batch_size=1)
  factor = sd.vae.config.downsample_factor
  assert (t2i.height, t2i.width) == (HW[0] * factor, HW[1] * factor)
  ours = t2i(["a red cat"], [7], [0], [5.0])
  assert ours.shape == (1, HW[0] * factor, HW[1] * factor, 3)
  keys = samplers.sample_keys(np.array([7], np.uint64), np.array([0]))
  x_start = np.asarray(samplers.initial_noise(keys, t2i.latent_shape))
  with torch.no_grad():  # height/width left to diffusers' own default from sample_size
    expected = pipe("a red cat", num_inference_steps=3, guidance_scale=5.0, output_type="np",
                    latents=torch.from_numpy(nhwc_to_nchw(x_start).copy())).images
  np.testing.assert_allclose(ours / 2 + 0.5, expected, atol=1e-5, rtol=0)


def test_nonsquare_unet_trains_and_exports_its_sample_size(nonsquare, tmp_path):
  _, folder = nonsquare
  config = tiny_train_config(**{"model.pretrained": str(folder), "train.num_steps": 2,
                                "train.export_at_end": True})
  result = loop.run(config, tmp_path)
  assert result["end_step"] == 2 and np.isfinite(result["losses"]).all()
  exported = json.loads((tmp_path / "export" / "unet" / "config.json").read_text())
  assert exported["sample_size"] == HW
  assert diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet") \
      .config.sample_size == HW
