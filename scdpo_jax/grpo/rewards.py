"""Rewards for SafeDiffusion-R1 as pluggable functions on our own CLIP towers.

A reward function maps `images` (B, H, W, 3) float32 NHWC in [-1, 1] (the VAE's range) and the B
prompts to (B,) float32 rewards (higher is better). Built here:

* `SteeringReward` (the released reward, `rewards/safety_classifier.py` + `inference_reward.py`):
  z = L2-normalised CLIP embeddings, v_safe = normalize(mean z_text(safe anchors) -
  mean z_text(unsafe anchors)) (means of the normalised anchor embeddings; an empty list counts
  as the zero vector, the released "empty-positive" 0 + 3 variant), and

      r = < z_img, normalize(z_text(prompt) + alpha * v_safe) >,   alpha = 0.5 released,

  for every prompt (the released code computes a "text safety" score and ignores it). The
  diffusion model still gets the original prompt; only the reward target is steered. Default
  anchors: the released "compact" 5 + 3 lists (`SAFE_ANCHORS`, `UNSAFE_ANCHORS`); the paper's
  main checkpoint used 25 + 20 anchors that are not released.
* `ClipScoreReward`: r = cos(z_img, z_text(prompt)) (CLIP score / 100 without the max(., 0)).
* `CostReward`: r = -C(image) from a trained safety cost model (`cost_model.CostModelScorer`).
* `WeightedReward`: r = sum_i w_i r_i; `components()` returns every term for logging.

The encoder: the released reward runs HPSv2.1 (OpenCLIP ViT-H-14 + HPS weights) on a JPEG of each
image; ours is any local Hugging Face CLIP folder (`ClipTowers.from_folder`) on the float image,
resized (bicubic, antialiased) and centre-cropped in JAX (`cost_model.model.clip_preprocess`):
an [I] choice, documented (no JPEG round trip; HPS weights would need an OpenCLIP converter).
`ClipTowers.random` builds a tiny random pair of towers for tests and CPU demos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The released "compact" anchors (rewards/safety_classifier.py, build_safety_direction defaults).
SAFE_ANCHORS = (
    "a safe",
    "a non-violent, non-sexual image",
    "a wholesome, PG-rated photo",
    "an image with no nudity, no gore, no weapons",
    "appropriate image",
)
UNSAFE_ANCHORS = (
    "explicit sexual content and nudity",
    "pornographic material",
    "an image with naked people engaged in sexual acts",
)

REWARD_NAMES = ("steering", "clip_score", "cost")

RewardFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]


def _normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ClipTowers:
  """A CLIP text tower and image tower with projections, and the tokenizer; host API that returns
  L2-normalised (B, P) float32 embeddings, computed in fixed-size jitted batches."""

  def __init__(self, text_module, text_params, vision_module, vision_params, tokenizer, *,
               batch_size: int = 16, name: str = "clip"):
    from scdpo_jax.cost_model.model import clip_preprocess

    if text_module.config.projection_dim != vision_module.config.projection_dim:
      raise ValueError(f"CLIP towers {name}: text projection_dim "
                       f"{text_module.config.projection_dim} != vision projection_dim "
                       f"{vision_module.config.projection_dim}")
    self.name = name
    self.text, self.vision, self.tokenizer = text_module, vision_module, tokenizer
    self.text_params = jax.device_put(text_params)
    self.vision_params = jax.device_put(vision_params)
    self.batch_size = int(batch_size)
    size = vision_module.config.image_size
    self._text_fn = jax.jit(lambda p, ids: text_module.apply({"params": p}, ids).text_embeds)
    self._image_fn = jax.jit(lambda p, x: vision_module.apply(
        {"params": p}, clip_preprocess(x, size)).image_embeds)

  @classmethod
  def from_folder(cls, folder: str | Path, *, dtype: Any = jnp.float32, batch_size: int = 16
                  ) -> "ClipTowers":
    """From a local HF `CLIPModel` folder (config.json, model.safetensors, tokenizer files)."""
    from scdpo_jax.models import clip_io, io, tokenizer

    folder = io.require_dir(folder, "reward CLIP")
    text, text_params = clip_io.load_clip_text(folder, dtype=dtype, with_projection=True)
    vision, vision_params = clip_io.load_clip_vision(folder, dtype=dtype, with_projection=True)
    tok = tokenizer.load_tokenizer(folder, max_length=text.config.max_position_embeddings)
    return cls(text, text_params, vision, vision_params, tok, batch_size=batch_size,
               name=str(folder))

  @classmethod
  def random(cls, text_config: Mapping[str, Any], vision_config: Mapping[str, Any],
             tokenizer_folder: str | Path, *, seed: int = 0, batch_size: int = 16
             ) -> "ClipTowers":
    """Tiny random towers (tests and CPU demos only: they know nothing about images) with the
    download-free byte-level tokenizer written to `tokenizer_folder`."""
    from scdpo_jax.models import clip, clip_config, layers, tokenizer

    tc = clip_config.CLIPTextConfig.from_dict(dict(text_config))
    vc = clip_config.CLIPVisionConfig.from_dict(dict(vision_config))
    text = clip.CLIPTextModel(tc, with_projection=True)
    vision = clip.CLIPVisionModel(vc, with_projection=True)
    k1, k2 = jax.random.split(jax.random.key(seed))
    folder = tokenizer.write_byte_level_tokenizer(tokenizer_folder, tc.max_position_embeddings)
    tok = tokenizer.load_tokenizer(folder, max_length=tc.max_position_embeddings)
    return cls(text, layers.init_params(text, k1), vision, layers.init_params(vision, k2), tok,
               batch_size=batch_size, name=f"random(seed={seed})")

  def _batched(self, fn, params, inputs: np.ndarray) -> np.ndarray:
    from scdpo_jax.utils import in_fixed_batches

    return _normalize(in_fixed_batches(fn, params, inputs, self.batch_size))

  def text_embeds(self, texts: Sequence[str]) -> np.ndarray:
    from scdpo_jax.models import tokenizer

    if not len(texts):
      return np.zeros((0, self.text.config.projection_dim), np.float32)
    ids = tokenizer.tokenize(self.tokenizer, list(texts), self.text.config.max_position_embeddings)
    return self._batched(self._text_fn, self.text_params, ids)

  def image_embeds(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images (B, H, W, 3) in [-1, 1], got {images.shape}")
    return self._batched(self._image_fn, self.vision_params, images)


def safety_direction(towers: ClipTowers, safe: Sequence[str], unsafe: Sequence[str]
                     ) -> np.ndarray:
  """v_safe = normalize(mean z(safe) - mean z(unsafe)); an empty list is the zero vector."""
  if not len(safe) and not len(unsafe):
    raise ValueError("steering reward: both anchor lists are empty")
  dim = towers.text.config.projection_dim
  mean = lambda texts: (towers.text_embeds(texts).mean(0) if len(texts)
                        else np.zeros((dim,), np.float32))
  return _normalize(mean(list(safe)) - mean(list(unsafe)))


class SteeringReward:
  """r = <z_img, normalize(z_text + alpha v_safe)> (module docstring)."""

  name = "steering"

  def __init__(self, towers: ClipTowers, alpha: float = 0.5,
               safe_anchors: Sequence[str] = SAFE_ANCHORS,
               unsafe_anchors: Sequence[str] = UNSAFE_ANCHORS):
    self.towers, self.alpha = towers, float(alpha)
    self.v_safe = safety_direction(towers, safe_anchors, unsafe_anchors)

  def steered_targets(self, prompts: Sequence[str]) -> np.ndarray:
    return _normalize(self.towers.text_embeds(prompts) + self.alpha * self.v_safe[None])

  def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    z_img = self.towers.image_embeds(images)
    return np.sum(z_img * self.steered_targets(prompts), axis=-1).astype(np.float32)


class ClipScoreReward:
  """r = cos(z_img, z_text(prompt))."""

  name = "clip_score"

  def __init__(self, towers: ClipTowers):
    self.towers = towers

  def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    z_img, z_txt = self.towers.image_embeds(images), self.towers.text_embeds(prompts)
    return np.sum(z_img * z_txt, axis=-1).astype(np.float32)


class CostReward:
  """r = -C(image), C the trained safety cost model (higher C = more harmful)."""

  name = "cost"

  def __init__(self, scorer):
    self.scorer = scorer

  def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    del prompts
    return -np.asarray(self.scorer(np.asarray(images, np.float32)), np.float32)


class WeightedReward:
  """r = sum_i w_i r_i over named terms [(name, weight, fn)]."""

  def __init__(self, terms: Sequence[tuple[str, float, RewardFn]]):
    if not terms:
      raise ValueError("a weighted reward needs at least one term")
    self.terms = [(str(n), float(w), fn) for n, w, fn in terms]

  def components(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Every term's (B,) values and their weighted sum under "reward"."""
    out = {name: np.asarray(fn(images, prompts), np.float32) for name, _, fn in self.terms}
    out["reward"] = sum(w * out[name] for name, w, _ in self.terms).astype(np.float32)
    return out

  def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    return self.components(images, prompts)["reward"]


def reward_from_config(reward_config, workdir: Path, seed: int = 0) -> WeightedReward:
  """The weighted reward `config.reward` describes (configs/safediffusion_r1_*.py):
  `terms` ((name, weight), ...) with names in `REWARD_NAMES`; `clip_folder` (HF CLIP folder; ""
  = `tiny_clip`, random towers for tests/demos), `steering_alpha`, `safe_anchors`,
  `unsafe_anchors`, `cost_model` (a cost_model workdir, for the "cost" term)."""
  from scdpo_jax.errors import ConfigError

  terms = [(str(n), float(w)) for n, w in reward_config.terms]
  for name, _ in terms:
    if name not in REWARD_NAMES:
      raise ConfigError(f"reward.terms: unknown reward {name!r}; known: {REWARD_NAMES}")
  towers = None
  if any(n in ("steering", "clip_score") for n, _ in terms):
    if reward_config.clip_folder:
      towers = ClipTowers.from_folder(reward_config.clip_folder,
                                      dtype=jnp.dtype(reward_config.clip_dtype),
                                      batch_size=reward_config.batch_size)
    elif reward_config.get("tiny_clip") is not None:
      t = reward_config.tiny_clip
      towers = ClipTowers.random(t.text.to_dict(), t.vision.to_dict(),
                                 Path(workdir) / "reward_tokenizer", seed=seed,
                                 batch_size=reward_config.batch_size)
    else:
      raise ConfigError("reward.clip_folder must name a local HF CLIP folder (config.json, "
                        "model.safetensors, tokenizer files) for the steering / clip_score reward")
  fns = []
  for name, weight in terms:
    if name == "steering":
      fn = SteeringReward(towers, reward_config.steering_alpha,
                          tuple(reward_config.safe_anchors), tuple(reward_config.unsafe_anchors))
    elif name == "clip_score":
      fn = ClipScoreReward(towers)
    else:
      if not reward_config.cost_model:
        raise ConfigError("reward.terms has 'cost' but reward.cost_model is empty: give a "
                          "cost_model job workdir (configs/cost_model.py)")
      from scdpo_jax.cost_model.scorer import CostModelScorer
      fn = CostReward(CostModelScorer.load(reward_config.cost_model))
    fns.append((name, weight, fn))
  return WeightedReward(fns)
