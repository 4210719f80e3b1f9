"""Safe Latent Diffusion against diffusers' `StableDiffusionPipelineSafe` on a tiny pipeline.

The same tiny random UNet/VAE/CLIP as tests/test_sampling.py, the same x_T, one prompt per
diffusers call (SLD's momentum is per sample either way); our jitted `TextToImage` with the SLD
guard must give the same [0, 1] pixels to 1e-5.
"""

import numpy as np
import pytest
import diffusers
import torch

from scdpo_jax.models import pipeline
from scdpo_jax.sampling import generate, guards, samplers
from tests.torch_refs import nhwc_to_nchw, tiny_torch_pipeline

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning", "ignore:Safety checker disabled")

PROMPTS = ["a red cat on a mat", "two blue squares"]
NEGATIVES = ["blurry, ugly", "a red cat"]
SEEDS, INDICES, GUIDANCE = [3, 11], [0, 1], [7.5, 3.0]


def _safe_pipeline_class():
  from diffusers import StableDiffusionPipelineSafe  # deprecated/ in diffusers >= 0.3x
  return StableDiffusionPipelineSafe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("sld") / "pipe"
  pipe = tiny_torch_pipeline(folder, tmp_path_factory.mktemp("sld_tok"))
  return pipe, pipeline.load_stable_diffusion(folder), folder


def _safe_pipe(pipe, folder, scheduler_cls):
  # a fresh scheduler: the Safe pipeline rewrites its scheduler's config in place
  components = {**pipe.components,
                "scheduler": scheduler_cls.from_pretrained(folder, subfolder="scheduler")}
  safe = _safe_pipeline_class()(**components)
  safe.set_progress_bar_config(disable=True)
  return safe


def _reference(safe, t2i, sld, negative_prompts=None):
  keys = samplers.sample_keys(np.array(SEEDS), np.array(INDICES))
  x_start = np.asarray(samplers.initial_noise(keys, t2i.latent_shape))
  out = []
  for b in range(len(PROMPTS)):
    with torch.no_grad():
      out.append(safe(
          PROMPTS[b], negative_prompt=None if negative_prompts is None else negative_prompts[b],
          num_inference_steps=t2i.settings.num_steps, guidance_scale=GUIDANCE[b],
          height=t2i.height, width=t2i.width, output_type="np",
          latents=torch.from_numpy(nhwc_to_nchw(x_start[b:b + 1]).copy()),
          sld_guidance_scale=float(sld.guidance_scale),
          sld_warmup_steps=int(sld.warmup_steps), sld_threshold=float(sld.threshold),
          sld_momentum_scale=float(sld.momentum_scale),
          sld_mom_beta=float(sld.mom_beta)).images)
  return np.concatenate(out)


def test_presets_are_diffusers_safety_config():
  from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
  for name, ref in (("weak", SafetyConfig.WEAK), ("medium", SafetyConfig.MEDIUM),
                    ("strong", SafetyConfig.STRONG), ("max", SafetyConfig.MAX)):
    assert guards.SLD_PRESETS[name] == {k.removeprefix("sld_"): v for k, v in ref.items()}
  safe_cls = _safe_pipeline_class()
  # the default concept text of the pipeline (set in __init__)
  import inspect
  source = inspect.getsource(safe_cls.__init__)
  for phrase in guards.SLD_SAFETY_CONCEPT.split(", "):
    assert phrase in source.replace('"\n            "', "").replace('" "', "")


def _compare(tiny, sampler, num_steps, sld, negatives):
  pipe, sd, folder = tiny
  scheduler = {"ddim": diffusers.DDIMScheduler,
               "dpmsolver++": diffusers.DPMSolverMultistepScheduler}[sampler]
  mode = "standard" if negatives else "none"
  settings = generate.SamplingSettings(sampler=sampler, num_steps=num_steps,
                                       guard=guards.GuardConfig.make(mode, sld=sld))
  t2i = generate.TextToImage(sd, settings, batch_size=2)
  ours = t2i(PROMPTS, SEEDS, INDICES, GUIDANCE, negatives) / 2 + 0.5
  expected = _reference(_safe_pipe(pipe, folder, scheduler), t2i, sld, negatives)
  # SLD changed the images (the comparison is not between two unguarded runs): the Safe
  # pipeline with sld_guidance_scale 0 is the plain pipeline
  unguarded = _reference(_safe_pipe(pipe, folder, scheduler), t2i,
                         sld.replace(guidance_scale=0.0), negatives)
  assert np.abs(unguarded - expected).max() > 1e-3
  return np.abs(ours - expected)


def test_sld_medium_preset_matches_diffusers_safe_pipeline(tiny):
  # 12 DDIM steps: 10 warm-up steps build the momentum, SLD acts on the last 2
  err = _compare(tiny, "ddim", 12, guards.sld_config("medium"), None)
  assert err.max() <= 1e-5, err.max()  # measured 3.2e-6


def test_sld_momentum_from_step_0_dpm_negative_prompt_matches_diffusers(tiny):
  # max's s_S, momentum and warm-up 0 with threshold 0, DPM-Solver++, negative prompts as the
  # anchor. Threshold 0 keeps the rule continuous (the scale is 0 on both sides of d = 0).
  sld = guards.SLDConfig(guidance_scale=5000.0, warmup_steps=0.0, threshold=0.0,
                         momentum_scale=0.5, mom_beta=0.7)
  err = _compare(tiny, "dpmsolver++", 5, sld, NEGATIVES)
  # s_S 5000 multiplies fp32 rounding differences of the noise estimates (min(s_S |d|, 1) sits
  # at its cap or its slope 5000 near d = 0): measured max 9.4e-6 on one machine and 3.8e-5 on
  # another (an AMD EPYC; there max 5.4e-6 at s_S 2, 2.2e-5 at 50, 6.5e-5 at 500), the median
  # 5e-7 at every scale. A wrong rule moves the median, so both are checked.
  assert np.median(err) <= 2e-6, np.median(err)
  assert err.max() <= 1e-4, err.max()


def test_sld_max_preset_agrees_up_to_threshold_flips(tiny):
  """With threshold t > 0 the rule jumps at d = e(p) - e(s) = t (mu from min(t s_S, 1) to 0), so
  an element whose d lies within fp32 rounding of t takes the other branch in one of the two
  implementations; the latent then differs by w |e(s) - u| at that element and the VAE spreads
  it. For "max" (t = 1) we measured max 1.5e-4 with the median error 9e-7; the presets with
  t = 0.01 matched to 1e-5 above."""
  err = _compare(tiny, "dpmsolver++", 5, guards.sld_config("max"), NEGATIVES)
  assert np.median(err) <= 2e-6 and err.max() <= 1e-3, (np.median(err), err.max())


def test_sld_config_errors():
  with pytest.raises(ValueError, match="disables SLD"):
    guards.GuardConfig.make(sld=guards.SLDConfig(guidance_scale=1.0))
  with pytest.raises(ValueError, match="no TraSCE"):
    guards.GuardConfig.make("trasce", sld=guards.sld_config("weak"))
  with pytest.raises(ValueError, match="unknown SLD preset"):
    guards.sld_config("extreme")
