"""SAFREE: each step against a NumPy transcription of the official code
(`jaehong31/SAFREE@b8b2c3f`, models/modified_stable_diffusion_pipeline.py: `projection_matrix`,
`safree_projection`, `projection_and_orthogonal` + the svf cosine, `f_beta`,
`_masked_encode_prompt`; free_lunch_utils.py: `SafeGuard_Low_Fourier_filter` and the
`safree='low'` up-block hook), and the whole guard end to end on the tiny pipeline against a
PyTorch port of the official sampling loop (DPM-Solver++, the concept phrases as negative prompt,
filtered states on the steps i <= t'; for latent re-attention 'low' the 3-branch batch with the
hook on the diffusers UNet's up-block resnets).
"""

import math

import numpy as np
import pytest
import diffusers
import torch
import jax
import jax.numpy as jnp

from scdpo_jax.models import pipeline
from scdpo_jax.sampling import generate, guards, safree, samplers
from tests.torch_refs import nhwc_to_nchw, tiny_torch_pipeline

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning",
                                        "ignore:Mean of empty slice", "ignore:invalid value")


# ----------------------------------------------------------------------------- NumPy transcription


def np_projection_matrix(e):
  """`projection_matrix(E)`: E (D, K) -> E (E^T E)^+ E^T (float64 here)."""
  e = np.asarray(e, np.float64)
  return e @ np.linalg.pinv(e.T @ e) @ e.T


def np_safree_projection(text_e, p_emb, ms, cs, alpha, max_length):
  """`safree_projection` for one prompt: text_e (T, D), p_emb (n, D); returns (merged states,
  rm_vector: 1 safe / 0 trigger)."""
  n_t, dim = p_emb.shape
  i_m_cs = np.eye(dim) - cs
  dist = np.linalg.norm(i_m_cs @ p_emb.T, axis=0)
  means = np.array([np.mean(np.concatenate([dist[:i], dist[i + 1:]])) for i in range(n_t)])
  rm_vector = (dist < (1.0 + alpha) * means).astype(np.float64)
  ones = np.ones(max_length)
  ones[1:n_t + 1] = rm_vector
  new_text_e = (i_m_cs @ ms @ text_e.T).T
  merged = np.where(ones[:, None].astype(bool), text_e, new_text_e)
  return merged, rm_vector


def np_beta(text_e, ms, cs, attn_mask):
  """The svf block: 1 - mean cosine of `projection_and_orthogonal`'s states and the prompt's over
  the active tokens (F.cosine_similarity, eps 1e-8)."""
  proj = ((np.eye(ms.shape[0]) - cs) @ ms @ text_e.T).T
  act = attn_mask == 1
  p, e = proj[act], text_e[act]
  cos = np.sum(p * e, -1) / np.maximum(np.linalg.norm(p, axis=-1) * np.linalg.norm(e, axis=-1),
                                       1e-8)
  return 1.0 - cos.mean()


def np_low_fourier_filter(x, threshold, scale):
  """`SafeGuard_Low_Fourier_filter` on one prompt's UNet batch x (3, C, H, W) = [uncond,
  filtered, original]: float32 FFTs, branch 1's centred window coefficients kept where
  Re(F_2 - F_1) > 0, else replaced by the real `scale`; every branch goes back through ifft."""
  f = np.fft.fftshift(np.fft.fftn(x.astype(np.float32), axes=(-2, -1)), axes=(-2, -1))
  f = f.astype(np.complex64)
  cr, cc = f.shape[-2] // 2, f.shape[-1] // 2
  rows, cols = slice(cr - threshold, cr + threshold), slice(cc - threshold, cc + threshold)
  low = f[..., rows, cols].copy()
  f[1, :, rows, cols] = np.where((low[2] - low[1]).real > 0.0, low[1], scale)
  out = np.fft.ifftn(np.fft.ifftshift(f, axes=(-2, -1)), axes=(-2, -1)).real
  return out.astype(x.dtype)


def np_f_beta(z, upperbound_timestep=10, k=2.5, t=5.333):
  value = 1 / (1 + math.exp(-(2.0 * k * (10 * z - t))))
  return round(upperbound_timestep * value)


# ----------------------------------------------------------------------------- the steps


def test_projection_matches_official_projection_matrix():
  rng = np.random.default_rng(0)
  c = rng.standard_normal((17, 32)) + 2.0 * rng.standard_normal(32)  # correlated, like CLIP
  basis = np.asarray(safree.orthonormal_basis(jnp.asarray(c, jnp.float32)), np.float64)
  np.testing.assert_allclose(basis @ basis.T, np_projection_matrix(c.T), atol=2e-5)
  # invalid rows (masked prompts beyond n) do not enter the span
  valid = np.arange(17) < 9
  basis = np.asarray(safree.orthonormal_basis(jnp.asarray(c, jnp.float32), jnp.asarray(valid)))
  np.testing.assert_allclose(basis @ basis.T, np_projection_matrix(c[valid].T), atol=2e-5)


@pytest.mark.parametrize("n", [1, 2, 7, 30])
def test_trigger_tokens_match_official(n):
  rng = np.random.default_rng(n)
  dim, length = 32, 32
  concept = rng.standard_normal((17, dim))
  cs = np_projection_matrix(concept.T)
  # masked embeddings near the concept span for some tokens, far for others
  p = rng.standard_normal((length - 2, dim)) * rng.uniform(0.5, 1.5, (length - 2, 1))
  _, rm = np_safree_projection(np.zeros((length, dim)), p[:n], np.eye(dim), cs, 0.01, length)
  ours = safree.trigger_tokens(safree.orthonormal_basis(jnp.asarray(concept, jnp.float32)),
                               jnp.asarray(p, jnp.float32), jnp.arange(length - 2) < n, 0.01)
  ours = np.asarray(ours)
  np.testing.assert_array_equal(ours[:n], rm == 0)
  assert not ours[n:].any()
  if n == 1:
    assert ours[0]  # the official empty mean is NaN: the only token is a trigger
  if n == 30:
    assert 0 < ours.sum() < n  # both kinds occur


def test_projection_merge_and_beta_match_official():
  rng = np.random.default_rng(5)
  dim, length, n = 32, 32, 9
  concept = rng.standard_normal((17, dim))
  masked = rng.standard_normal((length - 2, dim))
  states = rng.standard_normal((length, dim))
  cs, ms = np_projection_matrix(concept.T), np_projection_matrix(masked[:n].T)
  merged, rm = np_safree_projection(states, masked[:n], ms, cs, 0.01, length)
  attn = (np.arange(length) < n + 2).astype(int)
  concept_basis = safree.orthonormal_basis(jnp.asarray(concept, jnp.float32))
  span_basis = safree.orthonormal_basis(jnp.asarray(masked, jnp.float32),
                                        jnp.arange(length - 2) < n)
  projected = safree.filtered_projection(jnp.asarray(states, jnp.float32), concept_basis,
                                         span_basis)
  np.testing.assert_allclose(np.asarray(projected), ((np.eye(dim) - cs) @ ms @ states.T).T,
                             atol=2e-5)
  trigger = np.concatenate([[False], rm == 0, np.zeros(length - n - 1, bool)])
  ours_merged = np.where(trigger[:, None], np.asarray(projected), states)
  np.testing.assert_allclose(ours_merged, merged, atol=2e-5)
  beta = float(safree.beta_value(jnp.asarray(states, jnp.float32), projected, jnp.asarray(n)))
  assert abs(beta - np_beta(states, ms, cs, attn)) < 1e-5


def test_f_beta_matches_official():
  for beta, expected in ((0.4, 0), (0.5, 2), (0.6, 10)):  # methods-wave2.md's examples
    assert np_f_beta(beta) == expected
  betas = np.linspace(0.3, 0.8, 101)
  ours = np.asarray(safree.filter_steps(jnp.asarray(betas, jnp.float32), 10.0, 2.5, 5.333))
  np.testing.assert_array_equal(ours, [np_f_beta(float(np.float32(b))) for b in betas])
  ours = np.asarray(safree.filter_steps(jnp.asarray(betas, jnp.float32), 10.0, 3.5, 5.5))
  np.testing.assert_array_equal(ours, [np_f_beta(float(np.float32(b)), 10, 3.5, 5.5)
                                       for b in betas])


@pytest.mark.parametrize("hw", [(4, 4), (8, 8), (5, 6), (2, 2)])
def test_low_fourier_filter_matches_official(hw):
  rng = np.random.default_rng(hw[0] * 10 + hw[1])
  b, c = 2, 3
  x = rng.standard_normal((b, 3, c) + hw).astype(np.float32)  # NCHW per prompt triple
  x[1, 2] = x[1, 1]  # prompt 1: an unfiltered step (current == original)
  ours = np.asarray(safree.low_fourier_filter(jnp.asarray(x.transpose(0, 1, 3, 4, 2)), 0.9))
  expected = np.stack([np_low_filter_nchw(x[i], 0.9) for i in range(b)])
  np.testing.assert_allclose(ours.transpose(0, 1, 4, 2, 3), expected, atol=2e-6)
  np.testing.assert_array_equal(ours[:, [0, 2]], x[:, [0, 2]].transpose(0, 1, 3, 4, 2))
  assert np.abs(ours[:, 1] - x[:, 1].transpose(0, 2, 3, 1)).max() > 1e-2  # it did something


def np_low_filter_nchw(x, scale):
  return np_low_fourier_filter(x, safree.LRA_THRESHOLD, scale)


def test_unet_skip_transform_hook():
  """The hook sees (backbone, skip) in diffusers' up-block order (the tiny UNet: up_blocks_0 =
  UpBlock2D(64) over skips 64, 32; up_blocks_1 = CrossAttnUpBlock2D(32) fed 64 then 32 channels,
  over skips 32, 32), at trace time (shapes only; the values are checked end to end against the
  diffusers UNet with the official hook in test_safree_guard_matches_official_loop)."""
  from configs.default import tiny_pipeline_config
  from scdpo_jax.models import layers, unet, unet_config

  cfg = unet_config.UNetConfig.from_dict(tiny_pipeline_config().unet.to_dict())
  model = unet.UNet2DConditionModel(cfg)
  params = layers.abstract_params(model)
  seen = []

  def identity(hidden, skip):
    seen.append((hidden.shape[-1], skip.shape[-1], hidden.shape[1]))
    return hidden, skip

  jax.eval_shape(lambda p, x, c: model.apply({"params": p}, x, jnp.asarray([10, 500]), c,
                                             skip_transform=identity),
                 params, jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32),
                 jax.ShapeDtypeStruct((2, 5, 32), jnp.float32))
  assert seen == [(64, 64, 4), (64, 32, 4), (64, 32, 8), (32, 32, 8)]


def test_lra_off_equals_released_and_config_checks():
  """'released' is the published no-op: the same guided outputs as 'off' at every step; 'low'
  refuses other branch layouts and UNets whose widths match no lra_channels."""
  rng = np.random.default_rng(2)
  b, t, d = 2, 6, 4
  cond = guards.Conditioning(
      prompt=jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32),
      unconditional=jnp.zeros((b, t, d)), guidance_scale=jnp.asarray([7.5, 3.0]),
      negative=jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32),
      filtered=jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32),
      filtered_until=jnp.asarray([1, 3], jnp.int32))
  model = lambda x, tt, states: x * jnp.mean(states, axis=(1, 2))[:, None, None, None] + tt[
      :, None, None, None] * 1e-3
  x = jnp.asarray(rng.standard_normal((b, 4, 4, 2)), jnp.float32)
  outs = {}
  for lra in ("off", "released"):
    g = guards.GuardConfig.make("standard", safree=safree.SafreeConfig(lra=lra))
    den = guards.guided_denoiser(model, cond, g)
    outs[lra] = [np.asarray(den.step(x, jnp.asarray(900), jnp.asarray(i), ())[0])
                 for i in range(5)]
  np.testing.assert_array_equal(np.stack(outs["off"]), np.stack(outs["released"]))
  assert np.abs(outs["off"][0] - outs["off"][4]).max() > 1e-3  # the window matters
  with pytest.raises(ValueError, match="no SLD, no TraSCE"):
    guards.GuardConfig.make("trasce", loss_scale=1.0, safree=safree.SafreeConfig(lra="low"))
  with pytest.raises(ValueError, match="two distinct"):
    safree.SafreeConfig(lra="low", lra_channels=(64, 64)).check()
  assert safree.lra_channels_for((320, 640, 1280, 1280)) == (1280, 640)
  assert safree.lra_channels_for((320, 640, 1280)) == (1280, 640)
  hook = safree.LowFrequencyReattention(safree.SafreeConfig(lra="low"))
  hook(jnp.zeros((3, 4, 4, 64)), jnp.zeros((3, 4, 4, 32)))
  with pytest.raises(ValueError, match=r"match no up-block backbone width .*\[64\]"):
    hook.check()


# ----------------------------------------------------------------------------- tiny pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("safree") / "pipe"
  pipe = tiny_torch_pipeline(folder, tmp_path_factory.mktemp("safree_tok"))
  return pipe, pipeline.load_stable_diffusion(folder), folder


PROMPTS = ["a nude red cat on a mat", "two blue squares"]
SEEDS, INDICES, GUIDANCE = [3, 11], [0, 1], [7.5, 3.0]


def _official_embeddings(pipe, prompt, concepts, alpha=0.01, up_t=10.0):
  """The official pipeline's prompt-side computation (torch encoder, NumPy float64 math)."""
  tok, te = pipe.tokenizer, pipe.text_encoder
  length = tok.model_max_length
  with torch.no_grad():
    inputs = tok(prompt, padding="max_length", max_length=length, truncation=True,
                 return_tensors="pt")
    text_e = te(inputs.input_ids)[0][0].double().numpy()
    space = tok(list(concepts), padding="max_length", max_length=length, truncation=True,
                return_tensors="pt")
    concept = te(space.input_ids, attention_mask=space.attention_mask).pooler_output
    untruncated = tok(prompt, padding="longest", return_tensors="pt").input_ids  # _masked_encode
    n = untruncated.shape[1] - 2
    masked = untruncated.repeat(n, 1)
    for i in range(n):
      masked[i, i + 1] = 0
    p_emb = te(masked, attention_mask=None).pooler_output.double().numpy()
  cs = np_projection_matrix(concept.double().numpy().T)
  ms = np_projection_matrix(p_emb.T)
  merged, rm = np_safree_projection(text_e, p_emb, ms, cs, alpha, length)
  beta = np_beta(text_e, ms, cs, inputs.attention_mask[0].numpy())
  return text_e, merged, rm, p_emb, np_f_beta(beta, up_t)


def test_masked_prompt_pooling_matches_official(tiny):
  pipe, sd, _ = tiny
  ids = jnp.asarray(generate.tokenizer_lib.tokenize(sd.tokenizer, PROMPTS[:1], 32))
  n = safree.real_token_counts(ids, sd.tokenizer.eos_token_id)
  copies, valid = safree.masked_ids(ids[0], n[0])
  pooled = sd.text_encoder.apply({"params": sd.text_encoder_params}, copies).pooler_output
  *_, p_emb, _ = _official_embeddings(pipe, PROMPTS[0], safree.NUDITY_CONCEPTS)
  assert int(n[0]) == len(p_emb) and int(valid.sum()) == len(p_emb)
  np.testing.assert_allclose(np.asarray(pooled)[:len(p_emb)], p_emb, atol=1e-5)


def _register_low_hook(unet, channels, b, s):
  """The official `safree='low'` up-block hook (`register_free_(crossattn_)upblock2d`) as
  forward pre-hooks on the diffusers UNet's up-block resnets: their input is
  cat([hidden, skip]); the backbone width is diffusers' `resnet_in_channels` (the previous
  block's width for resnet 0, the block's own after). Returns the hook handles."""
  rev = list(reversed(unet.config.block_out_channels))
  handles = []
  for i, block in enumerate(unet.up_blocks):
    prev = rev[max(i - 1, 0)]
    for j, resnet in enumerate(block.resnets):
      width = prev if j == 0 else rev[i]

      def hook(module, args, width=width):
        hidden, skip = args[0][:, :width].clone(), args[0][:, width:]
        for c, b_, s_ in zip(channels, b, s):
          if hidden.shape[1] == c:
            hidden[:, :c // 2] = hidden[:, :c // 2] * b_
            skip = torch.from_numpy(np_low_fourier_filter(skip.numpy(), 1, s_))
        return (torch.cat([hidden, skip], dim=1),) + tuple(args[1:])

      handles.append(resnet.register_forward_pre_hook(hook))
  return handles


def _official_images(pipe, folder, t2i, negative, concepts, up_t, filtered=True, low=None):
  """The official loop; `low` = (channels, (b1, b2), (s1, s2)): `-lra` with the intended
  'low' hook (UNet batch [negative, current, original], the third output discarded)."""
  handles = _register_low_hook(pipe.unet, *low) if low is not None else []
  try:
    return _official_loop(pipe, folder, t2i, negative, concepts, up_t, filtered, low is not None)
  finally:
    for h in handles:
      h.remove()


def _official_loop(pipe, folder, t2i, negative, concepts, up_t, filtered, lra):
  keys = samplers.sample_keys(np.array(SEEDS), np.array(INDICES))
  x_start = np.asarray(samplers.initial_noise(keys, t2i.latent_shape))
  tok, te = pipe.tokenizer, pipe.text_encoder
  out, info = [], []
  for b, prompt in enumerate(PROMPTS):
    text_e, merged, rm, _, last = _official_embeddings(pipe, prompt, concepts, up_t=up_t)
    last = last if filtered else -1
    info.append((rm, last))
    with torch.no_grad():
      neg = te(tok(negative, padding="max_length", max_length=tok.model_max_length,
                   truncation=True, return_tensors="pt").input_ids)[0]
      scheduler = diffusers.DPMSolverMultistepScheduler.from_pretrained(folder,
                                                                        subfolder="scheduler")
      scheduler.set_timesteps(t2i.settings.num_steps)
      latents = torch.from_numpy(nhwc_to_nchw(x_start[b:b + 1]).copy())
      for i, t in enumerate(scheduler.timesteps):
        emb = torch.from_numpy(merged if i <= last else text_e).float()[None]
        if lra:
          original = torch.from_numpy(text_e).float()[None]
          pred = pipe.unet(torch.cat([latents] * 3), t,
                           encoder_hidden_states=torch.cat([neg, emb, original])).sample
          uncond, text, _ = pred.chunk(3)
        else:
          pred = pipe.unet(torch.cat([latents] * 2), t,
                           encoder_hidden_states=torch.cat([neg, emb])).sample
          uncond, text = pred.chunk(2)
        latents = scheduler.step(uncond + GUIDANCE[b] * (text - uncond), t,
                                 latents).prev_sample
      image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
      out.append((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
  return np.concatenate(out), info


LOW = ((64, 32), (1.2, 0.8), (0.9, 0.2))  # lra 'low' on the tiny UNet: channels, (b1, b2), (s1, s2)


@pytest.mark.parametrize("up_t,lra", [(10.0, "released"), (3.0, "low")])
def test_safree_guard_matches_official_loop(tiny, up_t, lra):
  """The guard against the official loop: 'released' (up_t 10: t' = 10, all 5 steps filtered)
  and the intended 'low' re-attention (up_t 3: steps 0-3 filtered; the official 3-branch loop
  with the 'low' hook registered; b1/b2 off 1.0 so the backbone scaling is exercised too)."""
  pipe, sd, folder = tiny
  channels, b, s = LOW
  assert safree.lra_channels_for(sd.unet.config.block_out_channels) == channels
  low = dict(lra="low", lra_channels=channels, lra_b1=b[0], lra_b2=b[1], lra_s1=s[0],
             lra_s2=s[1]) if lra == "low" else {}
  guard = guards.safree_guard("nudity", up_t=up_t, **low)
  negative = guards.safree_negative_prompt("nudity")
  t2i = generate.TextToImage(sd, generate.SamplingSettings(
      sampler="dpmsolver++", num_steps=5, guard=guard), batch_size=2)
  ours = t2i(PROMPTS, SEEDS, INDICES, GUIDANCE, [negative] * 2) / 2 + 0.5
  expected, info = _official_images(pipe, folder, t2i, negative, safree.NUDITY_CONCEPTS, up_t,
                                    low=LOW if lra == "low" else None)
  err = np.abs(ours - expected).max()
  # measured 4.6e-6 (released, up_t 10), 4.6e-6 (low, up_t 3)
  assert err <= 1e-5, err
  assert any((rm == 0).any() for rm, _ in info)  # some prompt has trigger tokens
  # SAFREE changed the images: the loop without the filtered states (released) or without the
  # low filter (low) differs
  other, _ = _official_images(pipe, folder, t2i, negative, safree.NUDITY_CONCEPTS, up_t,
                              filtered=lra == "low")
  assert np.abs(other - expected).max() > 1e-3


def test_eval_config_selects_the_guard_presets():
  from configs import eval_i2p
  from scdpo_jax.evaluation import job
  assert job.GUARD_PRESETS == guards.GUARD_PRESETS
  config = eval_i2p.get_config()
  for name in guards.GUARD_PRESETS:
    config.sampling.guard.preset = name
    settings, negative = job._settings(config)
    guard, preset_negative = guards.guard_preset(name)
    assert settings.guard.describe() == guard.describe()
    assert negative == (preset_negative or "")
  config.sampling.guard.preset = "sld_strong"
  config.sampling.guard.negative_prompting = "standard"
  config.sampling.negative_prompt = "blurry"
  settings, negative = job._settings(config)
  assert settings.guard.negative_prompting == "standard" and negative == "blurry"
  assert settings.guard.sld == guards.sld_config("strong")
  config.sampling.guard.preset = "safree_nudity"
  config.sampling.guard.safree_lra = "low"
  settings, _ = job._settings(config)
  assert settings.guard.safree.lra == "low" and settings.guard.safree.lra_channels == (1280, 640)
  config.sampling.guard.preset = "sld_weak"
  with pytest.raises(ValueError, match="needs a SAFREE preset"):
    job._settings(config)


def test_safree_config_and_presets():
  with pytest.raises(ValueError, match="lra='high'"):
    guards.GuardConfig.make("standard", safree=safree.SafreeConfig(lra="high"))
  guard, negative = guards.guard_preset("safree_violence")
  assert guard.safree.concepts == safree.VIOLENCE_CONCEPTS and guard.negative_prompting == (
      "standard") and negative == ", ".join(safree.VIOLENCE_CONCEPTS)
  assert guard.describe()["safree"]["lra"] == "released"


def test_without_svf_the_window_selects_the_steps():
  """`-svf` off: the filtered states condition the steps window_start <= i <= window_end (the
  launcher's -1, 1001: every step); with svf, the steps i <= t'."""
  rng = np.random.default_rng(1)
  table = jnp.asarray(rng.standard_normal((20, 8)), jnp.float32)
  pooled = lambda ids: jnp.cumsum(table[ids], axis=1)[:, -1]  # a stand-in encoder
  ids = jnp.asarray([[18, 3, 4, 5, 19, 19, 19, 19], [18, 6, 19, 19, 19, 19, 19, 19]])
  states = jnp.asarray(rng.standard_normal((2, 8, 8)), jnp.float32)
  concept_ids = jnp.asarray([[18, 3, 19, 19, 19, 19, 19, 19]])
  cfg = safree.SafreeConfig(svf=False, window_start=1.0, window_end=2.0)
  filtered, last, trigger = safree.safree_states(cfg, ids, states, concept_ids, pooled, 19)
  np.testing.assert_array_equal(np.asarray(last), [2, 2])
  np.testing.assert_array_equal(
      [np.asarray(safree.use_filtered(cfg, jnp.asarray(i), last)) for i in range(4)],
      [[False, False], [True, True], [True, True], [False, False]])
  assert np.asarray(trigger)[1, 1]  # a one-token prompt: its token is a trigger (official NaN)
  keep = ~np.asarray(trigger)
  np.testing.assert_array_equal(np.asarray(filtered)[keep], np.asarray(states)[keep])
  svf = safree.SafreeConfig(svf=True)
  _, last, _ = safree.safree_states(svf, ids, states, concept_ids, pooled, 19)
  use = np.asarray(safree.use_filtered(svf, jnp.asarray(0), last))
  assert use.all() and np.asarray(last).dtype == np.int32
