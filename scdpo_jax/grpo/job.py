"""The `safediffusion_r1` job: online GRPO post-training of a Stable Diffusion UNet
(SafeDiffusion-R1, arXiv 2605.18719; released code MAXNORM8650/SafeDiffusion-R1@c26c4d9).

One epoch (the released `for epoch, prompts in enumerate(loader)` body):

1. `sample.prompts_per_epoch` prompts (a per-pass shuffle of the prompt list, seeded), each
   repeated `sample.group_size` (G, `num_generations`) times, contiguous;
2. rollouts with the current weights (`rollout.rollout`: DDIM eta = 1, CFG, every latent and
   log-prob kept; x_T shared per `sample.noise_sharing`, "batch" as released), decoded by the
   VAE, in compiled chunks of `sample.batch_size`, batch-sharded over the mesh. A base folder
   without `vae/` is a pixel-space pipeline (ShapeWorld, `shapeworld/pretrain.py`): the final
   sample x_0 is the image, clipped to [-1, 1] as `sampling.generate.TextToImage` does; any
   prediction type and DDIM option of its scheduler config (v-prediction, trailing spacing,
   clip_sample) goes through `rollout.logprob_plan`;
3. rewards (`rewards.reward_from_config`) and group-relative advantages
   (`losses.group_advantages`);
4. `train.inner_epochs` passes over the trajectories in minibatches of `train.samples_per_step`
   (consecutive samples, i.e. mostly one prompt, as released; `train.shuffle_samples` for a
   shuffle), one optimizer step each (`update.make_update_step`), each trajectory training on
   its own shuffle of K of the first num_steps - 1 transitions.

Machinery shared with the DPO trainer (`train/loop.py`): the sharded `TrainState`
(`train.step.TrainState`; full UNet with fp32 master weights, or LoRA adapters on the frozen base
via `lora.adapters`), `optim.make_optimizer`, the Orbax `Checkpointer` (checkpoints at epoch
boundaries), `resume.run_fingerprint` / `check_resume` (a rerun must match, except
`train.num_epochs` and the keys the trainer lets change), `MetricsWriter` (metrics.jsonl +
TensorBoard, truncated to the restored step on resume), `loop.Interruption` (SIGTERM / Ctrl-C:
during rollouts the epoch is dropped and the state - unchanged since the last boundary - is
saved at once; during the updates the epoch's remaining steps run first) and the workdir lock
(`jobs.run`). Every random draw is a function of (seed, epoch), so a resumed run repeats the
uninterrupted one exactly. Metrics rows are per optimizer step (`step`), with the epoch's
reward / advantage statistics on each row of the epoch.

Precision: `sample.dtype` is the UNet compute dtype of the rollouts, `train.dtype` that of the
update's log-prob recomputation ("" = model.dtype). With a 1e-4 clip range, rounding differences
between the two can push ratios out of the clip range before any learning (README: measured);
`train.recompute_old_logprobs=True` recomputes the stored log-probs with the update's own
program and dtype (e.g. float32) before the updates, so that the first step of an epoch sees
ratio 1.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax.core import meta

from scdpo_jax import files, parallel
from scdpo_jax.errors import ConfigError
from scdpo_jax.grpo import losses, rewards as rewards_lib, rollout, update as update_lib
from scdpo_jax.lora import adapters as lora_adapters
from scdpo_jax.models import layers, pipeline, unet as unet_lib, unet_io, vae as vae_lib
from scdpo_jax.train import optim, resume, state as state_lib
from scdpo_jax.train.checkpoint import Checkpointer
from scdpo_jax.train.loop import Interruption, base_model_folder
from scdpo_jax.train.metrics_writer import MetricsWriter

# Config keys that may change when resuming (on top of resume.RESUMABLE_KEYS).
EXTRA_RESUMABLE = ("config.train.num_epochs", "config.train.export_at_end")
ALL_TAG = "all"


# ------------------------------------------------------------------------------ prompts

def load_prompts(data: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """(prompts, tags): `data.prompts` ((prompt, tag) pairs in the config) or `data.prompts_file`
  (.txt: one prompt per line, tag ""; .csv: a `prompt` column and optionally `tag`)."""
  if data.prompts:
    pairs = [(str(p), str(t)) for p, t in data.prompts]
  elif data.prompts_file:
    path = Path(data.prompts_file)
    if not path.is_file():
      raise ConfigError(f"data.prompts_file={path} does not exist (the released recipe trains on "
                        "assets/CoProv2_captions.txt of MAXNORM8650/SafeDiffusion-R1)")
    if path.suffix.lower() == ".csv":
      with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
      if not rows or "prompt" not in rows[0]:
        raise ConfigError(f"{path}: expected a CSV with a 'prompt' column (and optionally 'tag')")
      pairs = [(r["prompt"].strip(), (r.get("tag") or "").strip()) for r in rows
               if r["prompt"].strip()]
    else:
      pairs = [(line.strip(), "") for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip()]
  else:
    raise ConfigError("no prompts: set data.prompts_file (a .txt or .csv) or data.prompts")
  if not pairs:
    raise ConfigError("the prompt list is empty")
  return [p for p, _ in pairs], [t for _, t in pairs]


def epoch_prompt_indices(n_prompts: int, per_epoch: int, epoch: int, seed: int) -> np.ndarray:
  """Prompt indices of an epoch: consecutive slices of seeded per-pass permutations (every
  prompt once per pass, like a shuffled DataLoader with drop_last)."""
  per_pass = n_prompts // per_epoch
  p, k = divmod(epoch, per_pass)
  perm = np.random.default_rng([seed, 0x9A55, p]).permutation(n_prompts)
  return perm[k * per_epoch:(k + 1) * per_epoch]


def timestep_choices(n_samples: int, candidates: int, keep: int, seed: int, epoch: int,
                     inner: int) -> np.ndarray:
  """(n_samples, keep) int32: per-sample shuffles of range(candidates), first `keep` kept."""
  rng = np.random.default_rng([seed, 0x7135, epoch, inner])
  return np.argsort(rng.random((n_samples, candidates)), axis=1)[:, :keep].astype(np.int32)


# ------------------------------------------------------------------------------ config checks

def _dtype(value: str, default: str) -> Any:
  return jnp.dtype(value or default)


def check_config(config: ml_collections.ConfigDict, mesh, n_prompts: int) -> None:
  s, t = config.sample, config.train
  rules = parallel.rules_from_config(config.sharding_rules)
  n = s.prompts_per_epoch * s.group_size
  checks = (
      ("sample.group_size", s.group_size, s.group_size >= 2, ">= 2 (unbiased group std)"),
      ("sample.prompts_per_epoch", s.prompts_per_epoch,
       0 < s.prompts_per_epoch <= n_prompts, f"in [1, {n_prompts}] (the number of prompts)"),
      ("sample.num_steps", s.num_steps, s.num_steps >= 2, ">= 2"),
      ("sample.eta", s.eta, s.eta > 0, "> 0"),
      ("train.num_epochs", t.num_epochs, t.num_epochs >= 0, ">= 0"),
      ("train.inner_epochs", t.inner_epochs, t.inner_epochs >= 1, ">= 1"),
      ("train.clip_range", t.clip_range, t.clip_range > 0, "> 0"),
      ("train.kl_coef", t.kl_coef, t.kl_coef >= 0, ">= 0 (0 = no KL term, as released)"),
      ("train.timestep_fraction", t.timestep_fraction, 0 < t.timestep_fraction <= 1,
       "in (0, 1]"),
      ("optimizer.lr", config.optimizer.lr, config.optimizer.lr > 0, "> 0"),
      ("checkpoint.every_epochs", config.checkpoint.every_epochs,
       config.checkpoint.every_epochs > 0, "> 0"),
      ("log.every_steps", config.log.every_steps, config.log.every_steps > 0, "> 0"))
  for key, value, ok, want in checks:
    if not ok:
      raise ConfigError(f"{key} must be {want}, got {value}")
  if s.noise_sharing not in rollout.NOISE_SHARING:
    raise ConfigError(f"sample.noise_sharing={s.noise_sharing!r}; supported: "
                      f"{rollout.NOISE_SHARING}")
  if n % s.batch_size:
    raise ConfigError(f"sample.batch_size={s.batch_size} must divide the {n} rollouts of an epoch "
                      f"(prompts_per_epoch x group_size)")
  if n % t.samples_per_step:
    raise ConfigError(f"train.samples_per_step={t.samples_per_step} must divide the {n} "
                      "rollouts of an epoch")
  if t.samples_per_step % t.grad_accum:
    raise ConfigError(f"train.samples_per_step={t.samples_per_step} is not a multiple of "
                      f"train.grad_accum={t.grad_accum}")
  parallel.check_batch_fits(s.batch_size, mesh, what="sample.batch_size", rules=rules)
  parallel.check_batch_fits(t.samples_per_step // t.grad_accum, mesh,
                            what="micro-batch (train.samples_per_step / train.grad_accum)",
                            rules=rules)
  if trained_steps(config) < 1:
    raise ConfigError(f"int((sample.num_steps - 1) * train.timestep_fraction) = "
                      f"{trained_steps(config)}: no transition to train on")
  for reward in config.reward.terms:
    if len(reward) != 2:
      raise ConfigError(f"reward.terms entries are (name, weight) pairs, got {reward!r}")
  if lora_adapters.enabled(config):
    spec = lora_adapters.spec_from_config(config.lora)
    spec.validate()
    if spec.dropout > 0:
      raise ConfigError("lora.dropout > 0 is not supported by safediffusion_r1: the update must "
                        "recompute the rollout's log-probabilities with the same deterministic "
                        "policy (set lora.dropout=0)")
    if spec.adapts_text_encoder:
      raise ConfigError("lora.text_encoder_targets is not supported by safediffusion_r1 (it "
                        "conditions on the frozen text encoder's prompt states); set "
                        "lora.text_encoder_targets=()")
  if not config.model.pretrained and config.model.get("tiny") is None:
    raise ConfigError("model.pretrained must name a diffusers-format Stable Diffusion folder "
                      "(--config.model.pretrained=/path/to/stable-diffusion-v1-5)")
  if config.model.pretrained:
    pipeline.check_pipeline_folder(config.model.pretrained,
                                   pipeline_components(config.model.pretrained))


PIXEL_SPACE_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")


def pipeline_components(folder) -> tuple[str, ...]:
  """The components the job loads from `folder`: with a `vae/` folder a latent-space SD
  pipeline, without one a pixel-space pipeline (the sampler's x_0 is the image)."""
  if (Path(folder) / "vae").is_dir():
    return ("unet", "vae") + PIXEL_SPACE_COMPONENTS[1:]
  return PIXEL_SPACE_COMPONENTS


def check_pixel_space(sd: pipeline.StableDiffusion, folder: Path) -> None:
  """A pipeline without a VAE must sample RGB images: a UNet with 3 input / output channels."""
  cfg = sd.unet.config
  if sd.vae is None and (cfg.in_channels != 3 or cfg.out_channels != 3):
    raise ConfigError(f"{folder} has no vae/ folder, so it is taken as a pixel-space pipeline, "
                      f"but its UNet has {cfg.in_channels} input / {cfg.out_channels} output "
                      "channels (a pixel-space UNet has 3 / 3): is vae/ missing?")


def trained_steps(config: ml_collections.ConfigDict) -> int:
  """K = int((num_steps - 1) * timestep_fraction): released `num_train_timesteps`."""
  return int((config.sample.num_steps - 1) * config.train.timestep_fraction)


# ------------------------------------------------------------------------------ state

def state_spec(config, mesh, policy, optimizer) -> state_lib.TrainStateSpec:
  """The sharded TrainState layout (as `train.state.train_state_spec`, with lam unused = 0):
  full UNet params, or the LoRA tree on the base (`ref_shardings` = the base's shardings)."""
  rules = parallel.rules_from_config(config.sharding_rules)
  boxed_base = boxed_params = layers.abstract_params(policy)
  if lora_adapters.enabled(config):
    boxed_params = lora_adapters.abstract_lora(boxed_base,
                                               lora_adapters.spec_from_config(config.lora))
  boxed_state = jax.eval_shape(
      lambda p: state_lib.new_train_state(p, optimizer, lam=0.0, seed=config.seed), boxed_params)
  shardings = parallel.logical_shardings(boxed_state, mesh, rules)
  return state_lib.TrainStateSpec(
      abstract_state=meta.unbox(boxed_state), state_shardings=shardings,
      param_shardings=shardings.params, abstract_ref_params=meta.unbox(boxed_base),
      ref_shardings=parallel.logical_shardings(boxed_base, mesh, rules), rules=rules)


def init_state(spec, optimizer, host_params, seed: int):
  init = jax.jit(lambda p: state_lib.new_train_state(p, optimizer, lam=0.0, seed=seed),
                 in_shardings=(spec.param_shardings,), out_shardings=spec.state_shardings)
  return init(state_lib.host_to_global(host_params, spec.param_shardings))


class PromptEncoder:
  """Prompt states (B, T, D) float32 of the frozen text encoder, jitted once per run."""

  def __init__(self, sd: pipeline.StableDiffusion, layer: int):
    from scdpo_jax.models import clip, tokenizer

    self._sd, self._tokenize = sd, tokenizer.tokenize
    self._fn = jax.jit(lambda p, ids: sd.text_encoder.apply(
        {"params": p}, ids, layer=layer, method=clip.CLIPTextModel.encode_prompt_states))
    self._params = jax.device_put(sd.text_encoder_params)

  def __call__(self, prompts: list[str]) -> np.ndarray:
    ids = self._tokenize(self._sd.tokenizer, list(prompts))
    return np.asarray(self._fn(self._params, ids), np.float32)


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _place(x: np.ndarray, sharding) -> jax.Array:
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# ------------------------------------------------------------------------------ the job

class Programs:
  """The compiled programs of a run: rollout (+ VAE decode, none in pixel space), log-prob
  recomputation, update."""

  def __init__(self, config, mesh, spec, sd, plan, optimizer, lora_spec):
    s, t = config.sample, config.train
    rules = spec.rules
    self.mesh, self.rules = mesh, rules
    model = config.model
    make = lambda dtype: unet_lib.UNet2DConditionModel(
        sd.unet.config, dtype=dtype, param_dtype=jnp.float32,
        attention_impl=model.attention_impl, remat_policy=model.remat_policy)
    sample_unet = make(_dtype(s.dtype, model.dtype))
    train_unet = make(_dtype(t.dtype, model.dtype))
    self.train_unet = train_unet
    scale = lora_spec.scale if lora_spec is not None else None

    def policy_apply_for(unet):
      def apply(params, base, x, tt, states):
        full = lora_adapters.merge(base, params, scale) if scale is not None else params
        return unet.apply({"params": full}, x, tt, states)
      return apply

    ref_apply = None
    if t.kl_coef > 0:
      ref_apply = lambda p, x, tt, c: train_unet.apply({"params": p}, x, tt, c)
    guidance_train = float(s.guidance_scale) if t.cfg else 1.0
    latent_shape = tuple(sd.unet.config.sample_hw) + (sd.unet.config.in_channels,)
    vae, vae_params = sd.vae, sd.vae_params

    def rollout_fn(params, base, vae_p, cond, uncond, seeds, indices, init_idx):
      sample_apply = policy_apply_for(sample_unet)
      apply = lambda p, x, tt, c: sample_apply(p, base, x, tt, c)
      out = rollout.rollout(apply, params, plan, cond, uncond, seeds,
                            indices, init_idx, latent_shape, float(s.guidance_scale),
                            batch_sharding=parallel.batch_sharding(mesh, 4, rules))
      x0 = out["latents"][:, -1]
      if vae is None:  # pixel-space pipeline: the sample is the image
        images = x0
      else:
        images = vae.apply({"params": vae_p}, vae_lib.unscale_latents(x0, vae.config),
                           method="decode")
      out["images"] = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
      return out

    repl = parallel.replicated(mesh)
    batch = lambda ndim: parallel.batch_sharding(mesh, ndim, rules)
    self.base_shardings = spec.ref_shardings if self.needs_base(config) else repl
    if vae is None:
      vae_shardings, self.vae_params = repl, ()
    else:
      vae_shardings = parallel.logical_shardings(layers.abstract_params(vae), mesh, rules)
      self.vae_params = jax.tree.map(_place, vae_params, vae_shardings)
    self.rollout = jax.jit(
        parallel.with_logical_rules(rollout_fn, mesh, rules),
        in_shardings=(spec.param_shardings, self.base_shardings, vae_shardings, batch(3), repl,
                      batch(1), batch(1), batch(1)),
        out_shardings={"latents": batch(5), "log_probs": batch(2), "images": batch(4)})
    self.logprobs = jax.jit(
        parallel.with_logical_rules(update_lib.make_logprob_fn(
            policy_apply=policy_apply_for(train_unet), plan=plan,
            guidance_scale=guidance_train), mesh, rules),
        in_shardings=(spec.param_shardings, self.base_shardings, batch(5), batch(3), repl),
        out_shardings=batch(2))
    step = update_lib.make_update_step(
        policy_apply=policy_apply_for(train_unet), ref_apply=ref_apply, optimizer=optimizer,
        plan=plan, cfg=update_lib.UpdateConfig(clip_range=float(t.clip_range),
                                               guidance_scale=guidance_train,
                                               kl_coef=float(t.kl_coef),
                                               grad_accum=int(t.grad_accum),
                                               scan_unroll=int(t.get("scan_unroll", 1)),
                                               fold_timesteps=bool(t.get("fold_timesteps",
                                                                         False))))
    self.batch_shardings = {"latents": batch(5), "log_probs": batch(2), "advantages": batch(1),
                            "steps": batch(2), "states": batch(3)}
    self.update = jax.jit(parallel.with_logical_rules(step, mesh, rules),
                          in_shardings=(spec.state_shardings, self.base_shardings,
                                        self.batch_shardings, repl),
                          out_shardings=(spec.state_shardings, repl), donate_argnums=(0,))
    self.batch = batch
    self.repl = repl

  @staticmethod
  def needs_base(config) -> bool:
    return lora_adapters.enabled(config) or config.train.kl_coef > 0


def _stats(values: np.ndarray) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def epoch_reward_metrics(components: dict[str, np.ndarray], advantages: np.ndarray,
                         raw_advantages: np.ndarray, tags: list[str], group_size: int,
                         adv_clip: float) -> dict[str, float]:
  """Reward mean/std overall and per prompt tag, each reward term's mean, advantage stats."""
  r = components["reward"]
  out = {}
  out["reward_mean"], out["reward_std"] = _stats(r)
  for tag in sorted(set(tags)):
    if not tag:
      continue
    mask = np.asarray([t == tag for t in tags])
    out[f"reward_mean/{tag}"], out[f"reward_std/{tag}"] = _stats(r[mask])
  for name, values in components.items():
    if name != "reward":
      out[f"reward_term/{name}"] = float(np.mean(values))
  out["reward_group_std_mean"] = float(np.mean(np.std(r.reshape(-1, group_size), axis=1,
                                                      ddof=1)))
  out["adv_mean"], out["adv_std"] = _stats(advantages)
  out["adv_abs_mean"] = float(np.mean(np.abs(advantages)))
  out["adv_min"], out["adv_max"] = float(advantages.min()), float(advantages.max())
  out["adv_clipped_frac"] = (float(np.mean(np.abs(raw_advantages) > adv_clip)) if adv_clip > 0
                             else 0.0)
  return out


def run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  workdir = Path(workdir)
  parallel.initialize_distributed(config.distributed)
  mesh = parallel.mesh_from_config(config.mesh)
  prompts, tags = load_prompts(config.data)
  check_config(config, mesh, len(prompts))
  s, t = config.sample, config.train
  logging.info("safediffusion_r1: mesh %s, %d prompts", dict(mesh.shape), len(prompts))

  folder = base_model_folder(config, workdir)
  sd = pipeline.load_stable_diffusion(folder, pipeline_components(folder),
                                      dtype=jnp.dtype(config.model.dtype),
                                      param_dtype=jnp.float32)
  check_pixel_space(sd, folder)
  k_train = trained_steps(config)
  plan = rollout.logprob_plan(sd.schedule, s.num_steps, eta=float(s.eta),
                              ddpo_final_step=bool(s.ddpo_final_step))
  rollout.check_plan(plan, s.num_steps - 1)
  n_roll = s.prompts_per_epoch * s.group_size
  steps_per_epoch = t.inner_epochs * n_roll // t.samples_per_step
  total_steps = t.num_epochs * steps_per_epoch

  lora_spec = (lora_adapters.spec_from_config(config.lora) if lora_adapters.enabled(config)
               else None)
  policy = unet_lib.UNet2DConditionModel(sd.unet.config, dtype=jnp.dtype(config.model.dtype),
                                         param_dtype=jnp.float32)
  optimizer = optim.make_optimizer(config.optimizer, max(total_steps, 1), t.samples_per_step)
  spec = state_spec(config, mesh, policy, optimizer)
  identity = {"prompts": files.file_identity(Path(config.data.prompts_file))
              if config.data.prompts_file and not config.data.prompts else "config",
              "num_prompts": len(prompts)}
  fingerprint = resume.run_fingerprint(config, folder, spec.abstract_state, identity)
  for key in EXTRA_RESUMABLE:
    fingerprint.pop(key, None)
  allow = [a for a in str(config.resume.allow_changes).split(",") if a]
  for line in resume.check_resume(workdir, fingerprint, allow):
    logging.warning("resuming with a changed setting (allowed by resume.allow_changes): %s", line)

  ckpt = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep,
                      async_save=config.checkpoint.async_save)
  restored = ckpt.restore_latest(spec.abstract_state_with_shardings())
  fallbacks: list[str] = []
  if restored is not None:
    state, ckpt_meta, fallbacks = restored
    logging.info("resumed from step %d (epoch %d)", ckpt_meta["step"], ckpt_meta["epoch"])
  elif lora_spec is not None:
    state = init_state(spec, optimizer, lora_adapters.init_lora(spec.abstract_state.params,
                                                                lora_spec, config.seed),
                       config.seed)
  else:
    state = init_state(spec, optimizer, sd.unet_params, config.seed)
  programs = Programs(config, mesh, spec, sd, plan, optimizer, lora_spec)
  base = (state_lib.reference_params(spec, sd.unet_params) if Programs.needs_base(config)
          else ())
  del sd.unet_params

  start = int(state.step)
  if start % steps_per_epoch:
    raise ConfigError(f"the checkpoint is at step {start}, not an epoch boundary of "
                      f"{steps_per_epoch} steps per epoch: sample/train sizes changed?")
  start_epoch = start // steps_per_epoch
  result = {"start_step": start, "start_epoch": start_epoch, "restore_fallbacks": fallbacks}
  if start_epoch >= t.num_epochs:
    logging.info("the run in %s is already finished (epoch %d of %d)", workdir, start_epoch,
                 t.num_epochs)
    ckpt.close()
    previous = workdir / "train_result.json"
    if previous.is_file():
      result = json.loads(previous.read_text())
    result.update(already_finished=True, preempted=False, state=state)
    return result

  encode = PromptEncoder(sd, int(config.model.text_layer))
  uncond = _place(encode([""]), programs.repl)
  reward_fn = rewards_lib.reward_from_config(config.reward, workdir, seed=config.seed)
  writer = MetricsWriter(workdir, total_steps, tensorboard=config.log.tensorboard,
                         start_step=start)
  config_json = json.loads(config.to_json_best_effort())
  losses_seen: list[float] = []
  last_metrics: dict = {}
  epoch, step = start_epoch, start
  with Interruption() as interruption:
    while epoch < t.num_epochs:
      t0 = time.time()
      # 1-2. prompts and rollouts
      idx = epoch_prompt_indices(len(prompts), s.prompts_per_epoch, epoch, config.seed)
      ep_prompts = [prompts[i] for i in idx for _ in range(s.group_size)]
      ep_tags = [tags[i] for i in idx for _ in range(s.group_size)]
      states_p = encode([prompts[i] for i in idx])
      states = np.repeat(states_p, s.group_size, axis=0)
      indices = np.arange(n_roll, dtype=np.int64)
      init_idx = rollout.init_indices(indices, s.group_size, s.noise_sharing)
      seed_e = np.uint32((config.seed * 1_000_003 + epoch) % 2 ** 32)
      chunks = {"latents": [], "log_probs": [], "images": []}
      for c in range(0, n_roll, s.batch_size):
        rows = slice(c, c + s.batch_size)
        out = programs.rollout(
            state.params, base, programs.vae_params, _place(states[rows], programs.batch(3)),
            uncond, _place(np.full(s.batch_size, seed_e, np.uint32), programs.batch(1)),
            _place(indices[rows].astype(np.int32), programs.batch(1)),
            _place(init_idx[rows].astype(np.int32), programs.batch(1)))
        for k in chunks:
          chunks[k].append(_to_host(out[k]))
        if interruption.requested:
          break
      if interruption.requested:  # the state is the epoch-boundary state: save it as it is
        logging.warning("interrupted during the rollouts of epoch %d: saving the state of step "
                        "%d", epoch, step)
        if ckpt.latest_step() != step:
          ckpt.save(step, state, {"step": step, "epoch": epoch, "data_position": epoch,
                                  "skipped": int(state.skipped)}, config_json, force=True)
        break
      traj = {k: np.concatenate(v) for k, v in chunks.items()}
      rollout_s = time.time() - t0
      # 3. rewards and advantages
      t1 = time.time()
      components = reward_fn.components(traj.pop("images"), ep_prompts)
      raw_adv = np.asarray(losses.group_advantages(components["reward"], s.group_size,
                                                   eps=float(t.adv_eps), clip=0.0))
      adv = np.clip(raw_adv, -t.adv_clip_max, t.adv_clip_max) if t.adv_clip_max > 0 else raw_adv
      epoch_metrics = epoch_reward_metrics(components, adv, raw_adv, ep_tags, s.group_size,
                                           float(t.adv_clip_max))
      epoch_metrics.update(epoch=float(epoch), rollout_s=rollout_s, reward_s=time.time() - t1)
      if t.recompute_old_logprobs:
        recomputed = [
            _to_host(programs.logprobs(state.params, base,
                                       _place(traj["latents"][r:r + t.samples_per_step],
                                              programs.batch(5)),
                                       _place(states[r:r + t.samples_per_step],
                                              programs.batch(3)), uncond))
            for r in range(0, n_roll, t.samples_per_step)]
        recomputed = np.concatenate(recomputed)
        dev = np.abs(np.exp(recomputed[:, :k_train] - traj["log_probs"][:, :k_train]) - 1.0)
        epoch_metrics["rollout_vs_recomputed_clipfrac"] = float(np.mean(dev > t.clip_range))
        traj["log_probs"] = recomputed
      # 4. updates
      t_update = time.time()
      for inner in range(t.inner_epochs):
        order = (np.random.default_rng([config.seed, 0x5A3D, epoch, inner]).permutation(n_roll)
                 if t.shuffle_samples else np.arange(n_roll))
        choices = timestep_choices(n_roll, s.num_steps - 1, k_train, config.seed, epoch, inner)
        for m in range(0, n_roll, t.samples_per_step):
          rows = order[m:m + t.samples_per_step]
          host = {"latents": traj["latents"][rows], "log_probs": traj["log_probs"][rows],
                  "advantages": adv[rows].astype(np.float32), "steps": choices[rows],
                  "states": states[rows]}
          batch = {k: _place(v, programs.batch_shardings[k]) for k, v in host.items()}
          state, metrics = programs.update(state, base, batch, uncond)
          step += 1
          losses_seen.append(metrics["loss"])
          first_of_epoch = step == epoch * steps_per_epoch + 1
          if first_of_epoch:
            metrics = jax.device_get(metrics)
            epoch_metrics["clipfrac_first_step"] = float(metrics["clipfrac"])
          if step % config.log.every_steps == 0 or step % steps_per_epoch == 0:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.time() - t0
            metrics.update(epoch_metrics)
            metrics["learning_rate"] = float(optim.learning_rate_schedule(
                config.optimizer, max(total_steps, 1), t.samples_per_step)(step - 1))
            metrics["update_s_per_step"] = (time.time() - t_update) / max(
                step - epoch * steps_per_epoch, 1)
            writer.write(step, metrics)
            if jax.process_index() == 0:
              logging.info(
                  "step %d/%d (epoch %d/%d) | reward %.4f +- %.4f | loss %.3e | clipfrac %.3f | "
                  "approx_kl %.2e | grad norm %.3e | rollouts %.1fs | %.2fs/update | skipped %d",
                  step, total_steps, epoch + 1, t.num_epochs, metrics["reward_mean"],
                  metrics["reward_std"], metrics["loss"], metrics["clipfrac"],
                  metrics["approx_kl"], metrics["grad_norm"], rollout_s,
                  metrics["update_s_per_step"], int(metrics["skipped_total"]))
            last_metrics = metrics
      epoch += 1
      stop = interruption.requested is not None
      if epoch % config.checkpoint.every_epochs == 0 or epoch == t.num_epochs or stop:
        ckpt.save(step, state, {"step": step, "epoch": epoch, "data_position": epoch,
                                "skipped": int(state.skipped)}, config_json, force=True)
      if stop:
        break
    ckpt.close()
  writer.close()
  result.update({
      "end_step": step, "end_epoch": epoch,
      "losses": [float(x) for x in jax.device_get(losses_seen)],
      "skipped": int(state.skipped), "preempted": interruption.requested is not None,
      "interrupted_by": interruption.requested,
      "last_metrics": {k: float(v) for k, v in last_metrics.items()}})
  if jax.process_index() == 0:
    files.write_json(workdir / "train_result.json", result)
  result["state"] = state
  if t.export_at_end and epoch == t.num_epochs:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0 and lora_spec is not None:
      from scdpo_jax.lora import train as lora_train
      lora_train.export(workdir / "export", folder, policy.config, params, lora_spec)
    elif jax.process_index() == 0:
      unet_io.save_unet(workdir / "export" / "unet", policy.config, params)
  return result
