"""ShapeWorld's ground truth: renderer, exact detector, fidelity checker, reward, prompt splits."""

import dataclasses

import numpy as np

from scdpo_jax.shapeworld import world


def _rendered(n, unsafe_fraction, seed=0):
  rng = np.random.default_rng(seed)
  scenes = [world.random_scene(rng, unsafe_fraction) for _ in range(n)]
  return scenes, np.stack([world.render(s, rng) for s in scenes])


def test_detector_is_exact_on_rendered_images():
  scenes, images = _rendered(400, 0.4)
  truth = np.asarray([s.colour == "magenta" for s in scenes])
  assert truth.sum() > 100 and (~truth).sum() > 100
  np.testing.assert_array_equal(world.is_unsafe(images), truth)


def test_detector_threshold_counts_pixels():
  img = np.full((1, 16, 16, 3), 232, np.uint8)
  img[0, :1, :world.UNSAFE_MIN_PIXELS - 1] = world.UNSAFE_COLOUR[1]
  assert not world.is_unsafe(img)[0]
  img[0, 1, 0] = world.UNSAFE_COLOUR[1]
  assert world.is_unsafe(img)[0]


def test_fidelity_checker_on_rendered_images_and_wrong_prompts():
  scenes, images = _rendered(300, 0.0, seed=1)
  assert world.check_fidelity(images, scenes).mean() >= 0.97
  other_colour = [dataclasses.replace(s, colour="green" if s.colour != "green" else "red")
                  for s in scenes]
  assert world.check_fidelity(images, other_colour).mean() == 0.0
  other_shape = [dataclasses.replace(s, shape="square" if s.shape != "square" else "triangle")
                 for s in scenes]
  assert world.check_fidelity(images, other_shape).mean() <= 0.05


def test_reward_prefers_the_asked_image():
  rng = np.random.default_rng(2)
  asked = world.Scene("circle", "magenta", "large", "white")
  safe = dataclasses.replace(asked, colour="blue")
  r_asked = world.preference_reward(np.stack([world.render(asked, rng) for _ in range(20)]),
                                    [asked] * 20)
  r_safe = world.preference_reward(np.stack([world.render(safe, rng) for _ in range(20)]),
                                   [asked] * 20)
  assert r_asked.min() > r_safe.max()
  assert np.all((r_asked >= 0) & (r_asked <= 3))


def test_prompt_sets_hold_out_scenes_and_keep_rephrasings_out_of_pairs():
  sets = world.prompt_sets()
  pair_scenes = {p.scene for p in sets["train_harmful"] + sets["train_clean"]}
  eval_scenes = {p.scene for k in ("eval_harmful", "eval_adversarial", "eval_clean")
                 for p in sets[k]}
  assert not pair_scenes & eval_scenes
  assert all(p.phrase == world.PLAIN_HARMFUL and p.kind == "harmful"
             for p in sets["train_harmful"] + sets["eval_harmful"])
  assert all(p.phrase in world.REPHRASINGS and p.kind == "adversarial"
             for p in sets["eval_adversarial"])
  assert all(not p.is_harmful for p in sets["train_clean"] + sets["eval_clean"])
  for p in sets["train_harmful"] + sets["train_clean"]:
    assert not any(r in p.text for r in world.REPHRASINGS)


def test_training_captions_contain_rephrasings_and_fit_the_tokenizer():
  rng = np.random.default_rng(3)
  images, texts = world.training_batch(rng, 400, 16, unsafe_fraction=0.5, rephrase_fraction=0.5)
  assert images.shape == (400, 16, 16, 3) and images.dtype == np.uint8
  for phrase in world.REPHRASINGS + (world.PLAIN_HARMFUL,):
    assert any(phrase in t for t in texts), phrase
  assert max(len(t) for t in texts) + 2 <= 64  # BOS + chars + EOS within the text encoder
