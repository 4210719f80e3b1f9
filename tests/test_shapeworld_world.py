"""ShapeWorld's ground truth: renderer, the four exact detectors, fidelity checker, reward, prompt
splits."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from scdpo_jax.shapeworld import world


def _rendered(scene_fn, n, seed):
  rng = np.random.default_rng(seed)
  scenes = [scene_fn(rng) for _ in range(n)]
  return scenes, np.stack([world.render(s, rng) for s in scenes])


@pytest.mark.parametrize("category", world.ALL_CATEGORIES + (None,))
def test_each_detector_is_exact_on_rendered_images(category):
  """Every rendered scene of a category fires its detector and no other; safe scenes none."""
  make = (world.safe_scene if category is None
          else lambda rng: world.unsafe_scene(category, rng))
  scenes, images = _rendered(make, 300, seed=hash(category) % 1000)
  assert all(s.category() == category for s in scenes)
  if category is not None:  # both sizes, several colours and shapes are covered
    assert {s.size for s in scenes} == set(world.SIZES)
  for name, fired in world.detect(images).items():
    np.testing.assert_array_equal(fired, np.full(len(scenes), name == category), err_msg=name)
  assert world.is_unsafe(images).all() == (category is not None)
  assert world.is_unsafe(images).any() == (category is not None)


def test_detectors_follow_their_rules_on_hand_made_images():
  white, black = world.BACKGROUNDS["white"], world.BACKGROUNDS["black"]
  img = np.full((1, 16, 16, 3), white, np.uint8)
  img[0, :1, :world.UNSAFE_MIN_PIXELS - 1] = world.UNSAFE_COLOUR[1]
  assert not world.detect(img)["magenta"][0]
  img[0, 1, 0] = world.UNSAFE_COLOUR[1]
  assert world.detect(img)["magenta"][0]
  ring = np.full((1, 16, 16, 3), white, np.uint8)
  ring[0, 4:9, 4:9] = world.SAFE_COLOURS["blue"]
  assert not world.detect(ring)["ring"][0]
  ring[0, 6, 6] = white  # one enclosed background pixel makes a ring
  assert world.detect(ring)["ring"][0]
  stripes = np.full((1, 16, 16, 3), white, np.uint8)
  stripes[0, 2:4] = stripes[0, 6:8] = black  # 4 light/dark changes
  assert world.detect(stripes)["stripes"][0]
  stripes[0, 6:8] = white  # only 2
  assert not world.detect(stripes)["stripes"][0]
  rob = np.full((1, 16, 16, 3), black, np.uint8)
  rob[0, :2, :4] = world.SAFE_COLOURS["red"]
  assert world.detect(rob)["red_on_black"][0]
  rob[0, 8:, :] = white  # black no longer twice the white
  assert not world.detect(rob)["red_on_black"][0]
  with pytest.raises(ValueError, match="subset"):
    world.detect(img, ("magenta", "nudity"))


def test_a_world_with_fewer_categories_treats_the_others_as_safe():
  scene = world.Scene("circle", "red", "large", "black")
  assert scene.category() == "red_on_black" and scene.category(("magenta",)) is None
  assert world.caption(scene, categories=("magenta",)).kind == "clean"
  rng = np.random.default_rng(0)
  images = np.stack([world.render(scene, rng)])
  assert world.is_unsafe(images) and not world.is_unsafe(images, ("magenta", "ring"))
  assert not any(world.random_scene(rng, 0.5, ("magenta",)).shape == world.RING
                 for _ in range(200))


def test_fidelity_checker_on_rendered_images_and_wrong_prompts():
  scenes, images = _rendered(world.safe_scene, 300, seed=1)
  assert world.check_fidelity(images, scenes).mean() >= 0.97
  other_colour = [dataclasses.replace(s, colour="green" if s.colour != "green" else "blue")
                  for s in scenes]
  assert world.check_fidelity(images, other_colour).mean() == 0.0
  other_shape = [dataclasses.replace(s, shape="square" if s.shape != "square" else "triangle")
                 for s in scenes]
  assert world.check_fidelity(images, other_shape).mean() <= 0.05
  rings, ring_images = _rendered(lambda rng: world.unsafe_scene("ring", rng), 100, seed=2)
  assert world.check_fidelity(ring_images, rings).mean() >= 0.97  # a ring is its own shape
  as_circles = [dataclasses.replace(s, shape="circle") for s in rings]
  assert world.check_fidelity(ring_images, as_circles).mean() == 0.0


@pytest.mark.parametrize("category", world.ALL_CATEGORIES)
def test_reward_prefers_the_asked_image_also_for_harmful_prompts(category):
  rng = np.random.default_rng(3)
  asked = world.unsafe_scene(category, rng)
  safe = world.safe_paraphrase(world.caption(asked), rng).scene
  assert safe.category() is None
  r_asked = world.preference_reward(np.stack([world.render(asked, rng) for _ in range(20)]),
                                    [asked] * 20)
  r_safe = world.preference_reward(np.stack([world.render(safe, rng) for _ in range(20)]),
                                   [asked] * 20)
  assert r_asked.mean() > r_safe.mean() + 0.5
  assert np.all((r_asked >= 0) & (r_asked <= 3))


def test_prompt_sets_split_scenes_per_category_and_keep_rephrasings_out_of_pairs():
  sets = world.prompt_sets()
  splits = {split: {p.scene for k, v in sets.items() if k.startswith(split) for p in v}
            for split in ("pairs", "validation", "test")}
  assert not splits["pairs"] & splits["validation"]
  assert not splits["pairs"] & splits["test"]
  assert not splits["validation"] & splits["test"]
  for split in ("validation", "test"):
    for kind in ("harmful", "adversarial"):
      assert {p.category for p in sets[f"{split}_{kind}"]} == set(world.ALL_CATEGORIES)
      assert all(p.kind == kind for p in sets[f"{split}_{kind}"])
    assert all(p.kind == "clean" for p in sets[f"{split}_clean"])
  assert all(p.kind == "harmful" for p in sets["pairs_harmful"])
  rephrasings = [r for c in world.CATEGORIES.values() for r in c.rephrasings]
  for p in sets["pairs_harmful"] + sets["pairs_clean"]:
    assert not any(r in p.text for r in rephrasings), p.text
  test = {p.scene for p in sets["test_harmful"]}
  assert {p.scene for p in sets["test_adversarial"]} == test  # the same scenes, reworded
  # pair prompts and evaluation scenes stay disjoint per category, and are fixed (sha1 ranks)
  assert world.prompt_sets() == sets


def test_training_captions_contain_every_phrase_and_fit_the_tokenizer(tmp_path):
  rng = np.random.default_rng(3)
  images, texts = world.training_batch(rng, 800, 16, unsafe_fraction=0.5, rephrase_fraction=0.5)
  assert images.shape == (800, 16, 16, 3) and images.dtype == np.uint8
  for cat in world.CATEGORIES.values():
    for phrase in (cat.plain,) + cat.rephrasings:
      assert any(phrase in t for t in texts), phrase
  from configs import shapeworld
  from scdpo_jax.models import tokenizer
  from scdpo_jax.shapeworld import pretrain

  config = shapeworld.get_config()
  tok = tokenizer.load_tokenizer(pretrain.write_tokenizer(config, Path(tmp_path)))
  max_len = config.model.text_encoder.max_position_embeddings
  sets = world.prompt_sets()
  every = texts + [p.text for v in sets.values() for p in v]
  # BOS + tokens + EOS within the text encoder; every world word is one whole-word token
  assert max(len(tok(t)["input_ids"]) for t in every) <= max_len
  assert max(max(tok(t)["input_ids"]) for t in every) < config.model.text_encoder.vocab_size
  words = {w for t in every for w in re.findall(r"[a-z]+", t)}
  assert words == set(world.vocabulary())
  for w in words:
    assert tok.tokenize(w) == [w + "</w>"], w
  assert tok.tokenize("a squares") == ["a</w>"] + tok.tokenize("squares")  # others: characters
  assert len(tok.tokenize("squares")) > 1


def test_word_merges_build_every_word_whatever_their_overlaps():
  """Words that share prefixes and pairs (the failure mode of naive per-word merge chains: an
  earlier word's merge breaking a later word's chain) each become one token, in both of
  transformers' CLIP tokenizers."""
  import tempfile

  from transformers import CLIPTokenizerFast

  from scdpo_jax.models import tokenizer

  words = ["magenta", "small", "smalls", "mall", "all", "ma", "sm", "a", "triangle", "ring", "in"]
  folder = tokenizer.write_byte_level_tokenizer(tempfile.mkdtemp(), 16, words=words)
  slow, fast = tokenizer.load_tokenizer(folder), CLIPTokenizerFast.from_pretrained(str(folder))
  for w in words:
    assert slow.tokenize(w) == [w + "</w>"], w
    assert slow(w)["input_ids"] == fast(w)["input_ids"], w
  text = "a small magenta triangle in a ring"
  assert slow(text)["input_ids"] == fast(text)["input_ids"] and len(slow(text)["input_ids"]) == 9
