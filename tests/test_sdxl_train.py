"""SDXL training: the SC-DPO / Diffusion-DPO step with both text encoders' states, pooled
embeddings and time ids against a PyTorch transcription on the tiny diffusers SDXL UNet of
`tests/sdxl_refs.py`; the SDXL pair dataset (pooled_text + time_ids) written, cached from images
and read back; configs/scdpo_sdxl_tiny.py end to end (tfds latents, Adafactor, remat) with an
SDXL UNet export that diffusers loads; LoRA on SDXL for one step.

Reference tolerance (fp32, relative to the largest value compared): 1e-5; `pytest -s` prints
the measured errors.
"""

from __future__ import annotations

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import scdpo_sdxl_tiny
from scdpo_jax.data import cache, loader, tfds_pairs
from scdpo_jax.data.images import center_crop_box
from scdpo_jax.models import conditioning_xl, convert, pipeline_xl, schedule as sch
from scdpo_jax.models.layers import abstract_params
from scdpo_jax.models.unet import UNet2DConditionModel
from scdpo_jax.models.unet_config import UNetConfig
from scdpo_jax.train import loop, step as step_lib
from tests import sdxl_refs
from tests.data_utils import gradient_image, png
from tests.test_train_reference import _capture_grads, _rel_err
from tests.torch_refs import nhwc_to_nchw
from tests.train_utils import apply_overrides

TOL = 1e-5
N, SEQ, SIZE = 4, 16, 8
DIM = sdxl_refs.UNET["cross_attention_dim"]
POOLED = sdxl_refs.TEXT_2["projection_dim"]
BETA, LAM, DROPOUT = 10.0, 1.5, 0.5


# ----------------------------------------------------------------------------- one step vs torch

def _torch_unet(seed):
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**sdxl_refs.UNET)
  sdxl_refs.perturb(unet)
  return unet.train()


@pytest.fixture(scope="module")
def ref_case():
  policy_t, ref_t = _torch_unet(1), _torch_unet(2)
  module = UNet2DConditionModel(UNetConfig.from_dict(dict(policy_t.config)))
  shapes = abstract_params(module)
  to_flax = lambda m: convert.torch_to_flax(
      {k: v.detach().numpy() for k, v in m.state_dict().items()}, shapes, source="torch")
  rng = np.random.default_rng(0)
  batch = {
      "latents_w": rng.standard_normal((N, SIZE, SIZE, 4)).astype(np.float32),
      "latents_l": rng.standard_normal((N, SIZE, SIZE, 4)).astype(np.float32),
      "text_states": rng.standard_normal((N, SEQ, DIM)).astype(np.float32),
      "pooled_text": rng.standard_normal((N, POOLED)).astype(np.float32),
      "time_ids": np.concatenate([sdxl_refs.time_ids_example(3),
                                  sdxl_refs.time_ids_example(1)]),
      "is_harmful": np.array([1, 0, 1, 0], np.int32),
      "cost_w": np.array([0.1, 0.0, 0.9, 0.05], np.float32),
      "cost_l": np.array([0.9, 0.1, 0.2, 0.0], np.float32),
      "reward_w": np.zeros(N, np.float32), "reward_l": np.zeros(N, np.float32)}
  empty = {"text_states": rng.standard_normal((1, SEQ, DIM)).astype(np.float32),
           "pooled_text": rng.standard_normal((1, POOLED)).astype(np.float32)}
  scheduler = diffusers.DDPMScheduler(**{k: v for k, v in sdxl_refs.SCHEDULER.items()
                                         if k not in ("interpolation_type", "use_karras_sigmas")})
  return dict(policy_t=policy_t, ref_t=ref_t, module=module, to_flax=to_flax, batch=batch,
              empty=empty, scheduler=scheduler,
              schedule=sch.schedule_from_config(dict(scheduler.config)))


def _torch_loss(c, rnd):
  """Salesforce train.py --sdxl's DPO loss (+ the SC-DPO cost margin), dropped captions taking
  the empty prompt's prompt_embeds and pooled embeds; returns (loss, logits, grads by name)."""
  b, tt = c["batch"], lambda x: torch.from_numpy(np.array(x))
  drop = tt(rnd["drop_caption"])
  states = torch.where(drop[:, None, None], tt(c["empty"]["text_states"]), tt(b["text_states"]))
  pooled = torch.where(drop[:, None], tt(c["empty"]["pooled_text"]), tt(b["pooled_text"]))
  latents = torch.cat([tt(nhwc_to_nchw(b["latents_w"])), tt(nhwc_to_nchw(b["latents_l"]))])
  noise = tt(nhwc_to_nchw(np.asarray(rnd["noise"]))).repeat(2, 1, 1, 1)
  timesteps = tt(rnd["t"]).long().repeat(2)
  noisy = c["scheduler"].add_noise(latents, noise, timesteps)
  args = (noisy, timesteps, states.repeat(2, 1, 1))
  added = {"time_ids": tt(b["time_ids"]).repeat(2, 1), "text_embeds": pooled.repeat(2, 1)}
  policy = c["policy_t"]
  policy.zero_grad()
  model_losses = (policy(*args, added_cond_kwargs=added).sample - noise).pow(2).mean(dim=[1, 2, 3])
  with torch.no_grad():
    ref_losses = (c["ref_t"](*args, added_cond_kwargs=added).sample - noise).pow(2).mean(
        dim=[1, 2, 3])
  m_w, m_l = model_losses.chunk(2)
  r_w, r_l = ref_losses.chunk(2)
  # the default margin form "offset": z - lam (C_l - C_w)
  inside = -0.5 * BETA * ((m_w - m_l) - (r_w - r_l)) - LAM * (tt(b["cost_l"]) - tt(b["cost_w"]))
  loss = -F.logsigmoid(inside).mean()
  loss.backward()
  return (float(loss.detach()), inside.detach().numpy(),
          {k: p.grad.detach().clone() for k, p in policy.named_parameters()})


def test_sdxl_dpo_step_matches_torch(ref_case):
  c = ref_case
  cfg = step_lib.StepConfig(beta=BETA, safety_mode="margin", caption_dropout=DROPOUT)
  kw = dict(apply_fn=c["module"].apply, ref_apply_fn=c["module"].apply, schedule=c["schedule"],
            cfg=cfg)
  train_step = step_lib.make_train_step(optimizer=_capture_grads(), **kw)
  params, ref_params = c["to_flax"](c["policy_t"]), c["to_flax"](c["ref_t"])
  state = step_lib.TrainState(
      step=jnp.asarray(1, jnp.int32), params=params,
      opt_state=jax.tree.map(jnp.zeros_like, params), lam=jnp.asarray(LAM, jnp.float32),
      skipped=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0))
  rnd = step_lib.draw_randomness(jax.random.fold_in(state.rng, state.step), c["batch"],
                                 1000, DROPOUT)
  drop = np.asarray(rnd["drop_caption"])
  assert 0 < drop.sum() < N, "the draw must drop some captions and keep others"

  def run(state, ref_params, batch, empty):
    new_state, metrics = train_step(state, ref_params, batch, empty)
    per_pair = step_lib.micro_batch_terms(state.params, ref_params, {**batch, **rnd}, state.lam,
                                          0.0, empty_states=empty, **kw)[1][1]
    return new_state, metrics, per_pair

  run = jax.jit(run)
  new_state, metrics, per_pair = run(state, ref_params, c["batch"], c["empty"])
  loss, logits, grads = _torch_loss(c, rnd)
  ref_tree = c["to_flax"](type("G", (), {"state_dict": lambda self: grads})())
  errors = {"loss": abs(float(metrics["objective"]) - loss) / abs(loss),
            "logits": _rel_err(per_pair["logit"], logits)}
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(ref_tree))
  errors["grads"] = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b))),
      new_state.opt_state, ref_tree))) / scale
  print("SDXL step vs torch:", " ".join(f"{k} {v:.1e}" for k, v in errors.items()))
  assert np.abs(logits).max() < 10 and np.ptp(logits) > 0.1, logits
  assert scale > 1e-3
  for key, err in errors.items():
    assert err <= TOL, f"{key} relative error {err:.2e} > {TOL}"
  # the conditioning reaches the UNet: other time ids move the logits (the same program)
  other = run(state, ref_params, {**c["batch"], "time_ids": c["batch"]["time_ids"][::-1]},
              c["empty"])[2]
  assert _rel_err(other["logit"], logits) > 1e-3


# ----------------------------------------------------------------------------- data and runs

@pytest.fixture(scope="module")
def xl_env(tmp_path_factory):
  """The tiny SDXL base (configs/scdpo_sdxl_tiny.py), an image pair dataset (non-square images
  of two sizes) and its SDXL latent cache."""
  root = tmp_path_factory.mktemp("sdxl_train")
  config = scdpo_sdxl_tiny.get_config()
  base = loop.base_model_folder(config, root)
  examples = []
  for i in range(8):
    h, w = (20, 24) if i % 2 else (30, 16)
    examples.append({"pair_id": f"p{i}", "prompt": f"prompt {i % 3}", "is_harmful": i % 2,
                     "image_w": png(gradient_image(i, h, w)),
                     "image_l": png(gradient_image(100 + i, h, w)),
                     "cost_w": 0.1, "cost_l": 0.8 if i % 2 else 0.2})
  images = tfds_pairs.write_pairs(root / "images", {"train": examples},
                                  tfds_pairs.PairSchema(images=True))
  encoder = cache.PairEncoder.from_pretrained(base, batch_size=4)
  cached = cache.cache_pairs(images, root / "latents", encoder, chunk_size=4).path
  return dict(root=root, base=base, images=images, cached=cached, encoder=encoder,
              examples=examples)


def test_sdxl_pair_cache_round_trip(xl_env):
  ds = tfds_pairs.open_pairs(xl_env["cached"])
  assert ds.schema.config_name == "latents_xl" and ds.schema.pooled_dim == 16
  meta = ds.metadata["cache"]["encoder"]
  assert meta["family"] == "sdxl" and meta["time_ids"] == "crop" and meta["text_layer"] is None
  assert "text_encoder_2_identity" in meta
  batch = loader.load_all(xl_env["cached"])
  xl = pipeline_xl.load_stable_diffusion_xl(xl_env["base"])
  emb = conditioning_xl.encode_prompt_texts(xl, [e["prompt"] for e in xl_env["examples"]])
  np.testing.assert_allclose(batch["text_states"], np.asarray(emb.prompt_embeds), atol=1e-5)
  np.testing.assert_allclose(batch["pooled_text"], np.asarray(emb.pooled_prompt_embeds),
                             atol=1e-5)
  r = xl_env["encoder"].resolution
  assert r == 16
  for row, (h, w) in zip(batch["time_ids"], [(30, 16), (20, 24)] * 4):
    _, _, top, left = center_crop_box(h, w, r)
    np.testing.assert_array_equal(row, [h, w, top, left, r, r])
  assert {tuple(row[2:4]) for row in batch["time_ids"]} == {(7.0, 0.0), (0.0, 1.0)}  # 30x16: top (30-16)//2; 20x24 -> 16x19: left 1
  # the loader carries them, flips or not; an SD trainer refuses this dataset
  src = loader.PairLoader(xl_env["cached"], hflip=True, seed=0)
  b = src.batch(0, 4)
  idx = src.indices(0, 4)
  np.testing.assert_array_equal(b["time_ids"], batch["time_ids"][idx])
  np.testing.assert_array_equal(b["pooled_text"], batch["pooled_text"][idx])
  data = scdpo_sdxl_tiny.get_config().data
  data.name = str(xl_env["cached"])
  with pytest.raises(loader.CacheMismatchError, match="SDXL conditioning.*SD 1.x/2.x"):
    loader.check_pair_dataset(data, sdxl=False)
  # Salesforce's fixed micro-conditioning
  fixed = cache.PairEncoder.from_pretrained(xl_env["base"], batch_size=4, time_ids="resolution")
  np.testing.assert_array_equal(fixed.time_ids(xl_env["examples"][:2]), [[r, r, 0, 0, r, r]] * 2)


def _tiny_run_config(xl_env, **overrides):
  config = scdpo_sdxl_tiny.get_config()
  config.model.pretrained = str(xl_env["base"])
  config.data.source = "tfds"
  config.data.name = str(xl_env["cached"])
  config.train.update(dict(pairs_per_step=4, grad_accum=2, num_steps=2))
  config.checkpoint.update(dict(every_steps=10, async_save=False))
  config.log.update(dict(every_steps=1, tensorboard=False))
  apply_overrides(config, overrides)
  return config


def test_tiny_sdxl_config_trains_and_exports(xl_env, tmp_path):
  config = _tiny_run_config(xl_env)
  assert (config.optimizer.name, config.model.remat_policy) == ("adafactor", "block")
  result = loop.run(config, tmp_path / "run")
  assert result["end_step"] == 2 and result["skipped"] == 0
  assert all(np.isfinite(result["losses"]))
  assert result["last_metrics"]["update_norm"] > 0
  unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "run/export/unet")
  assert unet.config.addition_embed_type == "text_time"
  exported = json.loads((tmp_path / "run/export/unet/config.json").read_text())
  assert exported["projection_class_embeddings_input_dim"] == 16 + 6 * 8


def test_lora_on_sdxl_runs_one_step(xl_env, tmp_path):
  config = _tiny_run_config(xl_env, **{"lora.enabled": True, "train.num_steps": 1,
                                       "train.grad_accum": 1, "model.remat_policy": "none",
                                       "optimizer.lr": 1e-3, "optimizer.scale_lr": False,
                                       "optimizer.warmup_steps": 0})
  result = loop.run(config, tmp_path / "lora")
  assert result["end_step"] == 1 and np.isfinite(result["losses"][0])
  assert (tmp_path / "lora/export/lora/pytorch_lora_weights.safetensors").is_file()
  assert (tmp_path / "lora/export/unet/config.json").is_file()
