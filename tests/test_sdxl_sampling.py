"""SDXL text-to-image: `TextToImage` on a `StableDiffusionXL` against diffusers'
`StableDiffusionXLPipeline` (tiny random pipeline of `tests/sdxl_refs.py`, fp32) given the same
x_T: DDIM and DPM-Solver++ 2M (schedulers read from the saved folder's scheduler config, as users
swap them), classifier-free guidance with the `force_zeros_for_empty_prompt` zeros and with the
encoded "", negative prompts, and non-default micro-conditioning (time ids). Then the guards:
SLD runs on the SDXL branches (no diffusers reference: checked against CFG with the safety term
held off), TraSCE runs, SAFREE and text_layer are rejected with their names.

DDIM runs with `clip_sample` and `set_alpha_to_one` False on both sides, the values of SDXL
base's scheduler_config.json (`sdxl_refs.SCHEDULER` omits them, and `DDIMScheduler` then
defaults to True): with x0 clipped to +-1 this random tiny model amplifies float32 rounding so
much that diffusers' own fp32 run differs from its fp64 run by 9.8e-5 and a 1e-6 shift of x_T
moves its images by 7.5e-5 (one prompt, a random x_T, 4 steps, w = 7.5); without the clip these
are 2.9e-6 and 3.9e-6.

Compiled programs are the cost here (CI starts with an empty compile cache), so the file builds
five: DDIM + CFG (shared by a module fixture), DDIM + negative prompts + non-default time ids on
a mesh, DPM-Solver++ + CFG with the encoded "", SLD, TraSCE.
"""

import copy
import dataclasses

import diffusers
import numpy as np
import pytest
import torch

from scdpo_jax import parallel
from scdpo_jax.models import pipeline, pipeline_xl
from scdpo_jax.sampling import generate, guards, samplers
from tests import sdxl_refs
from tests.torch_refs import nhwc_to_nchw

pytestmark = pytest.mark.filterwarnings(  # diffusers DPM-Solver on numpy 2 + torch
    "ignore:__array__ implementation:DeprecationWarning")

ATOL = 1e-4  # on images in [0, 1]; measured values next to each assertion
DDIM_KEYS = dict(clip_sample=False, set_alpha_to_one=False)  # SDXL base's (module docstring)
PROMPTS = ["a red cat on a mat", "two blue squares"]
NEGATIVES = ["blurry, ugly", "a red cat"]
SEEDS, INDICES, GUIDANCE = [3, 2 ** 32 + 5], [0, 1], [7.5, 3.0]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
  """The tiny torch SDXL pipeline (saved), with DDIM and DPM-Solver++ schedulers read from the
  saved scheduler config, and the same folder loaded by us."""
  folder = tmp_path_factory.mktemp("sdxl") / "pipe"
  pipe = sdxl_refs.tiny_torch_sdxl_pipeline(folder, tmp_path_factory.mktemp("tok"))
  out = {}
  for name, cls in (("ddim", diffusers.DDIMScheduler),
                    ("dpmsolver++", diffusers.DPMSolverMultistepScheduler)):
    scheduler = cls.from_pretrained(folder, subfolder="scheduler",
                                    **(DDIM_KEYS if name == "ddim" else {}))
    out[name] = _torch_pipeline({**pipe.components, "scheduler": scheduler})
  return out, pipeline_xl.load_stable_diffusion_xl(folder)


def _torch_pipeline(components, **kw):
  """diffusers' SDXL pipeline without the invisible watermark (diffusers adds it to the images
  whenever the `invisible-watermark` package happens to be installed)."""
  pipe = diffusers.StableDiffusionXLPipeline(**components, add_watermarker=False, **kw)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def _x_start(t2i):
  keys = samplers.sample_keys(np.array(SEEDS, np.uint64) % 2 ** 32, np.array(INDICES))
  return np.asarray(samplers.initial_noise(keys, t2i.latent_shape))


def _torch_images(pipe, t2i, negative_prompts=None, **call_kw):
  """diffusers, one sample per call (per-sample guidance scale), from our x_T."""
  x_start = _x_start(t2i)
  out = []
  for b in range(len(PROMPTS)):
    with torch.no_grad():
      out.append(pipe(PROMPTS[b], negative_prompt=None if negative_prompts is None
                      else negative_prompts[b], num_inference_steps=t2i.settings.num_steps,
                      guidance_scale=GUIDANCE[b], height=t2i.height, width=t2i.width,
                      latents=torch.from_numpy(nhwc_to_nchw(x_start[b:b + 1]).copy()),
                      output_type="np", **call_kw).images)
  return np.concatenate(out)


def _err(ours, expected):
  assert ours.shape == expected.shape == (2, 16, 16, 3), (ours.shape, expected.shape)
  return float(np.abs(ours / 2 + 0.5 - expected).max())


def _t2i(xl, sampler, steps, guard=None, mesh=None, **kw):
  overrides = tuple(DDIM_KEYS.items()) if sampler == "ddim" else ()
  settings = generate.SamplingSettings(sampler=sampler, num_steps=steps,
                                       guard=guard or guards.GuardConfig.make("none"),
                                       scheduler_overrides=overrides)
  return generate.TextToImage(xl, dataclasses.replace(settings, **kw), batch_size=2, mesh=mesh)


@pytest.fixture(scope="module")
def ddim_cfg(pipes):
  """Ours and diffusers' DDIM + CFG with force_zeros_for_empty_prompt (no negative prompt)."""
  torch_pipes, xl = pipes
  assert xl.force_zeros_for_empty_prompt
  t2i = _t2i(xl, "ddim", 4)
  return t2i, t2i(PROMPTS, SEEDS, INDICES, GUIDANCE), _torch_images(torch_pipes["ddim"], t2i)


def test_ddim_cfg_force_zeros_matches_diffusers(ddim_cfg, pipes):
  t2i, ours, expected = ddim_cfg
  assert type(t2i) is generate.TextToImageXL and isinstance(t2i, generate.TextToImage)
  assert _err(ours, expected) <= ATOL  # measured 6.2e-6
  # The zeros matter: diffusers with the encoded "" as unconditional gives other images.
  torch_pipes, _ = pipes
  encoded = _torch_pipeline(torch_pipes["ddim"].components, force_zeros_for_empty_prompt=False)
  assert np.abs(_torch_images(encoded, t2i) - expected).max() > 1e-2
  # one image alone (padded batch) is the same image: generation is per sample
  alone = t2i(PROMPTS[1:], SEEDS[1:], INDICES[1:], GUIDANCE[1:])
  np.testing.assert_allclose(alone[0], ours[1], atol=1e-6, rtol=0)


def test_ddim_negative_prompt_and_micro_conditioning_match_diffusers_on_a_mesh(pipes):
  """Negative prompts (both encoders, pooled too) and non-default time ids, one program."""
  torch_pipes, xl = pipes
  sizes = dict(original_size=(1024, 768), crops_coords_top_left=(32, 8), target_size=(16, 32))
  t2i = _t2i(xl, "ddim", 4, guards.GuardConfig.make("standard"), mesh=parallel.make_mesh(),
             **sizes)
  np.testing.assert_array_equal(t2i.time_ids, [[1024, 768, 32, 8, 16, 32]])
  ours = t2i(PROMPTS, SEEDS, INDICES, GUIDANCE, NEGATIVES)
  expected = _torch_images(torch_pipes["ddim"], t2i, NEGATIVES, **sizes)
  assert _err(ours, expected) <= ATOL  # measured 5.0e-6
  # the time ids are live: diffusers' default ones give other images
  default = _torch_images(torch_pipes["ddim"], t2i, NEGATIVES)
  assert np.abs(default - expected).max() > 1e-2


def test_dpm_solver_cfg_encoded_empty_prompt_matches_diffusers(pipes):
  """force_zeros_for_empty_prompt False: the unconditional branch is the encoded ""."""
  torch_pipes, xl = pipes
  t2i = _t2i(dataclasses.replace(xl, force_zeros_for_empty_prompt=False), "dpmsolver++", 5)
  ours = t2i(PROMPTS, SEEDS, INDICES, GUIDANCE)
  ref = _torch_pipeline(torch_pipes["dpmsolver++"].components, force_zeros_for_empty_prompt=False)
  assert _err(ours, _torch_images(ref, t2i)) <= ATOL  # measured 4.6e-6


def test_sld_runs_on_the_sdxl_branches(ddim_cfg, pipes):
  """No diffusers SDXL SLD exists: with the safety term held off (warmup past the last step) SLD
  is CFG; switched on it moves the images."""
  _, xl = pipes
  t2i, cfg, _ = ddim_cfg
  held = guards.GuardConfig.make(sld=dataclasses.replace(guards.sld_config("max"),
                                                         warmup_steps=100.0))
  sld = _t2i(xl, "ddim", 4, held)
  np.testing.assert_allclose(sld(PROMPTS, SEEDS, INDICES, GUIDANCE), cfg, atol=1e-5, rtol=0)
  on = copy.copy(sld)  # same compiled program: the SLD floats are traced
  on.settings = dataclasses.replace(sld.settings,
                                    guard=guards.GuardConfig.make(sld=guards.sld_config("max")))
  images = on(PROMPTS, SEEDS, INDICES, GUIDANCE)
  assert np.isfinite(images).all() and np.abs(images - cfg).max() > 1e-2


def test_trasce_runs_and_unsupported_settings_are_named(pipes):
  _, xl = pipes
  trasce = _t2i(xl, "ddim", 2, guards.GuardConfig.make("trasce", 50.0, 1.0, 2.0))
  images = trasce(PROMPTS, SEEDS, INDICES, GUIDANCE, NEGATIVES)
  assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
  with pytest.raises(ValueError, match="needs negative_prompts"):
    trasce(PROMPTS, SEEDS, INDICES, GUIDANCE)
  with pytest.raises(ValueError, match="SAFREE guard is not supported for SDXL"):
    _t2i(xl, "ddim", 2, guards.safree_guard("nudity"))
  with pytest.raises(ValueError, match="text_layer=-2.*clip_skip is not supported"):
    _t2i(xl, "ddim", 2, text_layer=-2)
  with pytest.raises(ValueError, match="needs the pipeline component 'text_encoder_2'"):
    _t2i(dataclasses.replace(xl, text_encoder_2=None), "ddim", 2)
  sd = pipeline.StableDiffusion(**{f.name: getattr(xl, f.name)
                                   for f in dataclasses.fields(pipeline.StableDiffusion)})
  with pytest.raises(ValueError, match="SDXL micro-conditioning"):
    _t2i(sd, "ddim", 2, original_size=(64, 64))
