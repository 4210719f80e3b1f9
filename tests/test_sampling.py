"""Samplers and guards against PyTorch diffusers on the same inputs.

* Step math: our `lax.scan` DDIM / DPM-Solver++ 2M loops and diffusers' `DDIMScheduler` /
  `DPMSolverMultistepScheduler` `step` loops, fed the same deterministic fake model (so the
  comparison isolates the solver), the same x_T and (DDIM eta > 0) the same step noise.
* Guidance: classifier-free guidance, negative prompting and TraSCE (modified negative prompting
  + loss guidance) against a PyTorch port of the official TraSCE sampling loop.
* Whole pipeline: `TextToImage` with a tiny UNet/VAE/CLIP against diffusers'
  `StableDiffusionPipeline` given the same x_T (DDIM + negative prompt, DPM-Solver++ + CFG).
"""

import dataclasses
import logging
import numpy as np
import pytest
import diffusers
import torch
import transformers
import jax
import jax.numpy as jnp

from scdpo_jax import parallel
from scdpo_jax.models import pipeline, schedule as sch, tokenizer
from scdpo_jax.sampling import generate, guards, samplers
from tests.torch_refs import nhwc_to_nchw, tiny_torch_pipeline


pytestmark = pytest.mark.filterwarnings(  # diffusers DPM-Solver on numpy 2 + torch
    "ignore:__array__ implementation:DeprecationWarning")

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
            beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1)
SHAPE = (2, 8, 8, 4)  # (B, H, W, C), channels-last as our samplers; the fake model is elementwise


# ----------------------------------------------------------------------------- fake models


def _fake_output(lib, x, t, cond):
  """A smooth, non-trivial 'network': elementwise in x, depends on t and per-channel on cond.

  x (N,H,W,C), t (N,) or scalar, cond (N,C). Same formula for numpy/torch (lib) and jax.numpy.
  """
  if lib is torch:
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return 0.9 * torch.tanh(x * (0.5 + t / 1000.0)) + 0.3 * torch.sin(1.5 * x + cond[:, None,
                                                                                     None, :])
  t = jnp.asarray(t, jnp.float32).reshape(-1, 1, 1, 1)
  return 0.9 * jnp.tanh(x * (0.5 + t / 1000.0)) + 0.3 * jnp.sin(1.5 * x + cond[:, None, None, :])


def jax_model(x, t, states):
  """ConditionalModel: states (N, T, D>=C) -> per-channel condition = mean over tokens."""
  return _fake_output(jnp, x, t, states[:, :, :x.shape[-1]].mean(axis=1))


def torch_model(x, t, states):
  return _fake_output(torch, x, t, states[:, :, :x.shape[-1]].mean(dim=1))


def _x_start(seed=0):
  return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def _ours_unconditional(plan, x_start, keys=None):
  cond = jnp.zeros((SHAPE[0], 1, SHAPE[-1]), jnp.float32)
  denoise = lambda x, t: (jax_model(x, jnp.full((x.shape[0],), t), cond), x)
  return np.asarray(jax.jit(lambda x, k: samplers.run_sampler(plan, denoise, x, k))(x_start,
                                                                                    keys))


def _reference_loop(scheduler, x_start, step_kwargs=lambda i: {}):
  cond = torch.zeros((SHAPE[0], SHAPE[-1]))
  x = torch.from_numpy(x_start.copy())
  for i, t in enumerate(scheduler.timesteps):
    x = scheduler.step(torch_model(x, t, cond[:, None, :]), t, x, **step_kwargs(i)).prev_sample
  return x.numpy()


def _close(ours, ref, rtol=3e-6):
  """max |ours - ref| <= rtol * max(1, max |ref|). Solver loops measure <= 1.5e-6 (fp32)."""
  scale = max(1.0, float(np.abs(ref).max()))
  np.testing.assert_allclose(ours, ref, atol=rtol * scale, rtol=0)


# ----------------------------------------------------------------------------- timestep grids


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0),
                                            ("linspace", 0)])
@pytest.mark.parametrize("steps", [1, 7, 50, 333])
def test_ddim_timesteps_match_diffusers(spacing, offset, steps):
  ref = diffusers.DDIMScheduler.from_config({**SD15, "timestep_spacing": spacing,
                                             "steps_offset": offset})
  ref.set_timesteps(steps)
  np.testing.assert_array_equal(samplers.ddim_timesteps(steps, 1000, spacing, offset),
                                ref.timesteps.numpy())


@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("steps", [1, 10, 25, 500])
def test_dpm_timesteps_match_diffusers(spacing, offset, steps):
  ref = diffusers.DPMSolverMultistepScheduler.from_config(
      {**SD15, "timestep_spacing": spacing, "steps_offset": offset})
  ref.set_timesteps(steps)
  plan = samplers.dpm_solver_plan(sch.schedule_from_config(dict(ref.config)), steps)
  np.testing.assert_array_equal(np.asarray(plan.timesteps), ref.timesteps.numpy())


# ----------------------------------------------------------------------------- solver loops


@pytest.mark.parametrize("overrides,steps", [
    ({}, 10),
    ({"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 7),
    ({"timestep_spacing": "linspace", "set_alpha_to_one": True}, 12),
    ({"clip_sample": True, "clip_sample_range": 1.5, "prediction_type": "sample"}, 6),
    ({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
      "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 8),
    ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
      "prediction_type": "v_prediction"}, 3),  # zero SNR, few steps
])
def test_ddim_matches_diffusers(overrides, steps):
  config = {**SD15, **overrides}
  ref = diffusers.DDIMScheduler.from_config(config)
  ref.set_timesteps(steps)
  expected = _reference_loop(ref, _x_start())
  plan = samplers.make_plan(sch.schedule_from_config(config), "ddim", steps)
  # diffusers builds the cosine betas in float32 (we use float64), which near zero SNR shifts its
  # trajectory by ~7e-6 relative; every other case measures <= 5e-7.
  cosine = overrides.get("beta_schedule") == "squaredcos_cap_v2"
  _close(_ours_unconditional(plan, _x_start()), expected, rtol=1e-5 if cosine else 3e-6)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_diffusers_with_the_same_noise(eta):
  steps = 9
  ref = diffusers.DDIMScheduler.from_config(SD15)
  ref.set_timesteps(steps)
  keys = samplers.sample_keys(np.array([11, 12]), np.array([0, 3]))
  noise_fn = jax.jit(samplers.step_noise, static_argnums=2)
  noise = [np.array(noise_fn(keys, i, SHAPE[1:])) for i in range(steps)]
  expected = _reference_loop(ref, _x_start(), lambda i: {
      "eta": eta, "variance_noise": torch.from_numpy(noise[i].copy())})
  plan = samplers.make_plan(sch.schedule_from_config(SD15), "ddim", steps, eta=eta)
  assert plan.stochastic
  ours = _ours_unconditional(plan, _x_start(), keys)
  _close(ours, expected)
  deterministic = _ours_unconditional(samplers.make_plan(sch.schedule_from_config(SD15), "ddim",
                                                         steps), _x_start())
  assert np.abs(ours - deterministic).max() > 0.1  # the noise really enters


@pytest.mark.parametrize("overrides,steps", [
    ({}, 10),  # < 15 steps: lower_order_final
    ({}, 20),  # >= 15 steps, final step to sigma = 0 still first order
    ({"solver_type": "heun", "final_sigmas_type": "sigma_min"}, 20),  # second-order final step
    ({"prediction_type": "v_prediction", "timestep_spacing": "leading"}, 25),
    # With final sigma 0 diffusers always takes a first-order last step, so lower_order_final
    # only shows with sigma_min (test_dpm_solver_cases_distinguish_the_flags).
    ({"timestep_spacing": "trailing", "lower_order_final": False,
      "final_sigmas_type": "sigma_min"}, 6),
    ({"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, 6),
    ({"final_sigmas_type": "sigma_min"}, 5),  # few steps, last step to sigma_min
    ({"euler_at_final": True, "final_sigmas_type": "sigma_min", "prediction_type": "sample"}, 16),
    ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
      "prediction_type": "v_prediction"}, 8),  # zero SNR
    ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
      "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"}, 4),
])
def test_dpm_solver_pp_2m_matches_diffusers(overrides, steps):
  config = {**SD15, **overrides}
  ref = diffusers.DPMSolverMultistepScheduler.from_config(config)
  assert ref.config.algorithm_type == "dpmsolver++" and ref.config.solver_order == 2
  ref.set_timesteps(steps)
  expected = _reference_loop(ref, _x_start(1))
  plan = samplers.make_plan(sch.schedule_from_config(config), "dpmsolver++", steps)
  _close(_ours_unconditional(plan, _x_start(1)), expected)


@pytest.mark.parametrize("base,flag", [
    ({"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"},
     {"lower_order_final": False}),
    ({}, {"final_sigmas_type": "sigma_min"}),
])
def test_dpm_solver_cases_distinguish_the_flags(base, flag):
  """The few-step cases above would catch a flag that is ignored: in diffusers it changes the
  result by far more than the tolerance (0.47 and 0.03 here)."""
  outs = []
  for config in ({**SD15, **base}, {**SD15, **base, **flag}):
    ref = diffusers.DPMSolverMultistepScheduler.from_config(config)
    ref.set_timesteps(6 if base else 5)
    outs.append(_reference_loop(ref, _x_start(1)))
  assert np.abs(outs[0] - outs[1]).max() > 1e-2


def test_unsupported_scheduler_options_are_named():
  with pytest.raises(ValueError, match="use_karras_sigmas"):
    samplers.dpm_solver_plan(sch.schedule_from_config({**SD15, "use_karras_sigmas": True}), 10)
  with pytest.raises(ValueError, match="thresholding"):
    samplers.ddim_plan(sch.schedule_from_config({**SD15, "thresholding": True}), 10)
  with pytest.raises(ValueError, match="timestep_spacing='karras'"):
    samplers.ddim_timesteps(10, 1000, "karras")
  with pytest.raises(ValueError, match="eta"):
    samplers.make_plan(sch.schedule_from_config(SD15), "dpmsolver++", 10, eta=0.3)
  with pytest.raises(ValueError, match="unknown sampler 'euler'"):
    samplers.make_plan(sch.schedule_from_config(SD15), "euler", 10)


# ----------------------------------------------------------------------------- guidance


def _states(seed, n=SHAPE[0], tokens=3, dim=6):
  return np.random.default_rng(seed).standard_normal((n, tokens, dim)).astype(np.float32)


UNCOND, PROMPT, NEGATIVE = _states(1), _states(2), _states(3)
SCALES = np.array([7.5, 3.0], np.float32)


def _ours_guided(guard, plan, prompt=PROMPT, negative=NEGATIVE):
  cond = guards.Conditioning(prompt=jnp.asarray(prompt), unconditional=jnp.asarray(UNCOND),
                             guidance_scale=jnp.asarray(SCALES),
                             negative=jnp.asarray(negative))
  fn = jax.jit(lambda x, c, g: samplers.run_sampler(
      plan, guards.guided_denoiser(jax_model, c, g), x))
  return np.asarray(fn(_x_start(2), cond, guard))


def _torch_guided(mode, steps, loss=None, prompt=PROMPT, negative=NEGATIVE):
  """PyTorch reference, one sample at a time (batch size 1 as in the official TraSCE script).

  mode "none" / "standard" is diffusers' pipeline rule; "trasce" and the loss guidance follow
  TraSCE's `generate_images_concept_erasure.py` sampling loop (DDIM, loss gradient w.r.t. the
  latents through the 3-way batch, latents moved, then `scheduler.step(noise_pred, t, latents)`
  with the guided prediction computed before the move).
  """
  out = []
  for b in range(SHAPE[0]):
    scheduler = diffusers.DDIMScheduler.from_config(SD15)
    scheduler.set_timesteps(steps)
    latents = torch.from_numpy(_x_start(2)[b:b + 1].copy())
    emb = torch.from_numpy(np.concatenate([UNCOND[b:b + 1], prompt[b:b + 1],
                                           negative[b:b + 1]]))
    w = float(SCALES[b])
    for t in scheduler.timesteps:
      if loss is not None:
        latents = latents.detach().requires_grad_()
      noise_pred = torch_model(torch.cat([latents] * 3), t, emb)
      uncond, text, neg = noise_pred.chunk(3)
      if loss is not None:
        scale, step, sigma = loss
        value = -1 * scale * torch.exp(-torch.norm(text - neg) / float(sigma))
        grad = torch.autograd.grad(value, latents)[0]
        latents = latents.detach() - step * grad
      if mode == "none":
        guided = uncond + w * (text - uncond)
      elif mode == "standard":
        guided = neg + w * (text - neg)
      else:
        guided = uncond + w * (text - neg)
      latents = scheduler.step(guided.detach(), t, latents.detach()).prev_sample
    out.append(latents.numpy())
  return np.concatenate(out)


@pytest.mark.parametrize("mode", guards.NEGATIVE_PROMPTING)
def test_guidance_modes_match_reference(mode):
  plan = samplers.make_plan(sch.schedule_from_config(SD15), "ddim", 6)
  ours = _ours_guided(guards.GuardConfig.make(mode), plan)
  # guidance scale 7.5 amplifies fp32 rounding: measured <= 5e-6 ("standard")
  _close(ours, _torch_guided(mode, 6), rtol=1e-5)


@pytest.mark.parametrize("mode", ["trasce", "none"])
def test_trasce_loss_guidance_matches_official_loop(mode):
  # s_l large enough that the guidance visibly moves this fake model; few steps because the fake
  # model is no denoiser and amplifies float32 rounding over long trajectories
  steps, loss = 3, (20.0, 1.0, 2.0)
  plan = samplers.make_plan(sch.schedule_from_config(SD15), "ddim", steps)
  ours = _ours_guided(guards.GuardConfig.make(mode, *loss), plan)
  expected = _torch_guided(mode, steps, loss)
  _close(ours, expected)
  without = _ours_guided(guards.GuardConfig.make(mode), plan)
  assert np.abs(ours - without).max() > 0.1, "the loss guidance had no effect"


def test_trasce_with_the_concept_as_prompt_is_unconditional_and_finite():
  """TraSCE's corner case: prompt == negative prompt gives the unconditional prediction (and the
  loss gradient at distance 0 is 0, not NaN)."""
  plan = samplers.make_plan(sch.schedule_from_config(SD15), "ddim", 5)
  ours = _ours_guided(guards.trasce_guard("nudity"), plan, prompt=NEGATIVE, negative=NEGATIVE)
  assert np.isfinite(ours).all()
  cond = jnp.asarray(UNCOND)
  denoise = lambda x, t: (jax_model(x, jnp.full((x.shape[0],), t), cond), x)
  unconditional = jax.jit(lambda x: samplers.run_sampler(plan, denoise, x))(_x_start(2))
  _close(ours, np.asarray(unconditional))


def test_noise_is_per_sample_and_independent_of_the_batch():
  keys = samplers.sample_keys(np.array([5, 5, 6]), np.array([0, 1, 0]))
  x = np.asarray(samplers.initial_noise(keys, (4, 4, 2)))
  single = np.asarray(samplers.initial_noise(samplers.sample_keys(np.array([6]), np.array([0])),
                                             (4, 4, 2)))
  np.testing.assert_array_equal(x[2], single[0])
  assert np.abs(x[0] - x[1]).max() > 0.5  # same seed, another image index: other noise


# ----------------------------------------------------------------------------- whole pipeline


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
  """A tiny random diffusers StableDiffusionPipeline, saved, and the same folder loaded by us."""
  folder = tmp_path_factory.mktemp("sd") / "pipe"
  pipe = tiny_torch_pipeline(folder, tmp_path_factory.mktemp("tok"))
  pipe.set_progress_bar_config(disable=True)
  return pipe, pipeline.load_stable_diffusion(folder), folder


PROMPTS = ["a red cat on a mat", "two blue squares"]
NEGATIVES = ["blurry, ugly", "a red cat"]
SEEDS, INDICES, GUIDANCE = [3, 2 ** 32 + 3], [0, 1], [7.5, 3.0]


def _torch_images(pipe, t2i, negative_prompts=None):
  keys = samplers.sample_keys(np.array(SEEDS, np.uint64) % 2 ** 32, np.array(INDICES))
  x_start = np.asarray(samplers.initial_noise(keys, t2i.latent_shape))
  out = []
  for b in range(len(PROMPTS)):
    with torch.no_grad():
      out.append(pipe(PROMPTS[b], negative_prompt=None if negative_prompts is None
                      else negative_prompts[b], num_inference_steps=t2i.settings.num_steps,
                      guidance_scale=GUIDANCE[b], height=t2i.height, width=t2i.width,
                      latents=torch.from_numpy(nhwc_to_nchw(x_start[b:b + 1]).copy()),
                      output_type="np").images)
  return np.concatenate(out)


def test_text_to_image_ddim_negative_prompt_matches_diffusers_pipeline(tiny_pipelines):
  pipe, sd, _ = tiny_pipelines
  settings = generate.SamplingSettings(sampler="ddim", num_steps=4,
                                       guard=guards.GuardConfig.make("standard"))
  t2i = generate.TextToImage(sd, settings, batch_size=2, mesh=parallel.make_mesh())
  ours = t2i(PROMPTS, SEEDS, INDICES, GUIDANCE, NEGATIVES)
  assert ours.shape == (2, 16, 16, 3)
  expected = _torch_images(pipe, t2i, NEGATIVES)
  np.testing.assert_allclose(ours / 2 + 0.5, expected, atol=1e-5, rtol=0)  # measured 5.4e-6
  # one image alone (padded batch) is the same image: generation is per sample
  alone = t2i(PROMPTS[1:], SEEDS[1:], INDICES[1:], GUIDANCE[1:], NEGATIVES[1:])
  np.testing.assert_allclose(alone[0], ours[1], atol=1e-6, rtol=0)


def test_text_to_image_dpm_solver_cfg_matches_diffusers_pipeline(tiny_pipelines):
  pipe, sd, folder = tiny_pipelines
  # The scheduler swap as users do it on a saved folder: DPM-Solver reads the folder's
  # scheduler_config.json (an in-memory `from_config(pipe.scheduler.config)` would instead drop
  # the values the DDIM scheduler took by default, e.g. timestep_spacing).
  dpm_pipe = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler": (
      diffusers.DPMSolverMultistepScheduler.from_pretrained(folder, subfolder="scheduler"))})
  dpm_pipe.set_progress_bar_config(disable=True)
  settings = generate.SamplingSettings(sampler="dpmsolver++", num_steps=5)
  t2i = generate.TextToImage(sd, settings, batch_size=2)
  ours = t2i(PROMPTS, SEEDS, INDICES, GUIDANCE)
  np.testing.assert_allclose(ours / 2 + 0.5, _torch_images(dpm_pipe, t2i), atol=1e-5,
                             rtol=0)  # measured 4.5e-6


def test_text_to_image_trasce_runs_on_the_unet(tiny_pipelines):
  _, sd, _ = tiny_pipelines
  guarded = generate.TextToImage(sd, generate.SamplingSettings(
      num_steps=3, guard=guards.GuardConfig.make("trasce", 50.0, 1.0, 2.0)), batch_size=2)
  images = guarded(PROMPTS, SEEDS, INDICES, GUIDANCE, NEGATIVES)
  assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
  # the unrolled loop (CPU configs) is the same arithmetic as the scanned one
  unrolled = generate.TextToImage(sd, dataclasses.replace(guarded.settings, scan_unroll=3),
                                  batch_size=2)
  np.testing.assert_allclose(unrolled(PROMPTS, SEEDS, INDICES, GUIDANCE, NEGATIVES), images,
                             atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="needs negative_prompts"):
    guarded(PROMPTS, SEEDS, INDICES, GUIDANCE)


def test_a_program_kept_out_of_the_persistent_cache_is_compiled_and_not_written(
    tiny_pipelines, caplog):
  _, sd, _ = tiny_pipelines
  settings = generate.SamplingSettings(num_steps=2, persistent_cache=False)
  # batch 3: a program no test writes, so it cannot be in the cache from an earlier run
  uncached = generate.TextToImage(sd, settings, batch_size=3)
  caplog.set_level(logging.DEBUG, logger="jax._src.compiler")
  images = uncached(PROMPTS, SEEDS, INDICES, GUIDANCE)
  assert any(r.getMessage().startswith("Not writing persistent cache entry for 'jit__generate'")
             for r in caplog.records), "the sampler was written to the cache (or not compiled)"
  cached = generate.TextToImage(sd, dataclasses.replace(settings, persistent_cache=True),
                                batch_size=2)
  np.testing.assert_allclose(images, cached(PROMPTS, SEEDS, INDICES, GUIDANCE), atol=1e-5,
                             rtol=0)
