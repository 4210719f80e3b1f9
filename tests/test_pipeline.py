"""A whole diffusers-format SD folder: load with our loaders, compare the text->UNet->VAE chain
with PyTorch, export, and load the export with PyTorch's StableDiffusionPipeline."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import diffusers
import torch
import transformers
from flax.core import meta

from scdpo_jax.models import io, layers, pipeline, tokenizer, vae as vae_lib
from tests.torch_refs import nchw_to_nhwc, nhwc_to_nchw, tiny_torch_pipeline, to_numpy


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def torch_pipeline_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("sd") / "pipe"
  pipe = tiny_torch_pipeline(folder, tmp_path_factory.mktemp("tok"))
  return folder, pipe


def _chain(sd, ids, x_t, t):
  states = sd.text_encoder.apply({"params": sd.text_encoder_params}, ids).last_hidden_state
  eps = sd.unet.apply({"params": sd.unet_params}, x_t, t, states)
  image = sd.vae.apply({"params": sd.vae_params}, vae_lib.unscale_latents(eps, sd.vae.config),
                       method="decode")
  return np.asarray(states), np.asarray(eps), np.asarray(image)


def _torch_chain(pipe, ids, x_t, t):
  with torch.no_grad():
    states = pipe.text_encoder(torch.from_numpy(ids).long())[0]
    eps = pipe.unet(torch.from_numpy(nhwc_to_nchw(x_t)), torch.from_numpy(t).long(),
                    encoder_hidden_states=states).sample
    image = pipe.vae.decode(eps / pipe.vae.config.scaling_factor).sample
  return to_numpy(states), nchw_to_nhwc(to_numpy(eps)), nchw_to_nhwc(to_numpy(image))


def test_load_whole_pipeline_matches_pytorch(torch_pipeline_folder):
  folder, pipe = torch_pipeline_folder
  sd = pipeline.load_stable_diffusion(folder)
  assert sd.schedule.prediction_type == "epsilon"
  ids = tokenizer.tokenize(sd.tokenizer, ["a red cat", "two blue squares"])
  ref_ids = pipe.tokenizer(["a red cat", "two blue squares"], padding="max_length",
                           max_length=pipe.tokenizer.model_max_length, truncation=True,
                           return_tensors="np")["input_ids"]
  np.testing.assert_array_equal(ids, ref_ids)
  x_t = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([999, 3], np.int32)
  for ours, ref in zip(_chain(sd, ids, x_t, t), _torch_chain(pipe, ids, x_t, t)):
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_export_loads_in_pytorch_pipeline(torch_pipeline_folder, tmp_path):
  folder, pipe = torch_pipeline_folder
  sd = pipeline.load_stable_diffusion(folder)
  out = pipeline.save_stable_diffusion(tmp_path / "export", sd)
  reloaded = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
  for name in ("unet", "vae", "text_encoder"):
    ref_state = getattr(pipe, name).state_dict()
    new_state = getattr(reloaded, name).state_dict()
    assert set(new_state) == set(ref_state), name
    for k in ref_state:
      np.testing.assert_array_equal(to_numpy(new_state[k]), to_numpy(ref_state[k]), err_msg=k)
  image = reloaded("a red cat", num_inference_steps=2, height=16, width=16, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
  assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_loaders_return_host_numpy_in_param_dtype(torch_pipeline_folder):
  """One loader contract for every component: unboxed host NumPy trees in `param_dtype`, shaped
  like `layers.abstract_params` of the returned module."""
  folder, _ = torch_pipeline_folder
  sd = pipeline.load_stable_diffusion(folder, ("unet", "vae", "text_encoder"),
                                      param_dtype=jnp.bfloat16)
  for module, params in ((sd.unet, sd.unet_params), (sd.vae, sd.vae_params),
                         (sd.text_encoder, sd.text_encoder_params)):
    leaves = jax.tree.leaves(params)
    assert leaves and all(type(x) is np.ndarray and x.dtype == jnp.bfloat16 for x in leaves)
    abstract = meta.unbox(layers.abstract_params(module))
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, abstract)


def test_folder_errors_name_the_path(torch_pipeline_folder, tmp_path):
  folder, _ = torch_pipeline_folder
  with pytest.raises(io.CheckpointNotFoundError, match="not found.*nowhere"):
    pipeline.load_stable_diffusion(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(io.CheckpointNotFoundError, match="model_index.json"):
    pipeline.load_stable_diffusion(tmp_path / "empty")
  partial = tmp_path / "partial"
  shutil.copytree(folder, partial)
  shutil.rmtree(partial / "vae")
  with pytest.raises(io.CheckpointNotFoundError, match=r"component 'vae' missing.*partial/vae"):
    pipeline.load_stable_diffusion(partial)
  # Components that are not requested need not exist.
  sd = pipeline.load_stable_diffusion(partial, components=("unet", "scheduler"))
  assert sd.vae is None and sd.unet is not None


def test_main_inspect_job_end_to_end(tmp_path):
  """The README's main job: tiny random pipeline -> diffusers export -> reload -> one pass."""
  cmd = [sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs/inspect.py"),
         "--workdir", str(tmp_path / "run")]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "run" / "inspect.json").read_text())
  assert report["finite"] and report["params"]["unet"] == 792_964
  assert (tmp_path / "run" / "inspect_x0_prediction.png").is_file()
  assert (tmp_path / "run" / "tiny_pipeline" / "model_index.json").is_file()


def test_main_rejects_unknown_config_key(tmp_path):
  cmd = [sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs/inspect.py"),
         "--workdir", str(tmp_path / "run"), "--config.model.no_such_key=1"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "no_such_key" in proc.stderr
