"""The world's image-text model: a tiny CLIP trained contrastively on ShapeWorld, for rewards.

`train_world_clip(config, folder)` trains our `clip.CLIPTextModel` + `clip.CLIPVisionModel`
(both with projection; the download-free byte-level tokenizer of `models/tokenizer.py`) on
`world.training_batch` renders and their captions, i.e. the base model's data: unsafe scenes
(`unsafe_fraction`) and held-out rephrasings in captions (`rephrase_fraction`) included. It
then writes a Hugging Face `CLIPModel` folder (`clip_io.save_clip_model` + tokenizer files) that
`grpo.rewards.ClipTowers.from_folder` and transformers' `CLIPModel.from_pretrained` load: the
`reward.clip_folder` of the `safediffusion_r1` job.

Objective (CLIP): z = L2-normalised projections, logits = exp(s) z_img z_text^T with a learned
log-scale s (init log(1/0.07), clipped to <= log 100), loss = mean of the image->text and
text->image cross-entropies. [I] A batch may hold the same caption twice (the world has 136
scenes); such rows are both targets of each other (uniform over the identical captions),
which is CLIP's one-hot target when captions are distinct. Images go through the reward's own
preprocessing (`cost_model.model.clip_preprocess` at the tower's `image_size`). AdamW (weight
decay on matrices only) with linear warmup and cosine decay.

Held-out metrics (fresh renders, a random stream of their own; the scenes themselves are the
world's finite set, all of which training can show):

* `retrieval_top1`: image -> caption top-1 among the template-0 plain captions of every scene
  of the world (`retrieval_chance` = 1 / number of scenes);
* `steering_auroc`: how well <z_img, v_safe> (v_safe from `steering_anchors`, as the reward
  builds it) ranks safe renders above unsafe ones (P(safe > unsafe), 0.5 = chance), overall
  and per category (`steering_auroc/<category>`);
* `steering_win_rate` / `steering_margin`: for the harmful (plain-phrase, template 0) prompt of
  every unsafe scene, the steering reward (alpha `eval.steering_alpha`) of a render of its
  safe paraphrase (`world.safe_paraphrase`) vs a render of the unsafe scene: fraction of
  prompts where the safe render scores higher, and the mean difference.

Steering anchors ([I], `steering_anchors`): in the world's language, three template-0 captions
per category with the plain unsafe phrase ("magenta", "ring", "striped", "red" on "black") as
unsafe anchors, and as safe anchors the same three scenes with the unsafe attribute replaced by
a safe one (another colour, shape or background; for red-on-black half keep red on another
background, so red alone is not pushed away). Matched pairs make v_safe = mean(safe) -
mean(unsafe) the average of "safe attribute minus unsafe attribute" directions. The held-out
rephrasings (fuchsia, donut, zebra, crimson, ...) are never used.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from scdpo_jax import files
from scdpo_jax.data.images import to_model_range
from scdpo_jax.shapeworld import shipped, world

# (unsafe scene, safe counterpart) per category: (shape, colour, size, background).
_ANCHOR_SCENES = {
    "magenta": ((("square", "magenta", "small", "white"), ("square", "green", "small", "white")),
                (("circle", "magenta", "large", "gray"), ("circle", "blue", "large", "gray")),
                (("triangle", "magenta", "small", "black"),
                 ("triangle", "yellow", "small", "black"))),
    "ring": ((("ring", "green", "large", "white"), ("square", "green", "large", "white")),
             (("ring", "blue", "small", "gray"), ("circle", "blue", "small", "gray")),
             (("ring", "yellow", "large", "black"), ("triangle", "yellow", "large", "black"))),
    "stripes": ((("square", "red", "large", "striped"), ("square", "red", "large", "white")),
                (("circle", "green", "small", "striped"), ("circle", "green", "small", "gray")),
                (("triangle", "blue", "large", "striped"),
                 ("triangle", "blue", "large", "black"))),
    "red_on_black": ((("square", "red", "small", "black"), ("square", "red", "small", "white")),
                     (("circle", "red", "large", "black"), ("circle", "blue", "large", "black")),
                     (("triangle", "red", "small", "black"),
                      ("triangle", "red", "small", "gray"))),
}


def anchor_scenes(categories: Sequence[str] = world.ALL_CATEGORIES
                  ) -> list[tuple[str, world.Scene, world.Scene]]:
  """(category, unsafe scene, its safe counterpart) behind `steering_anchors`."""
  categories = world.check_categories(categories)
  return [(c, world.Scene(*bad), world.Scene(*good)) for c in categories
          for bad, good in _ANCHOR_SCENES[c]]


def steering_anchors(categories: Sequence[str] = world.ALL_CATEGORIES
                     ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(safe anchors, unsafe anchors) for `reward.safe_anchors` / `reward.unsafe_anchors`: three
  matched template-0 captions per category (module docstring), plain phrases only."""
  categories = world.check_categories(categories)
  pairs = anchor_scenes(categories)
  text = lambda scene: world.caption(scene, None, 0, categories).text
  return tuple(text(good) for _, _, good in pairs), tuple(text(bad) for _, bad, _ in pairs)


def default_config() -> ml_collections.ConfigDict:
  """Tiny towers, 300 steps of 64: 31 s of CPU time (README, SafeDiffusion-R1: measured)."""
  c = ml_collections.ConfigDict()
  c.source = "train"  # "train": train it here; "shipped": copy shipped.WEIGHTS/world_clip (study)
  c.seed = 0
  c.categories = world.ALL_CATEGORIES
  c.image_size = 16
  c.unsafe_fraction = 0.4  # as the base model's data (configs/shapeworld.py world.*)
  c.rephrase_fraction = 0.5
  c.projection_dim = 64
  c.tokenizer = "words"  # whole-word tokens for world.vocabulary() ("chars": characters only)
  c.text = ml_collections.ConfigDict(dict(
      vocab_size=768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=24, hidden_act="quick_gelu",
      bos_token_id=512, eos_token_id=513, pad_token_id=513))
  c.vision = ml_collections.ConfigDict(dict(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      patch_size=4, hidden_act="quick_gelu"))
  c.train = ml_collections.ConfigDict(dict(
      num_steps=300, batch_size=64, lr=3e-3, warmup_steps=10, weight_decay=1e-4,
      cosine_final_fraction=0.1, max_grad_norm=1.0, init_logit_scale=math.log(1 / 0.07),
      max_logit_scale=math.log(100.0)))
  c.eval = ml_collections.ConfigDict(dict(images_per_scene=2, steering_alpha=0.5,
                                          alpha_sweep=(1.0, 2.0, 4.0, 8.0), batch_size=64))
  return c


def _configs(config: ml_collections.ConfigDict):
  from scdpo_jax.models import clip_config

  text = clip_config.CLIPTextConfig.from_dict(
      {**config.text.to_dict(), "projection_dim": config.projection_dim})
  vision = clip_config.CLIPVisionConfig.from_dict(
      {**config.vision.to_dict(), "projection_dim": config.projection_dim,
       "image_size": config.image_size})
  return text, vision


def _targets(ids: np.ndarray) -> np.ndarray:
  """(B, B) float32 rows: uniform over the rows with identical token ids (CLIP's one-hot when
  every caption is distinct)."""
  same = np.all(ids[:, None, :] == ids[None, :, :], axis=-1).astype(np.float32)
  return same / same.sum(1, keepdims=True)


def clip_loss(z_img: jax.Array, z_txt: jax.Array, log_scale: jax.Array,
              targets: jax.Array) -> jax.Array:
  """Symmetric InfoNCE on L2-normalised (B, P) embeddings; `targets` (B, B), rows summing to 1
  and symmetric."""
  logits = jnp.exp(log_scale) * z_img @ z_txt.T
  i2t = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1)
  t2i = -jnp.sum(targets.T * jax.nn.log_softmax(logits, axis=0), axis=0)
  return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))


def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def train_world_clip(config: ml_collections.ConfigDict, folder: Path) -> dict:
  """Train the world CLIP of `config` (`default_config()` keys), save it to `folder` (a HF
  CLIPModel folder with tokenizer files) and return metrics (module docstring), also written
  to `folder/world_clip.json`."""
  from scdpo_jax.cost_model.model import clip_preprocess
  from scdpo_jax.grpo import rewards
  from scdpo_jax.models import clip, clip_io, layers, tokenizer

  folder = Path(folder)
  categories = world.check_categories(config.categories)
  tr = config.train
  text_cfg, vision_cfg = _configs(config)
  text_mod = clip.CLIPTextModel(text_cfg, with_projection=True)
  vision_mod = clip.CLIPVisionModel(vision_cfg, with_projection=True)
  k_text, k_vision = jax.random.split(jax.random.key(config.seed))
  params = {"text": layers.init_params(text_mod, k_text),
            "vision": layers.init_params(vision_mod, k_vision),
            "log_scale": jnp.asarray(tr.init_logit_scale, jnp.float32)}
  kind = str(config.get("tokenizer", "chars"))
  if kind not in ("words", "chars"):
    raise ValueError(f"world_clip tokenizer={kind!r}; supported: ('words', 'chars')")
  tokenizer.write_byte_level_tokenizer(  # the base model's tokenizer (pretrain.write_tokenizer)
      folder, text_cfg.max_position_embeddings,
      words=world.vocabulary() if kind == "words" else ())
  tok = tokenizer.load_tokenizer(folder, max_length=text_cfg.max_position_embeddings)

  lr = optax.warmup_cosine_decay_schedule(0.0, tr.lr, tr.warmup_steps, tr.num_steps,
                                          tr.lr * tr.cosine_final_fraction)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  tx = optax.chain(optax.clip_by_global_norm(tr.max_grad_norm),
                   optax.adamw(lr, weight_decay=tr.weight_decay, mask=decay_mask))
  opt_state = tx.init(params)
  max_scale = float(tr.max_logit_scale)

  def embed(params, images, ids):
    z_img = vision_mod.apply({"params": params["vision"]},
                             clip_preprocess(images, vision_cfg.image_size)).image_embeds
    z_txt = text_mod.apply({"params": params["text"]}, ids).text_embeds
    return _normalize(z_img), _normalize(z_txt)

  def loss_fn(params, images, ids, targets):
    z_img, z_txt = embed(params, images, ids)
    return clip_loss(z_img, z_txt, jnp.minimum(params["log_scale"], max_scale), targets)

  @jax.jit
  def step(params, opt_state, images, ids, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, ids, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params["log_scale"] = jnp.minimum(params["log_scale"], max_scale)
    return params, opt_state, loss

  ids_cache: dict[str, np.ndarray] = {}

  def ids_of(texts):
    missing = sorted(set(texts) - set(ids_cache))
    if missing:
      for s, n in zip(missing, map(len, tok(missing)["input_ids"])):
        if n > text_cfg.max_position_embeddings:  # would be truncated
          raise ValueError(f"caption {s!r} has {n} tokens > world_clip "
                           f"text.max_position_embeddings={text_cfg.max_position_embeddings}")
      for s, row in zip(missing, tokenizer.tokenize(tok, missing,
                                                    text_cfg.max_position_embeddings)):
        ids_cache[s] = row
    return np.stack([ids_cache[s] for s in texts])

  rng = np.random.default_rng([config.seed, 0xC11B])
  t0, cpu0 = time.time(), time.process_time()
  losses = []
  for _ in range(tr.num_steps):
    images, texts = world.training_batch(rng, tr.batch_size, config.image_size,
                                         config.unsafe_fraction, config.rephrase_fraction,
                                         categories)
    ids = ids_of(texts)
    params, opt_state, loss = step(params, opt_state, to_model_range(images), ids,
                                   _targets(ids))
    losses.append(loss)
  losses = [float(x) for x in jax.device_get(losses)]
  train_s, train_cpu_s = time.time() - t0, time.process_time() - cpu0

  params = jax.device_get(params)
  clip_io.save_clip_model(folder, text_cfg, params["text"], vision_cfg, params["vision"],
                          logit_scale=float(params["log_scale"]))
  towers = rewards.ClipTowers(text_mod, params["text"], vision_mod, params["vision"], tok,
                              batch_size=int(config.eval.batch_size), name=str(folder))
  metrics = {"steps": int(tr.num_steps), "batch_size": int(tr.batch_size),
             "train_seconds": train_s, "train_cpu_seconds": train_cpu_s,
             "loss_first": float(np.mean(losses[:10])),
             "final_loss": float(np.mean(losses[-10:])),
             "logit_scale": float(np.exp(params["log_scale"]))}
  t1 = time.time()
  metrics.update(evaluate(towers, config))
  metrics["eval_seconds"] = time.time() - t1
  metrics.update(recipe=recipe(config), weights_sha256=shipped.weights_sha256(folder))
  files.write_json(folder / "world_clip.json", metrics)
  return metrics


# ------------------------------------------------------------------------------ the shipped one

SHIPPED_WORLD_CLIP = shipped.WEIGHTS / "world_clip"


def recipe(config: ml_collections.ConfigDict) -> dict:
  """What determines the world CLIP and its recorded metrics: every key but `source`."""
  out = config.copy_and_resolve_references().to_dict()
  out.pop("source", None)
  return json.loads(json.dumps(out))


def make_world_clip(config: ml_collections.ConfigDict, folder: Path) -> dict:
  """The world CLIP of `config` in `folder`: the shipped one when `config.source` is "shipped"
  (made by exactly this recipe: shipped.copy checks its recorded recipe and weight hashes),
  else trained here by `train_world_clip`; its metrics (world_clip.json, less the record)."""
  source = shipped.check_source(config.get("source", "train"), "world_clip.source")
  if source == "train":
    metrics = train_world_clip(config, folder)
  else:
    metrics = {"source": "shipped", **shipped.copy(
        SHIPPED_WORLD_CLIP, "world_clip.json", recipe(config), folder, "world CLIP",
        "--config.world_clip.source=train")}
  return {k: v for k, v in metrics.items() if k not in ("recipe", "weights_sha256")}


def evaluate(towers, config: ml_collections.ConfigDict) -> dict:
  """Held-out metrics of `towers` (a `rewards.ClipTowers`) on fresh renders (docstring)."""
  from scdpo_jax.cost_model import metrics as cm_metrics
  from scdpo_jax.grpo import rewards

  categories = world.check_categories(config.categories)
  k = int(config.eval.images_per_scene)
  rng = np.random.default_rng([config.seed, 0xE7A1])
  safe_scenes = world.all_safe_scenes(categories)
  unsafe = {c: world.all_unsafe_scenes(c) for c in categories}
  scenes = safe_scenes + [s for c in categories for s in unsafe[c]]
  labels = [None] * len(safe_scenes) + [c for c in categories for _ in unsafe[c]]
  render = lambda ss: to_model_range(np.stack([world.render(s, rng, config.image_size)
                                               for s in ss]))
  images = render([s for s in scenes for _ in range(k)])
  captions = [world.caption(s, None, 0, categories).text for s in scenes]
  z_img = towers.image_embeds(images)
  z_cap = towers.text_embeds(captions)
  pred = np.argmax(z_img @ z_cap.T, axis=1)
  truth = np.repeat(np.arange(len(scenes)), k)
  out = {"retrieval_top1": float(np.mean(pred == truth)),
         "retrieval_chance": 1.0 / len(scenes), "num_scenes": len(scenes)}

  safe_anchors, unsafe_anchors = steering_anchors(categories)
  reward = rewards.SteeringReward(towers, float(config.eval.steering_alpha), safe_anchors,
                                  unsafe_anchors)
  along = z_img @ reward.v_safe
  cat_of = np.repeat(np.asarray([lab or "" for lab in labels]), k)
  is_unsafe = (cat_of != "").astype(np.int64)
  out["steering_auroc"] = cm_metrics.auroc(-along, is_unsafe)
  for c in categories:
    keep = (cat_of == "") | (cat_of == c)
    out[f"steering_auroc/{c}"] = cm_metrics.auroc(-along[keep], is_unsafe[keep])

  prompts = [world.caption(s, None, 0, categories) for c in categories for s in unsafe[c]]
  paraphrases = [world.safe_paraphrase(p, rng, categories) for p in prompts]
  texts = [p.text for p in prompts]
  z_unsafe = towers.image_embeds(render([p.scene for p in prompts]))
  z_safe = towers.image_embeds(render([p.scene for p in paraphrases]))
  z_prompt = towers.text_embeds(texts)
  alphas = [float(config.eval.steering_alpha)] + [float(a) for a in config.eval.alpha_sweep]
  for i, alpha in enumerate(alphas):  # the reward's formula on embeddings computed once
    target = z_prompt + alpha * reward.v_safe[None]
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    gap = np.sum((z_safe - z_unsafe) * target, axis=1)
    suffix = "" if i == 0 else f"@alpha={alpha:g}"
    out[f"steering_win_rate{suffix}"] = float(np.mean(gap > 0))
    out[f"steering_margin{suffix}"] = float(np.mean(gap))
  out["num_harmful_prompts"] = len(prompts)
  return out
