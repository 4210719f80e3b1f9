"""SAFREE: each step against a NumPy transcription of the official code
(`jaehong31/SAFREE@b8b2c3f`, models/modified_stable_diffusion_pipeline.py: `projection_matrix`,
`safree_projection`, `projection_and_orthogonal` + the svf cosine, `f_beta`,
`_masked_encode_prompt`), and the whole guard end to end on the tiny pipeline against a PyTorch
port of the official sampling loop (DPM-Solver++, the concept phrases as negative prompt,
filtered states on the steps i <= t').
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


def _official_images(pipe, folder, t2i, negative, concepts, up_t, filtered=True):
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
        pred = pipe.unet(torch.cat([latents] * 2), t,
                         encoder_hidden_states=torch.cat([neg, emb])).sample
        uncond, text = pred.chunk(2)
        latents = scheduler.step(uncond + GUIDANCE[b] * (text - uncond), t,
                                 latents).prev_sample
      image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
      out.append((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
  return np.concatenate(out), info


@pytest.mark.parametrize("up_t", [10.0, 3.0])
def test_safree_guard_matches_official_loop(tiny, up_t):
  pipe, sd, folder = tiny
  guard = guards.safree_guard("nudity", up_t=up_t)
  negative = guards.safree_negative_prompt("nudity")
  t2i = generate.TextToImage(sd, generate.SamplingSettings(
      sampler="dpmsolver++", num_steps=5, guard=guard), batch_size=2)
  ours = t2i(PROMPTS, SEEDS, INDICES, GUIDANCE, [negative] * 2) / 2 + 0.5
  expected, info = _official_images(pipe, folder, t2i, negative, safree.NUDITY_CONCEPTS, up_t)
  err = np.abs(ours - expected).max()
  # measured 4.6e-6 (up_t 10: t' = 10, all 5 steps filtered), 4.2e-6 (up_t 3: steps 0-3)
  assert err <= 1e-5, err
  assert any((rm == 0).any() for rm, _ in info)  # some prompt has trigger tokens
  # SAFREE changed the images: the same loop without the filtered states differs
  unfiltered, _ = _official_images(pipe, folder, t2i, negative, safree.NUDITY_CONCEPTS, up_t,
                                   filtered=False)
  assert np.abs(unfiltered - expected).max() > 1e-3


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


def test_safree_config_and_presets():
  with pytest.raises(ValueError, match="not implemented"):
    guards.GuardConfig.make("standard", safree=safree.SafreeConfig(lra="low"))
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
