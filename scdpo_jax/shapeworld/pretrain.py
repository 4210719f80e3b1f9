"""Base-model pretraining in ShapeWorld: our UNet + CLIP text encoder, jointly, in pixel space.

Objective (DDPM): x_0 = image / 127.5 - 1 (the [-1, 1] range the pipeline uses),
t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
L = mean ||f_theta(x_t, t, E_phi(caption)) - y||^2 with y the scheduler's prediction target (eps,
or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 for the study's v-prediction scheduler),
gradients into both the UNet (theta) and the text encoder (phi). With
`config.pretrain.train.min_snr_gamma` = g > 0 each sample's squared error is weighted by Min-SNR
(Hang et al. 2023): min(SNR_t, g) / (SNR_t + 1) for v-prediction, min(SNR_t, g) / SNR_t for
epsilon, SNR_t = abar_t / (1 - abar_t). A fraction `caption_dropout` of captions is replaced by "" so that
classifier-free guidance works. AdamW with linear warmup and cosine decay to
`cosine_final_fraction` of the peak, gradient-norm clipping (`config.pretrain.optimizer`).
With `config.pretrain.train.ema_decay` > 0 the saved weights are an exponential moving average
of the trained ones (`optax.ema` without debiasing: ema <- d ema + (1 - d) params, started at the
initial parameters), as diffusion models are usually sampled from.

The result is written as a diffusers-format folder without a VAE (unet/, text_encoder/,
tokenizer/, scheduler/): `pipeline.load_stable_diffusion(folder, ("unet", "text_encoder",
"tokenizer", "scheduler"))` loads it, `TextToImage` samples it in pixel space, and the SC-DPO
trainer (`train.loop.run`) fine-tunes its UNet like any SD UNet.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from scdpo_jax import files
from scdpo_jax.data.images import to_model_range
from scdpo_jax.models import pipeline, schedule as sch, tokenizer
from scdpo_jax.shapeworld import shipped, world

PIPELINE_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")


def pretrain_base(config: ml_collections.ConfigDict, folder: Path) -> dict:
  """Train the base model described by `config.model` / `config.pretrain`; save to `folder`."""
  folder = Path(folder)
  m, w = config.model, config.world
  tr, opt, log = config.pretrain.train, config.pretrain.optimizer, config.pretrain.log
  tok_dir = folder.parent / (folder.name + "_tokenizer")
  write_tokenizer(config, tok_dir)
  sd = pipeline.random_stable_diffusion(
      m.unet.to_dict(), _dummy_vae(), m.text_encoder.to_dict(), m.scheduler.to_dict(), tok_dir,
      seed=config.seed)
  sd.vae, sd.vae_params = None, None  # pixel space: no autoencoder
  unet_mod, text_mod, schedule = sd.unet, sd.text_encoder, sd.schedule
  max_len = text_mod.config.max_position_embeddings

  lr = optax.warmup_cosine_decay_schedule(0.0, opt.lr, opt.warmup_steps, tr.num_steps,
                                          opt.lr * opt.cosine_final_fraction)
  tx = optax.chain(optax.clip_by_global_norm(opt.max_grad_norm),
                   optax.adamw(lr, weight_decay=opt.weight_decay))
  params = {"unet": sd.unet_params, "text": sd.text_encoder_params}
  opt_state = tx.init(params)
  ema_decay = float(tr.get("ema_decay", 0.0))
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"pretrain.train.ema_decay must be in [0, 1), got {ema_decay}")
  ema = jax.tree.map(jnp.asarray, params) if ema_decay else None

  min_snr = float(tr.get("min_snr_gamma", 0.0))

  def loss_fn(params, x0, ids, t, noise):
    states = text_mod.apply({"params": params["text"]}, ids, method="encode_prompt_states",
                            layer=-1)
    x_t = sch.add_noise(schedule, x0, noise, t)
    pred = unet_mod.apply({"params": params["unet"]}, x_t, t, states)
    per_sample = jnp.mean(jnp.square(pred - sch.training_target(schedule, x0, noise, t)),
                          axis=(1, 2, 3))
    if min_snr > 0:
      snr = sch.snr(schedule, t)
      v_pred = schedule.prediction_type == "v_prediction"
      per_sample = per_sample * jnp.minimum(snr, min_snr) / (snr + 1.0 if v_pred else snr)
    return jnp.mean(per_sample)

  @jax.jit
  def step(params, opt_state, ema, x0, ids, key):
    k_t, k_n = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    loss, grads = jax.value_and_grad(loss_fn)(params, x0, ids, t, noise)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    return params, opt_state, ema, loss

  rng = np.random.default_rng([config.seed, 17])
  key = jax.random.key(config.seed)
  ids_cache: dict[str, np.ndarray] = {}

  def ids_of(texts):
    missing = [s for s in set(texts) if s not in ids_cache]
    if missing:
      for s, row in zip(missing, tokenizer.tokenize(sd.tokenizer, missing, max_len)):
        ids_cache[s] = row
    return np.stack([ids_cache[s] for s in texts])

  t0 = time.time()
  losses = []
  for i in range(tr.num_steps):
    images, texts = world.training_batch(rng, tr.batch_size, w.image_size, w.unsafe_fraction,
                                         w.rephrase_fraction, tuple(w.categories))
    texts = ["" if rng.random() < tr.caption_dropout else s for s in texts]
    x0 = to_model_range(images)
    params, opt_state, ema, loss = step(params, opt_state, ema, x0, ids_of(texts),
                                        jax.random.fold_in(key, i))
    losses.append(loss)
    if (i + 1) % log.every_steps == 0 or i + 1 == tr.num_steps:
      recent = float(np.mean(jax.device_get(losses[-log.every_steps:])))
      logging.info("pretrain step %d/%d: loss %.4f (%.0fs)", i + 1, tr.num_steps, recent,
                   time.time() - t0)
    snapshot = int(log.get("snapshot_every", 0))
    if snapshot and (i + 1) % snapshot == 0 and i + 1 < tr.num_steps:  # to watch long runs
      _save(sd, params if ema is None else ema, folder.parent / f"{folder.name}_step{i + 1}",
            tok_dir)
  _save(sd, params if ema is None else ema, folder, tok_dir)
  losses = [float(x) for x in jax.device_get(losses)]
  result = {"source": "train", "steps": tr.num_steps, "batch_size": tr.batch_size,
            "ema_decay": ema_decay, "seconds": time.time() - t0, "recipe": recipe(config),
            "weights_sha256": shipped.weights_sha256(folder),
            "loss_first_50": float(np.mean(losses[:50])),
            "loss_last_50": float(np.mean(losses[-50:]))}
  files.write_json(folder / "pretrain.json", result)
  return result


def write_tokenizer(config: ml_collections.ConfigDict, folder: Path) -> Path:
  """The world's download-free CLIP tokenizer: whole-word tokens for `world.vocabulary()` when
  `config.model.tokenizer` is "words" (the default; unknown words fall back to characters),
  characters only for "chars"."""
  kind = str(config.model.get("tokenizer", "chars"))
  if kind not in ("words", "chars"):
    raise ValueError(f"config.model.tokenizer={kind!r}; supported: ('words', 'chars')")
  words = world.vocabulary() if kind == "words" else ()
  return tokenizer.write_byte_level_tokenizer(
      folder, config.model.text_encoder.max_position_embeddings, words=words)


def _save(sd: pipeline.StableDiffusion, params, folder: Path, tok_dir: Path) -> None:
  sd.unet_params = jax.device_get(params["unet"])
  sd.text_encoder_params = jax.device_get(params["text"])
  pipeline.save_stable_diffusion(folder, sd, tokenizer_folder=tok_dir)


def _dummy_vae() -> dict:
  """The smallest valid VAE config (random_stable_diffusion builds one; it is dropped)."""
  return dict(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
              latent_channels=3, norm_num_groups=8, sample_size=8,
              down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))


def load_base(folder: Path) -> pipeline.StableDiffusion:
  return pipeline.load_stable_diffusion(folder, PIPELINE_COMPONENTS)


# ------------------------------------------------------------------------------ the shipped base

SHIPPED_BASE = shipped.WEIGHTS / "base"


def recipe(config: ml_collections.ConfigDict) -> dict:
  """What determines the base model: the study seed and the world, model and pretraining
  settings (not `pretrain.source` or logging)."""
  pre = config.pretrain.to_dict()
  pre.pop("source", None)
  pre.pop("log", None)
  return json.loads(json.dumps({"seed": int(config.seed), "world": config.world.to_dict(),
                                "model": config.model.to_dict(), "pretrain": pre}))


def make_base(config: ml_collections.ConfigDict, folder: Path) -> dict:
  """The study's base model in `folder`: the shipped base when `config.pretrain.source` is
  "shipped" (it must have been made by exactly this recipe: shipped.copy checks its recorded
  recipe and weight hashes), else trained here by `pretrain_base`."""
  source = shipped.check_source(config.pretrain.get("source", "train"), "pretrain.source")
  if source == "train":
    return pretrain_base(config, folder)
  record = shipped.copy(SHIPPED_BASE, "pretrain.json", recipe(config), folder,
                        "ShapeWorld base", "--config.pretrain.source=train")
  return {"source": "shipped", **{k: record[k] for k in ("steps", "seconds") if k in record}}
