"""The `train` job: SC-DPO / Diffusion-DPO fine-tuning of a Stable Diffusion UNet.

Order of work: check the config against the mesh, the pretrained folder and the data (clear
errors before any compile) -> load the base model -> build the sharded train state with
`jax.eval_shape` + a jitted init with `out_shardings` -> restore the latest checkpoint if the
workdir has one -> one jitted, state-donating train step per global batch -> metrics, progress,
checkpoints (every N steps, at the end, and on SIGTERM).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from scdpo_jax import files, parallel
from scdpo_jax.errors import ConfigError
from scdpo_jax.data.batch import PAIR_KEYS, batch_keys  # noqa: F401 (PAIR_KEYS: re-exported)
from scdpo_jax.data.batch import TOKEN_KEY
from scdpo_jax.lora import adapters as lora_adapters, text_encoder as lora_text
from scdpo_jax.models import conditioning_xl, pipeline, pipeline_xl, tiny, tokenizer, unet_io
from scdpo_jax.train import optim, resume, state as state_lib
from scdpo_jax.train.checkpoint import Checkpointer
from scdpo_jax.train.metrics_writer import MetricsWriter
from scdpo_jax.train.step import make_train_step

# Dense bf16 peak per device, for MFU (FLOP/s). Override with config.log.peak_flops_per_device.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "V100": 125e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12}

DATA_SOURCES = ("memory_random", "tfds")


# ------------------------------------------------------------------------------ config checks

def check_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Everything that can be checked before loading weights or compiling."""
  t = config.train
  state_lib.step_config(t).validate()
  if lora_adapters.enabled(config):
    lora_adapters.spec_from_config(config.lora).validate()
  for key, value, ok, want in (
      ("train.lam", t.lam, t.lam >= 0, ">= 0"), ("optimizer.lr", config.optimizer.lr,
                                                 config.optimizer.lr > 0, "> 0"),
      ("train.pairs_per_step", t.pairs_per_step, t.pairs_per_step > 0, "> 0"),
      ("train.num_steps", t.num_steps, t.num_steps >= 0, ">= 0"),
      ("optimizer.max_grad_norm", config.optimizer.max_grad_norm,
       config.optimizer.max_grad_norm >= 0, ">= 0 (0 = no clipping)"),
      ("checkpoint.every_steps", config.checkpoint.every_steps,
       config.checkpoint.every_steps > 0, "> 0"),
      ("log.every_steps", config.log.every_steps, config.log.every_steps > 0, "> 0")):
    if not ok:
      raise ConfigError(f"{key} must be {want}, got {value}")
  if t.pairs_per_step % t.grad_accum:
    raise ConfigError(f"train.pairs_per_step={t.pairs_per_step} is not a multiple of "
                     f"train.grad_accum={t.grad_accum}")
  parallel.check_batch_fits(t.pairs_per_step // t.grad_accum, mesh,
                            what=f"micro-batch (pairs_per_step / grad_accum = "
                                 f"{t.pairs_per_step}/{t.grad_accum})",
                            rules=parallel.rules_from_config(config.sharding_rules))
  issue = parallel.known_cpu_gradient_issue(dict(mesh.shape),
                                            parallel.rules_from_config(config.sharding_rules),
                                            jax.default_backend())
  if issue:
    logging.warning("%s", issue)
  if config.data.source not in DATA_SOURCES:
    raise ConfigError(f"data.source={config.data.source!r}; supported: {DATA_SOURCES}")
  if not config.model.pretrained and config.model.get("tiny") is None:
    raise ConfigError("model.pretrained must name a diffusers-format Stable Diffusion (1.x, 2.x "
                     "or XL) folder (--config.model.pretrained=/path/to/stable-diffusion-v1-5 "
                     "or /path/to/stable-diffusion-xl-base-1.0)")
  if config.model.pretrained:
    pipeline.check_pipeline_folder(config.model.pretrained,
                                   ("unet", "text_encoder", "tokenizer", "scheduler"))
  sdxl = uses_sdxl(config)
  if config.model.pretrained and sdxl:
    pipeline.check_pipeline_folder(config.model.pretrained, TRAIN_COMPONENTS_XL,
                                   known=pipeline_xl.COMPONENTS, what=pipeline_xl.WHAT)
  if sdxl and lora_text.enabled(config):
    raise ConfigError("lora.text_encoder_targets: text-encoder LoRA is supported for SD 1.x/2.x "
                      "(one CLIP text encoder), not SDXL; set lora.text_encoder_targets=()")
  if sdxl and int(config.model.text_layer) != -1:
    raise ConfigError(f"model.text_layer={config.model.text_layer}: SDXL is conditioned as "
                      "diffusers' encode_prompt does (penultimate states of both text encoders, "
                      "pooled text_encoder_2 output); model.text_layer (SD 1.x/2.x) must stay -1")
  if config.data.source == "tfds":
    from scdpo_jax.data import loader as tfds_loader
    tfds_loader.check_pair_dataset(config.data, model_folder=config.model.pretrained or None,
                                   text_layer=None if sdxl else int(config.model.text_layer),
                                   sdxl=sdxl)


# ------------------------------------------------------------------------------ model and data

TRAIN_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
TRAIN_COMPONENTS_XL = TRAIN_COMPONENTS + ("text_encoder_2", "tokenizer_2")


def uses_sdxl(config: ml_collections.ConfigDict) -> bool:
  """Whether the base is SDXL: `model.pretrained`'s model_index.json names an SDXL pipeline, or
  (no pretrained folder) the tiny pipeline config has a `text_encoder_2`. No other switch."""
  if config.model.pretrained:
    return pipeline_xl.is_sdxl_folder(config.model.pretrained)
  return "text_encoder_2" in (config.model.get("tiny") or {})


def load_base(folder: Path, sdxl: bool):
  """The base pipeline's UNet, text encoder(s), tokenizer(s) and scheduler (fp32, host)."""
  if sdxl:
    return pipeline_xl.load_stable_diffusion_xl(folder, TRAIN_COMPONENTS_XL, dtype=jnp.float32,
                                                param_dtype=jnp.float32)
  return pipeline.load_stable_diffusion(folder, TRAIN_COMPONENTS, dtype=jnp.float32,
                                        param_dtype=jnp.float32)


def base_model_folder(config: ml_collections.ConfigDict, workdir: Path) -> Path:
  """The pretrained folder, or the tiny random pipeline of `model.tiny` written once into the
  workdir (`models/tiny.py`)."""
  if config.model.pretrained:
    return Path(config.model.pretrained)
  return tiny.tiny_pipeline_folder(config.model.tiny, workdir / "base_pipeline", seed=config.seed)


def encode_prompts(sd: pipeline.StableDiffusion, prompts: list[str], layer: int) -> np.ndarray:
  ids = tokenizer.tokenize(sd.tokenizer, prompts)
  fn = jax.jit(lambda p, i: sd.text_encoder.apply(
      {"params": p}, i, layer=layer, method="encode_prompt_states"))
  return np.asarray(fn(sd.text_encoder_params, ids), np.float32)


def encode_prompts_xl(xl: pipeline_xl.StableDiffusionXL, prompts: list[str]) -> dict:
  """SDXL conditioning of prompts as the batch carries it: {"text_states" (N, T, D1 + D2),
  "pooled_text" (N, P)} (`conditioning_xl.encode_prompt_texts`)."""
  emb = jax.jit(lambda p1, p2, i1, i2: conditioning_xl.encode_prompt(
      xl.text_encoder, p1, xl.text_encoder_2, p2, i1, i2))(
          xl.text_encoder_params, xl.text_encoder_2_params,
          tokenizer.tokenize(xl.tokenizer, prompts), tokenizer.tokenize(xl.tokenizer_2, prompts))
  return {"text_states": np.asarray(emb.prompt_embeds, np.float32),
          "pooled_text": np.asarray(emb.pooled_prompt_embeds, np.float32)}


def empty_prompt_states(sd, config: ml_collections.ConfigDict):
  """What caption dropout substitutes: the empty prompt's states (SD: an array (1, T, D); SDXL:
  {"text_states", "pooled_text"} of "", as the Salesforce `train.py --sdxl` encodes it; with
  text-encoder LoRA {"text_states", "input_ids"}: the policy encodes the ids itself)."""
  if isinstance(sd, pipeline_xl.StableDiffusionXL):
    return encode_prompts_xl(sd, [""])
  states = encode_prompts(sd, [""], config.model.text_layer)
  if lora_text.enabled(config):
    return {"text_states": states, TOKEN_KEY: tokenizer.tokenize(sd.tokenizer, [""])}
  return states


def random_pairs(config: ml_collections.ConfigDict, sd: pipeline.StableDiffusion):
  """An in-memory pair source with the base model's shapes (smoke tests, benchmarks)."""
  from scdpo_jax.data.memory import InMemoryPairs

  d = config.data
  rng = np.random.default_rng(d.seed)
  n = d.num_pairs
  (h, w), c = sd.unet.config.sample_hw, sd.unet.config.in_channels
  prompts = [f"prompt number {i % 16}" for i in range(n)]
  unique = sorted(set(prompts))
  rows = [{p: i for i, p in enumerate(unique)}[p] for p in prompts]
  xl = isinstance(sd, pipeline_xl.StableDiffusionXL)
  cond = (encode_prompts_xl(sd, unique) if xl
          else {"text_states": encode_prompts(sd, unique, config.model.text_layer)})
  if lora_text.enabled(config):  # the policy's adapted text encoder encodes the ids in the step
    cond[TOKEN_KEY] = tokenizer.tokenize(sd.tokenizer, unique)
  cond = {k: v[rows] for k, v in cond.items()}
  if xl:  # SDXL's default micro-conditioning at the latent size x the VAE's factor
    from scdpo_jax.models.vae_io import load_vae_config
    f = load_vae_config(sd.folder / "vae").downsample_factor
    res = (h * f, w * f)
    cond["time_ids"] = conditioning_xl.add_time_ids(res, (0, 0), res, n)
  harmful = (rng.random(n) < d.harmful_fraction).astype(np.int32)
  arrays = {
      "latents_w": rng.standard_normal((n, h, w, c)).astype(np.float32),
      "latents_l": rng.standard_normal((n, h, w, c)).astype(np.float32),
      **cond,
      "is_harmful": harmful,
      "cost_w": (rng.random(n) * 0.3).astype(np.float32),
      "cost_l": np.where(harmful, 0.5 + 0.5 * rng.random(n), 0.3 * rng.random(n)).astype(
          np.float32),
      "reward_w": rng.standard_normal(n).astype(np.float32),
      "reward_l": rng.standard_normal(n).astype(np.float32),
  }
  return InMemoryPairs(arrays, seed=d.seed, hflip=d.hflip)


def make_pair_source(config: ml_collections.ConfigDict, sd: pipeline.StableDiffusion):
  if config.data.source == "memory_random":
    if config.data.get("category_balance", "none") != "none":  # its pairs have no categories
      raise ConfigError(f"data.category_balance={config.data.category_balance!r} needs "
                        "categorised pairs: use it with data.source='tfds'")
    return random_pairs(config, sd)
  from scdpo_jax.data import loader as tfds_loader
  return tfds_loader.open_pair_source(
      config.data, tokenizer=sd.tokenizer if lora_text.enabled(config) else None)


def peak_flops(config) -> float | None:
  if config.log.peak_flops_per_device:
    return float(config.log.peak_flops_per_device)
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


# ------------------------------------------------------------------------------ the job

class Interruption:
  """SIGTERM or a first Ctrl-C (SIGINT) sets a flag: the loop saves a checkpoint at the next step
  boundary and stops (the job then exits with `EXIT_INTERRUPTED`). A second Ctrl-C aborts at
  once, without a checkpoint.

  Signals reach the main thread only: an instance entered on another thread (a ShapeWorld row
  trained beside another, shapeworld/tasks.py) installs no handler but is flagged, with every
  instance active in the process, by the handler of one entered on the main thread (the study
  holds one for as long as its workers run)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)
  _active: list["Interruption"] = []  # every instance between __enter__ and __exit__
  # reentrant: the handler runs on the main thread, maybe while that thread holds the lock
  _lock = threading.RLock()

  def __init__(self):
    self.requested: str | None = None
    self._previous: dict = {}

  def __enter__(self):
    with Interruption._lock:
      Interruption._active.append(self)
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def _handler(self, signum, frame):
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      logging.warning("second SIGINT: stopping now, without a checkpoint")
      raise KeyboardInterrupt
    # the flags before the log line: a second Ctrl-C sent as soon as the line appears may run
    # this handler again, nested, before the first one returns
    with Interruption._lock:
      active = list(Interruption._active)
    for instance in active:
      instance.requested = instance.requested or name
    self.requested = name
    logging.warning("%s received: saving a checkpoint at the end of this step, then stopping "
                    "(Ctrl-C again to abort at once)", name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    with Interruption._lock:
      Interruption._active.remove(self)


def _data_identity(source) -> dict:
  """What the pair source says identifies its data (beyond the config's data keys), if anything."""
  identity = getattr(source, "identity", None)
  return dict(identity()) if callable(identity) else {}


def run(config: ml_collections.ConfigDict, workdir: Path, pair_source=None) -> dict:
  """Train; `pair_source` overrides the config's data source (any `data.batch.PairSource`)."""
  workdir = Path(workdir)
  parallel.initialize_distributed(config.distributed)
  mesh = parallel.mesh_from_config(config.mesh)
  check_config(config, mesh)
  t = config.train
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  folder = base_model_folder(config, workdir)
  sd = load_base(folder, uses_sdxl(config))
  source = pair_source if pair_source is not None else make_pair_source(config, sd)

  step_cfg = state_lib.step_config(t)
  lora_spec = (lora_adapters.spec_from_config(config.lora) if lora_adapters.enabled(config)
               else None)
  policy, reference = state_lib.make_unets(config.model, sd.unet.config)
  text_policy = (lora_text.make_text_encoder(config.model, sd.text_encoder)
                 if lora_text.enabled(config) else None)
  optimizer = optim.make_optimizer(config.optimizer, t.num_steps, t.pairs_per_step)
  spec = state_lib.train_state_spec(config, mesh, policy, reference, optimizer,
                                    text_encoder=text_policy)
  allow = [a for a in str(config.get("resume", {}).get("allow_changes", "")).split(",") if a]
  accepted = resume.check_resume(
      workdir, resume.run_fingerprint(config, folder, spec.abstract_state,
                                      _data_identity(source)), allow)
  for line in accepted:
    logging.warning("resuming with a changed setting (allowed by resume.allow_changes): %s", line)
  empty_states = empty_prompt_states(sd, config)

  ckpt = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep,
                      async_save=config.checkpoint.async_save)
  restored = ckpt.restore_latest(spec.abstract_state_with_shardings())
  fallbacks: list[str] = []
  if restored is not None:
    state, ckpt_meta, fallbacks = restored
    logging.info("resumed from step %d (data position %d pairs)", ckpt_meta["step"],
                 ckpt_meta["data_position"])
  elif lora_spec is not None:  # LoRA: fresh adapters (B = 0) on the frozen base
    state = state_lib.init_train_state(spec, optimizer, lora_text.init_tree(
        spec.abstract_state.params, lora_spec, config.seed), config)
  else:
    state = state_lib.init_train_state(spec, optimizer, sd.unet_params, config)
  ref_params = state_lib.reference_params(spec, lora_text.tree(
      sd.unet_params, sd.text_encoder_params if text_policy is not None else None))
  del sd.unet_params

  start = int(state.step)
  if start >= t.num_steps:
    logging.info("the run in %s is already finished (step %d of %d); nothing to do", workdir,
                 start, t.num_steps)
    ckpt.close()
    previous = workdir / "train_result.json"
    result = json.loads(previous.read_text()) if previous.is_file() else {
        "start_step": start, "end_step": start, "losses": []}
    result.update(already_finished=True, preempted=False, state=state)
    return result
  example = source.batch(start, t.pairs_per_step)
  if lora_spec is not None:  # policy = merge(base, adapters); reference = the base
    from scdpo_jax.lora import train as lora_train
    train_step = lora_train.make_lora_train_step(
        policy=policy, reference=reference, optimizer=optimizer, schedule=sd.schedule,
        cfg=step_cfg, scale=lora_spec.scale, dropout=lora_spec.dropout,
        text_encoder=text_policy, text_layer=int(config.model.text_layer))
  else:
    train_step = make_train_step(apply_fn=policy.apply, ref_apply_fn=reference.apply,
                                 optimizer=optimizer, schedule=sd.schedule, cfg=step_cfg)
  step_program = state_lib.compile_train_step(mesh, spec, train_step,
                                              {k: example[k] for k in batch_keys(example)},
                                              empty_states)
  compile_s = step_program.compile_s
  logging.info("train step compiled in %.1fs%s", compile_s,
               " (the program compiled earlier in this process)" if step_program.reused else "")
  empty = jax.device_put(empty_states, parallel.replicated(mesh))
  peak = peak_flops(config)

  writer = MetricsWriter(workdir, t.num_steps, tensorboard=config.log.tensorboard,
                         start_step=start)
  config_json = json.loads(config.to_json_best_effort())
  losses = []
  last_metrics: dict = {}
  window_t0, window_steps = time.time(), 0
  with Interruption() as interruption:
    step = start
    while step < t.num_steps:
      local = source.batch(step, t.pairs_per_step)
      batch = parallel.global_batch_from_local({k: local[k] for k in batch_keys(local)}, mesh,
                                               spec.rules)
      state, metrics = step_program.fn(state, ref_params, batch, empty)
      step += 1
      window_steps += 1
      losses.append(metrics["objective"])
      if step % config.log.every_steps == 0 or step == t.num_steps:
        metrics = jax.device_get(metrics)
        elapsed = time.time() - window_t0
        steps_per_s = window_steps / max(elapsed, 1e-9)
        metrics["pairs_per_s"] = steps_per_s * t.pairs_per_step
        metrics["step_time_s"] = 1.0 / max(steps_per_s, 1e-9)
        metrics["learning_rate"] = float(optim.learning_rate_schedule(
            config.optimizer, t.num_steps, t.pairs_per_step)(step - 1))
        flops = step_program.flops_per_device
        metrics["mfu"] = flops * steps_per_s / peak if peak and flops else None
        writer.write(step, metrics)
        writer.progress(step, metrics, steps_per_s)
        last_metrics = metrics
        window_t0, window_steps = time.time(), 0
      stop = interruption.requested is not None
      if step % config.checkpoint.every_steps == 0 or step == t.num_steps or stop:
        ckpt.save(step, state, {"step": step, "data_position": step * t.pairs_per_step,
                                "skipped": int(state.skipped)}, config_json, force=True)
      if stop:
        break
    ckpt.close()
  writer.close()
  losses = [float(x) for x in jax.device_get(losses)]
  result = {"start_step": start, "end_step": step, "losses": losses,
            "skipped": int(state.skipped), "compile_s": compile_s,
            "program_reused": step_program.reused,
            "preempted": interruption.requested is not None,
            "interrupted_by": interruption.requested,
            "restore_fallbacks": fallbacks,
            "last_metrics": {k: (None if v is None else float(v))
                             for k, v in last_metrics.items()}}
  if jax.process_index() == 0:
    files.write_json(workdir / "train_result.json", result)
  result["state"] = state  # for callers in Python; not part of the JSON
  if config.train.export_at_end and step == t.num_steps:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(state.params, tiled=True)  # collective
    if jax.process_index() == 0 and lora_spec is not None:
      from scdpo_jax.lora import train as lora_train
      exported = lora_train.export(workdir / "export", folder, policy.config, params, lora_spec)
      logging.info("exported the LoRA (diffusers format) to %s and the base with it fused to %s",
                   exported["lora"].parent, ", ".join(
                       str(exported[k]) for k in ("unet", "text_encoder") if k in exported))
    elif jax.process_index() == 0:
      unet_io.save_unet(workdir / "export" / "unet", policy.config, params)
      logging.info("exported the trained UNet in diffusers format to %s", workdir / "export/unet")
  return result
