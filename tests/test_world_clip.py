"""The world CLIP (scdpo_jax/shapeworld/world_clip.py) and the `safediffusion_r1` job on a
pixel-space (no VAE) ShapeWorld-shaped pipeline with the world CLIP's steering reward.

One short training of the world CLIP is shared by the module (`world_clip`); its saved
CLIPModel folder is checked against transformers (<= 1e-4, fp32 CPU, as tests/test_clip.py),
its held-out retrieval against chance, its steering reward on rendered safe vs unsafe images,
and it is the reward of a two-epoch GRPO run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from scdpo_jax.data.images import to_model_range
from scdpo_jax.grpo import rewards
from scdpo_jax.shapeworld import world, world_clip

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-4
# Measured (README, SafeDiffusion-R1): after this short training retrieval top-1 is 0.21
# among 136 captions (chance 0.0074); the bound halves it and is still 13x chance.
RETRIEVAL_MIN = 0.10
ALPHA = 2.0  # the steering alpha of these tests (README: 0.5 prefers the unsafe render here)
EMBED_BATCH = 64  # every embedding program of the module has this batch (one compile each)


@pytest.fixture(scope="module")
def world_clip_run(tmp_path_factory):
  config = world_clip.default_config()
  config.train.update(dict(num_steps=80, lr=3e-3, warmup_steps=10))
  config.eval.update(dict(images_per_scene=1, steering_alpha=ALPHA, alpha_sweep=(),
                          batch_size=EMBED_BATCH))
  folder = tmp_path_factory.mktemp("world_clip") / "clip"
  metrics = world_clip.train_world_clip(config, folder)
  print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
  return folder, metrics


def test_anchors_plain_phrases_only():
  safe, unsafe = world_clip.steering_anchors()
  held_out = [p for c in world.CATEGORIES.values() for p in c.rephrasings]
  for text in safe + unsafe:
    assert not any(p in text for p in held_out), text
  for category, bad, good in world_clip.anchor_scenes():
    assert bad.category() == category and good.category() is None
  assert len(safe) == len(unsafe) == 3 * len(world.CATEGORIES)
  assert world_clip.steering_anchors(("ring",))[1] == tuple(
      t for t in unsafe if " ring " in t)


def test_saved_folder_is_a_transformers_clipmodel(world_clip_run):
  import torch
  import transformers

  from scdpo_jax.cost_model.model import clip_preprocess
  from scdpo_jax.models import clip_io, tokenizer

  folder, metrics = world_clip_run
  hf = transformers.CLIPModel.from_pretrained(str(folder)).eval()
  hf_tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
  towers = rewards.ClipTowers.from_folder(folder, batch_size=EMBED_BATCH)
  captions = ["a small magenta circle on a white background", "a hoop on zebra",
              "large blue square, gray background", ""]
  n = towers.text.config.max_position_embeddings
  ids = tokenizer.tokenize(towers.tokenizer, captions, n)
  np.testing.assert_array_equal(ids, hf_tok(captions, padding="max_length", max_length=n,
                                            return_tensors="np")["input_ids"])
  assert hf_tok.tokenize("a hoop on zebra") == ["a</w>", "hoop</w>", "on</w>", "zebra</w>"]
  rng = np.random.default_rng(5)
  images = to_model_range(np.stack([world.render(world.random_scene(rng, 0.5), rng)
                                    for _ in range(6)]))
  pixels = np.asarray(clip_preprocess(images, 16)).transpose(0, 3, 1, 2)
  with torch.no_grad():
    input_ids, pixel_values = torch.as_tensor(ids, dtype=torch.long), torch.tensor(pixels)
    out = hf(input_ids=input_ids, pixel_values=pixel_values)  # normalised embeds
    # the raw projections, from the submodules (transformers 5's CLIPModel.forward overwrites
    # the towers' pooler_output with the projection)
    hf_text = hf.text_projection(hf.text_model(input_ids=input_ids).pooler_output).numpy()
    hf_image = hf.visual_projection(
        hf.vision_model(pixel_values=pixel_values).pooler_output).numpy()
  text, text_params = clip_io.load_clip_text(folder)
  vision, vision_params = clip_io.load_clip_vision(folder)
  ours_text = np.asarray(text.apply({"params": text_params}, ids).text_embeds)
  ours_image = np.asarray(vision.apply({"params": vision_params}, pixels.transpose(0, 2, 3, 1))
                          .image_embeds)
  assert np.abs(hf_text).max() > 0.1 and np.abs(hf_image).max() > 0.1
  np.testing.assert_allclose(ours_text, hf_text, atol=ATOL, rtol=0)
  np.testing.assert_allclose(ours_image, hf_image, atol=ATOL, rtol=0)
  np.testing.assert_allclose(towers.text_embeds(captions), out.text_embeds.numpy(), atol=ATOL)
  np.testing.assert_allclose(towers.image_embeds(images), out.image_embeds.numpy(), atol=ATOL)
  assert float(hf.logit_scale.detach().exp()) == pytest.approx(metrics["logit_scale"], rel=1e-5)
  assert hf.config.projection_dim == text.config.projection_dim == 64


def test_retrieval_above_chance(world_clip_run):
  _, m = world_clip_run
  assert m["num_scenes"] == 136 and m["retrieval_chance"] == pytest.approx(1 / 136)
  assert m["retrieval_top1"] >= RETRIEVAL_MIN
  assert math.isfinite(m["final_loss"]) and m["final_loss"] < m["loss_first"]


def test_steering_reward_prefers_safe_renders(world_clip_run, tmp_path):
  """The job's reward (reward_from_config on the saved folder, world anchors): for the held-out
  harmful prompts, a render of the safe paraphrase scores above a render of the asked (unsafe)
  scene on average."""
  sys.path.insert(0, str(ROOT))
  from configs import safediffusion_r1_sd15

  folder, _ = world_clip_run
  rc = safediffusion_r1_sd15.get_config().reward
  rc.clip_folder = str(folder)
  rc.safe_anchors, rc.unsafe_anchors = world_clip.steering_anchors()
  rc.steering_alpha, rc.batch_size = ALPHA, EMBED_BATCH
  reward = rewards.reward_from_config(rc, tmp_path)
  rng = np.random.default_rng(11)
  prompts = world.prompt_sets()["test_harmful"] * 2
  safe = [world.safe_paraphrase(p, rng) for p in prompts]
  render = lambda scenes: to_model_range(np.stack([world.render(s, rng) for s in scenes]))
  texts = [p.text for p in prompts]
  r_unsafe = reward(render([p.scene for p in prompts]), texts)
  r_safe = reward(render([p.scene for p in safe]), texts)
  print(f"steering alpha {ALPHA}: safe {r_safe.mean():.3f} vs unsafe {r_unsafe.mean():.3f}, "
        f"safe wins {np.mean(r_safe > r_unsafe):.2f} of {len(prompts)}")
  assert r_safe.mean() > r_unsafe.mean()


# ------------------------------------------------------------------------------ the job

PIXEL_UNET = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32,),
                  layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                  down_block_types=("CrossAttnDownBlock2D",),
                  up_block_types=("CrossAttnUpBlock2D",))
PIXEL_TEXT = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, max_position_embeddings=64, hidden_act="quick_gelu",
                  bos_token_id=512, eos_token_id=513, pad_token_id=513)
SHAPEWORLD_SCHEDULER = dict(  # configs/shapeworld.py
    _class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
    beta_schedule="linear", prediction_type="v_prediction", clip_sample=True,
    set_alpha_to_one=False, steps_offset=0, timestep_spacing="trailing")


def _host_params(module, seed: int):
  """Random params on the host from the module's abstract shapes: no init program to compile
  (norm scales 1, biases 0, the rest N(0, 0.05^2))."""
  from flax.core import meta

  from scdpo_jax.models import layers

  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    name = path[-1].key
    if name in ("scale", "bias"):
      return np.full(shape.shape, 1.0 if name == "scale" else 0.0, np.float32)
    return (0.05 * rng.standard_normal(shape.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, meta.unbox(layers.abstract_params(module)))


def _pixel_base(folder: Path) -> Path:
  """A random ShapeWorld-shaped pixel-space pipeline (no vae/), as shapeworld/pretrain writes."""
  from scdpo_jax.models import clip, clip_config, pipeline, tokenizer, unet, unet_config

  tok = tokenizer.write_byte_level_tokenizer(folder.parent / "base_tokenizer", 64)
  sd = pipeline.StableDiffusion(scheduler_config=dict(SHAPEWORLD_SCHEDULER))
  sd.unet = unet.UNet2DConditionModel(unet_config.UNetConfig.from_dict(PIXEL_UNET))
  sd.text_encoder = clip.CLIPTextModel(clip_config.CLIPTextConfig.from_dict(PIXEL_TEXT))
  sd.unet_params, sd.text_encoder_params = _host_params(sd.unet, 0), _host_params(
      sd.text_encoder, 1)
  pipeline.save_stable_diffusion(folder, sd, tokenizer_folder=tok)
  assert not (folder / "vae").exists()
  return folder


def _job_config(base: Path, clip_folder: Path):
  sys.path.insert(0, str(ROOT))
  from configs import safediffusion_r1_tiny

  config = safediffusion_r1_tiny.get_config()
  config.model.pretrained = str(base)
  config.model.tiny = None
  config.data.prompts = (("a small magenta circle on a white background", "harmful"),
                         ("a large green ring on a gray background", "harmful"),
                         ("a small blue square on a white background", "clean"),
                         ("a large yellow triangle on a black background", "clean"))
  config.sample.update(dict(num_steps=4, group_size=2, prompts_per_epoch=2, batch_size=4,
                            guidance_scale=3.0))
  config.train.update(dict(num_epochs=2, samples_per_step=2, export_at_end=True))
  config.reward.update(dict(clip_folder=str(clip_folder), steering_alpha=ALPHA,
                            batch_size=EMBED_BATCH))
  config.reward.tiny_clip = None
  config.reward.safe_anchors, config.reward.unsafe_anchors = world_clip.steering_anchors()
  config.checkpoint.update(dict(every_epochs=1, async_save=False))
  config.log.tensorboard = False
  config.optimizer.update(dict(lr=1e-3, eps=1e-3))
  return config


def test_job_pixel_space_end_to_end(world_clip_run, tmp_path, monkeypatch):
  """Two epochs of GRPO on a pixel-space v-prediction pipeline with the world CLIP reward: the
  reward sees (B, 16, 16, 3) images in [-1, 1] (the final samples), updates move the UNet."""
  from scdpo_jax import jobs

  seen = []
  build = rewards.reward_from_config

  def spy(*args, **kwargs):
    reward = build(*args, **kwargs)
    components = reward.components

    def record(images, prompts):
      seen.append(np.asarray(images))
      return components(images, prompts)
    reward.components = record
    return reward

  monkeypatch.setattr(rewards, "reward_from_config", spy)
  folder, _ = world_clip_run
  base = _pixel_base(tmp_path / "base")
  result = jobs.run(_job_config(base, folder), str(tmp_path / "run"))
  assert result["end_step"] == 4 and not result["preempted"]
  assert len(seen) == 2
  for images in seen:
    assert images.shape == (4, 16, 16, 3)
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0.05
  assert not np.allclose(seen[0], seen[1])  # epoch 2 samples other images (new noise, weights)
  m = result["last_metrics"]
  for key in ("reward_mean", "reward_std", "loss", "grad_norm", "clipfrac", "approx_kl"):
    assert math.isfinite(m[key]), key
  assert -1.0 <= m["reward_mean"] <= 1.0 and m["grad_norm"] > 0
  assert all(math.isfinite(x) for x in result["losses"])
  assert (tmp_path / "run" / "export" / "unet" / "config.json").is_file()


def test_pixel_space_needs_an_rgb_unet(tmp_path):
  """A folder without vae/ is loaded as pixel space; a latent (4-channel) UNet there is refused
  (`job.check_pixel_space`, called by the job right after loading)."""
  from types import SimpleNamespace

  from scdpo_jax.errors import ConfigError
  from scdpo_jax.grpo import job

  (tmp_path / "vae").mkdir()
  assert "vae" in job.pipeline_components(tmp_path)
  assert job.pipeline_components(tmp_path / "none") == job.PIXEL_SPACE_COMPONENTS
  unet = lambda c: SimpleNamespace(config=SimpleNamespace(in_channels=c, out_channels=c))
  job.check_pixel_space(SimpleNamespace(vae=None, unet=unet(3)), tmp_path)
  job.check_pixel_space(SimpleNamespace(vae=object(), unet=unet(4)), tmp_path)
  with pytest.raises(ConfigError, match="pixel-space"):
    job.check_pixel_space(SimpleNamespace(vae=None, unet=unet(4)), tmp_path)
