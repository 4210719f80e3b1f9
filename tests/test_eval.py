"""Evaluation metrics, prompt CSVs, summaries and the diffusers export, on generated inputs.

CLIP score and Q16 are checked against transformers' PyTorch `CLIPModel` on a tiny random CLIP
saved in the HF layout; the cost-model metric against the project's `CostModelScorer`; NudeNet
(optional extra, skipped when not installed) against NudeNet's own file-reading path; the export
by loading it in PyTorch `StableDiffusionPipeline` and generating an image.
"""

import base64
import csv
import pickle
import sys

import numpy as np
import pytest
import diffusers
import torch
import transformers
import jax
import jax.numpy as jnp

from scdpo_jax.evaluation import export, job, metrics, prompts as prompts_lib
from scdpo_jax.models import pipeline, tokenizer
from tests.torch_refs import nchw_to_nhwc, nhwc_to_nchw, to_numpy


def _images(seed, n, h, w):
  """Generated test images: smooth random colour fields plus a bright rectangle, uint8 RGB."""
  rng = np.random.default_rng(seed)
  base = rng.uniform(0, 255, (n, 1, 1, 3)) + np.cumsum(rng.normal(0, 6, (n, h, w, 3)), axis=1)
  images = np.clip(base, 0, 255)
  for i in range(n):
    top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
    images[i, top:top + h // 3, left:left + w // 3] = rng.uniform(150, 255, 3)
  return images.astype(np.uint8)


# ----------------------------------------------------------------------------- CLIP / Q16


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  """A tiny random transformers CLIPModel saved as a HF folder (+ byte-level tokenizer and a
  PIL image-processor config), and the torch model itself."""
  folder = tmp_path_factory.mktemp("clip")
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=32, bos_token_id=512,
                       eos_token_id=513, pad_token_id=513),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8),
      projection_dim=16)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(folder)
  tokenizer.write_byte_level_tokenizer(folder, 32)
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                 crop_size={"height": 32, "width": 32})
  processor.save_pretrained(folder)
  embedder = metrics.ClipEmbedder(folder, batch_size=4)
  return folder, model, processor, embedder


def _torch_image_embeds(model, processor, images):
  pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    e = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
  e = to_numpy(e)
  return e / np.linalg.norm(e, axis=-1, keepdims=True)


def test_clip_preprocess_matches_transformers_pil_processor(tiny_clip):
  _, _, processor, _ = tiny_clip
  for h, w in [(48, 40), (16, 16), (40, 64)]:
    images = _images(h, 3, h, w)
    ours = metrics.clip_preprocess(images, 32, (32, 32))
    ref = processor(images=list(images), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, nchw_to_nhwc(ref), atol=1e-5, rtol=0)


def test_clip_score_matches_transformers(tiny_clip):
  folder, model, processor, embedder = tiny_clip
  images = _images(1, 5, 48, 40)
  prompts = ["a red square", "a photo of a cat", "x", "two blue circles on grass", ""]
  values = metrics.ClipScoreMetric(folder, embedder).score(images, prompts)
  ids = tokenizer.tokenize(embedder.tokenizer, prompts, 32)
  with torch.no_grad():
    t = to_numpy(model.text_projection(model.text_model(
        input_ids=torch.from_numpy(ids).long()).pooler_output))
  t = t / np.linalg.norm(t, axis=-1, keepdims=True)
  cos = np.sum(_torch_image_embeds(model, processor, images) * t, axis=-1)
  expected = 100 * np.maximum(cos, 0)
  assert np.any(cos > 0) and np.any(cos < 0)  # both sides of torchmetrics' clamp are exercised
  np.testing.assert_allclose([v["clip_score"] for v in values], expected, atol=1e-3)
  summary = metrics.ClipScoreMetric(folder, embedder).summarize(values)
  assert summary["clip_score"] == pytest.approx(expected.mean(), abs=1e-3)


def test_q16_matches_reference_and_reads_q16_pickles(tiny_clip, tmp_path):
  folder, model, processor, embedder = tiny_clip
  images = _images(2, 6, 32, 48)
  reference = _torch_image_embeds(model, processor, images)
  # prompt 0 ("appropriate") = image 0's embedding, prompt 1 = image 1's: both labels occur
  prompt_embeds = np.stack([reference[0], reference[1]]).astype(np.float32) * 3.0
  pickled = tmp_path / "prompts.p"
  pickled.write_bytes(pickle.dumps(prompt_embeds))  # Q16's format: a pickled numpy array
  np.save(tmp_path / "prompts.npy", prompt_embeds)
  logits = 100 * reference @ (prompt_embeds / np.linalg.norm(prompt_embeds, axis=-1,
                                                             keepdims=True)).T
  expected_labels = logits.argmax(-1) == 1
  p = np.exp(logits - logits.max(-1, keepdims=True))
  expected_p = (p / p.sum(-1, keepdims=True))[:, 1]
  assert expected_labels[1] and not expected_labels[0]
  for path in (pickled, tmp_path / "prompts.npy"):
    q16 = metrics.Q16Metric(folder, path, embedder)
    values = q16.score(images, [""] * 6)
    assert [v["inappropriate"] for v in values] == expected_labels.tolist()
    np.testing.assert_allclose([v["p_inappropriate"] for v in values], expected_p, atol=2e-3)
    assert q16.summarize(values)["q16_rate"] == pytest.approx(expected_labels.mean())


class _Exploit:
  def __reduce__(self):
    return (print, ("this must never run",))


def test_q16_prompt_file_errors_are_explicit(tiny_clip, tmp_path):
  folder, _, _, embedder = tiny_clip
  (tmp_path / "evil.p").write_bytes(pickle.dumps(_Exploit()))
  with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.print"):
    metrics.load_q16_prompts(tmp_path / "evil.p")
  with pytest.raises(metrics.MetricUnavailable, match=r"q16: needs .* at .*missing\.p"):
    metrics.load_q16_prompts(tmp_path / "missing.p")
  np.save(tmp_path / "three.npy", np.zeros((3, 16), np.float32))
  with pytest.raises(metrics.MetricUnavailable, match=r"shape \(3, 16\)"):
    metrics.load_q16_prompts(tmp_path / "three.npy")
  np.save(tmp_path / "wide.npy", np.ones((2, 768), np.float32))
  with pytest.raises(metrics.MetricUnavailable, match="size 768 but the CLIP .* projects to 16"):
    metrics.Q16Metric(folder, tmp_path / "wide.npy", embedder)


def test_missing_clip_files_name_the_path(tiny_clip, tmp_path):
  folder, _, _, _ = tiny_clip
  with pytest.raises(metrics.MetricUnavailable,
                     match=r"clip_score: needs the HF CLIP folder .*nope"):
    metrics.ClipScoreMetric(tmp_path / "nope")
  partial = tmp_path / "partial"
  partial.mkdir()
  (partial / "config.json").write_text((folder / "config.json").read_text())
  with pytest.raises(metrics.MetricUnavailable,
                     match=r"needs CLIP weights .*partial/model\.safetensors"):
    metrics.ClipScoreMetric(partial)
  with pytest.raises(metrics.MetricUnavailable, match="--config.metrics.clip.folder"):
    metrics.ClipScoreMetric("")


# ----------------------------------------------------------------------------- cost model


def test_cost_model_metric_with_the_project_scorer():
  from scdpo_jax.cost_model import CostModelScorer
  from scdpo_jax.cost_model.model import CostAdapter, random_vision_tower

  vision, vision_params = random_vision_tower(dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
      image_size=32, patch_size=8, projection_dim=16), seed=1)
  adapter = CostAdapter(hidden_dim=8)
  adapter_params = jax.jit(adapter.init)(jax.random.key(0), jnp.zeros((1, 16)))["params"]
  scorer = CostModelScorer(vision, vision_params, adapter, adapter_params, batch_size=4)
  images = _images(3, 6, 40, 40)
  expected = scorer(images.astype(np.float32) / 127.5 - 1.0)
  threshold = float(np.median(expected))  # half the images above it
  metric = metrics.CostModelMetric(scorer, threshold, identity="random")
  values = metric.score(images, [""] * 6)
  np.testing.assert_allclose([v["cost"] for v in values], expected, rtol=1e-6, atol=1e-6)
  assert [v["inappropriate"] for v in values] == (expected > threshold).tolist()
  summary = metric.summarize(values)
  assert summary["cost_inappropriate_rate"] == pytest.approx(np.mean(expected > threshold))
  assert summary["cost_mean"] == pytest.approx(np.mean(expected), rel=1e-6)
  assert metrics.CostModelMetric(scorer).threshold == scorer.threshold  # the model's own


def test_cost_model_unavailable_names_the_workdir(tmp_path):
  from configs import eval_i2p

  config = eval_i2p.get_config()
  config.metrics.names = ("cost_model",)
  built, unavailable = job.build_metrics(config)  # plus what the default protocol reads
  assert not any(isinstance(m, metrics.CostModelMetric) for m in built)
  assert "--config.metrics.cost_model.workdir" in unavailable["cost_model"]
  config.metrics.cost_model.workdir = str(tmp_path)
  _, unavailable = job.build_metrics(config)
  assert f"needs {tmp_path}/cost_model.json" in unavailable["cost_model"]


# ----------------------------------------------------------------------------- NudeNet


class _FakeDetector:
  def __init__(self, per_image):
    self.per_image, self.calls = list(per_image), 0

  def detect(self, image):
    assert image.dtype == np.uint8 and image.ndim == 3
    out = self.per_image[self.calls]
    self.calls += 1
    return out


def _det(name, score):
  return {"class": name, "score": score, "box": [1, 2, 3, 4]}


def test_nudenet_rates_and_counts():
  detector = _FakeDetector([
      [_det("FEMALE_BREAST_EXPOSED", 0.9), _det("FEMALE_BREAST_EXPOSED", 0.7),
       _det("FACE_FEMALE", 0.95)],                        # strict (and broad)
      [_det("FEET_EXPOSED", 0.8), _det("BUTTOCKS_EXPOSED", 0.6)],  # broad only (0.6 is not > 0.6)
      [_det("ANUS_EXPOSED", 0.59), _det("BELLY_COVERED", 0.99)],   # nothing
      [],
  ])
  metric = metrics.NudeNetMetric(threshold=0.6, detector=detector)
  values = metric.score(_images(4, 4, 24, 24), [""] * 4)
  assert [v["broad"] for v in values] == [True, True, False, False]
  assert [v["strict"] for v in values] == [True, False, False, False]
  assert [d["class"] for d in values[0]["detections"]] == ["FEMALE_BREAST_EXPOSED"] * 2 + [
      "FACE_FEMALE"]
  summary = metric.summarize(values)
  assert summary["nudenet_broad_rate"] == 0.5 and summary["nudenet_strict_rate"] == 0.25
  assert summary["nudenet_exposed_detections"] == 3
  assert summary["nudenet_count/FEMALE_BREAST_EXPOSED"] == 2
  assert summary["nudenet_count/FEET_EXPOSED"] == 1
  assert summary["nudenet_count/BUTTOCKS_EXPOSED"] == 0


def test_nudenet_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "nudenet", None)  # makes `import nudenet` fail
  with pytest.raises(metrics.MetricUnavailable, match="requirements-eval.txt"):
    metrics.NudeNetMetric()


# A 20x20 RGB image found by hill-climbing the bundled 320n detector's FACE_FEMALE score (seed 0,
# bicubic upscale to 320x320): a real detection (0.71 > 0.6) on a generated input. No exposed
# class could be reached this way, so the flags are covered by the fake-detector test above.
_FACE_20X20_B64 = (
    "/5rsAP8UAApiQSj6ACOFQYEp/6RE2vUHuhSfRLz34Unedu59pUom57LsFW00C0PAOqbjELbwwoKRHC8a8rjAJrcAe2"
    "ojAFsUAGa4AEDM/w19PdM97LI4AGIAjc3EVv8QKJv0+BKmtx5mrgVnI7SrZslodD33b9NpAFmB+/Uq2gCEAMLFtzrz"
    "3fjy/1aZbaKDi95ndnGQ6p+oFpGym8RBSv+arzG2fhqBACYArgDbpddAwUSl/2ps/4AvDHDh7JV4/wDI2gEEHf8n/0"
    "vLovAg/0liXn5Q/17KAIPtOwCZ/1O1smg1BTlSAC7S0hMQlDs8LeMsvIBoACirFqFaS9EAGAAEsBS4cSVZov8AwI+m"
    "hkqx+LK2AP+RAE174M2j1Hy+QDxX1UYMaRNkM9McAABsYgAQo3H/a3B/MYjn32tEOzpoF7H/SctczsKNEQA/3a4hcf"
    "MJhcxh4uugAAAAmf9G85hNGOSA9vTiidz4LSY4HPg7paaKvCLlAvudM/OXAP9kOw+pACvTev8MALLyc3/fvY+0mkPQ"
    "tpopnOrv0mR5fgD3AH6AYgD/Me4k0uiJWABnxf+v/33/hzOu6Sfj5z2ofxwG0pPUP2bc6iIPwtAJpZuJnpUp/09Z/w"
    "619kKMZP3aQG1RrZGijW4a2BkuKP3/p9g42e4AauAIIjivBgr9MpyD/+tAuptp5a+04w7g//0kOUyaEYe5iwHxBWc7"
    "Akyy/5NwLv+aoTL4DupnAHbPwUeTgTPnj4K4ghi6H8f/Jm5l1sf+GdGpL2QS9SFifJOmH+bKFI8sf/rkY1J/hFQT5I"
    "WBb5SrWRf/dmAApfGeMxIW///ChAZIAFMg20tShQPmcgE4Unvj4z8qS2qZehYe/8XSPebjHP/3Bv9I5AvLACk/MWVA"
    "Rrs8GR9t7jV1/N7+PTwBzmP/dWULoLb8FnptdDX/bbjl8457b1kkKZAAYADBcSX/n4n4tP/cNhIQl1IHXW+3/2UMQ6"
    "mkhLzc+P/mRGUAPmojcvLj/4lIkXMxOJSL//+C/wf/hAD//91D2nefydX/aa7IGZUhGLqMQ9ULhuzQoYmrOUMRALgL"
    "E98Aqir//5fMQGST1mPZ5pXNX+8G/4SWJaQeSwCccf/KiTJ0AHR4N6dLTvkzoWUfmgC2Usfx/wAVAP+ivkzQH6wAA8"
    "sYvP88EGVf/3tUrNcAp9dLcUsAYp9Xsv8An3pSVm+EJun/Uf/5ADhNYL4AtSwiACg3/1D/WbvmIy9Nst88ABkASgDh"
    "WYIVADLZYgTwxSkA0u5DvbgU13kx11YlBP9Eyu5klYVrjrJwbf9r5ije/98ftlUB/6MA1rthQqguYIA43AA6//8AXK"
    "4I5z4PyEjFWHdGeIrh6pYxx4rAXScA1QUFgU3/byL/TACKMWqzDMX9/2cIN/8du8PcAKt82/80diD1Y0ORhF73FyCD"
    "1XJTWKesCykfXDuVXtpW7JC2nUPLQVVELHbAQgCLLsAMr15m2+b1//5GmsL/CMkmrAD/wgU00DA01QA4bFP//zE8Vd"
    "iHg9KwYAL/9GGjnopsAp4A/x//OP7/Ec+JZe60MBT/ctb4iTfrnYAGAHyTAEtMetw909BC"
)


def test_nudenet_real_detector_on_generated_images(tmp_path):
  pytest.importorskip("nudenet")
  import cv2
  from nudenet import NudeDetector
  from nudenet.nudenet import _read_image

  from PIL import Image

  face = np.frombuffer(base64.b64decode("".join(_FACE_20X20_B64)), np.uint8).reshape(20, 20, 3)
  face = cv2.resize(face, (320, 320), interpolation=cv2.INTER_CUBIC)
  images = np.concatenate([face[None], _images(5, 2, 320, 320)])
  metric = metrics.NudeNetMetric(threshold=0.6)
  values = metric.score(images, [""] * 3)
  detector = NudeDetector()
  for image, value, i in zip(images, values, range(3)):
    path = tmp_path / f"{i}.png"
    Image.fromarray(image).save(path)
    # the array we pass is exactly what NudeNet builds when reading the PNG itself
    np.testing.assert_array_equal(_read_image(np.ascontiguousarray(image[..., ::-1]))[0],
                                  _read_image(str(path))[0])
    from_file = [d for d in detector.detect(str(path)) if d["score"] > 0.6]
    assert [(d["class"], round(d["score"], 4)) for d in value["detections"]] == [
        (d["class"], round(d["score"], 4)) for d in from_file]
  assert [d["class"] for d in values[0]["detections"]] == ["FACE_FEMALE"]
  assert not values[0]["broad"] and not values[0]["strict"]  # faces are not exposed classes


# ----------------------------------------------------------------------------- prompt CSVs


def _write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return path


def test_read_i2p_layout(tmp_path):
  path = _write_csv(tmp_path / "i2p.csv", [
      "prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage",
      "q16_percentage", "sd_safety_percentage", "prompt_toxicity", "lexica_url", "sd_seed",
      "sd_guidance_scale", "sd_image_width", "sd_image_height", "sd_model"], [
      ["a, b", "sexual, shocking", 1, 90, 80, 70, 60, 0.1, "u", 2734971755, 7, 512, 512, "1.5"],
      ["calm lake", "", 0, 0, 0, 0, 0, 0.0, "u", "", "", 512, 512, "1.5"],
      ["fight", "violence", 0, 10, 0, 10, 0, 0.2, "u", 5 + 2 ** 32, 12.5, 512, 512, "1.5"]])
  records = prompts_lib.read_prompt_csv(path, default_seed=42, default_guidance_scale=7.5)
  assert [r.prompt for r in records] == ["a, b", "calm lake", "fight"]
  assert [r.seed for r in records] == [2734971755, 42, 5]  # mod 2**32
  assert [r.guidance_scale for r in records] == [7.0, 7.5, 12.5]
  assert records[0].categories == ("sexual", "shocking") and records[1].categories == ()
  assert [r.index for r in prompts_lib.read_prompt_csv(path, start=1, limit=1)] == [1]
  assert [r.index for r in prompts_lib.read_prompt_csv(path, categories=["Violence"])] == [2]


def test_read_adversarial_layouts(tmp_path):
  mma = _write_csv(tmp_path / "mma.csv", ["adv_prompt", "clean_prompt"], [["x1", "c1"]])
  (record,) = prompts_lib.read_prompt_csv(mma, default_seed=7, default_guidance_scale=6.0)
  assert (record.prompt, record.seed, record.guidance_scale) == ("x1", 7, 6.0)
  unlearn = _write_csv(tmp_path / "u.csv", ["case_number", "prompt", "evaluation_seed",
                                            "evaluation_guidance"], [[0, "p", 123, 7.5]])
  (record,) = prompts_lib.read_prompt_csv(unlearn)
  assert (record.prompt, record.seed, record.guidance_scale) == ("p", 123, 7.5)
  with pytest.raises(ValueError, match="found no prompt column"):
    prompts_lib.read_prompt_csv(_write_csv(tmp_path / "bad.csv", ["foo"], [["x"]]))
  with pytest.raises(ValueError, match="no prompt column 'text_col'"):
    prompts_lib.read_prompt_csv(mma, prompt_column="text_col")


# ----------------------------------------------------------------------------- summaries


def _record(prompt_index, categories, q16, nude_strict, nude_broad):
  return {"prompt_index": prompt_index, "categories": categories, "metrics": {
      "q16": {"inappropriate": q16, "p_inappropriate": float(q16)},
      "nudenet": {"detections": [], "strict": nude_strict, "broad": nude_broad}}}


def test_summary_ip_rule_and_categories():
  records = [_record(0, ["sexual"], False, True, True),
             _record(0, ["sexual"], False, False, True),
             _record(1, ["sexual", "hate"], True, False, False), _record(2, [], False, False, False)]
  q16 = metrics.Q16Metric.__new__(metrics.Q16Metric)
  nude = metrics.NudeNetMetric(detector=_FakeDetector([]))
  groups = job.subsets(records)
  assert list(groups) == ["all", "category/hate", "category/sexual"]
  row = job.summarize(groups["all"], [q16, nude], "strict")
  assert row["ip_q16"] == 0.25 and row["ip_q16_or_nudenet"] == 0.5
  assert row["n_images"] == 4 and row["n_prompts"] == 3
  assert job.summarize(groups["all"], [q16, nude], "broad")["ip_q16_or_nudenet"] == 0.75
  sexual = job.summarize(groups["category/sexual"], [q16, nude], "strict")
  assert sexual["n_images"] == 3 and sexual["ip_q16_or_nudenet"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
  from configs.default import tiny_pipeline_config

  tiny = tiny_pipeline_config()
  root = tmp_path_factory.mktemp("base")
  tok = tokenizer.write_byte_level_tokenizer(root / "tok",
                                             tiny.text_encoder.max_position_embeddings)
  sd = pipeline.random_stable_diffusion(tiny.unet.to_dict(), tiny.vae.to_dict(),
                                        tiny.text_encoder.to_dict(), tiny.scheduler.to_dict(), tok)
  return pipeline.save_stable_diffusion(root / "sd", sd), sd


def test_export_loads_in_pytorch_and_generates(tiny_base, tmp_path):
  base, sd = tiny_base
  # "trained" parameters: the base's, shifted, and boxed/on device as a trainer holds them
  trained = jax.tree.map(lambda x: jnp.asarray(x) + 0.01, sd.unet_params)
  out = export.export_pipeline(base, {"params": trained}, tmp_path / "export")
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    image = pipe("a red cat", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
  assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
  np.testing.assert_allclose(to_numpy(pipe.unet.conv_in.bias),
                             np.asarray(trained["conv_in"]["bias"]), rtol=0, atol=0)
  x = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
  states = np.random.default_rng(1).standard_normal((1, 5, 32)).astype(np.float32)
  with torch.no_grad():
    ref = pipe.unet(torch.from_numpy(nhwc_to_nchw(x)), 500,
                    encoder_hidden_states=torch.from_numpy(states)).sample
  ours = jax.jit(sd.unet.apply)({"params": trained}, x, jnp.array([500]), states)
  np.testing.assert_allclose(np.asarray(ours), nchw_to_nhwc(to_numpy(ref)), atol=1e-4, rtol=0)
  reloaded = pipeline.load_stable_diffusion(out)
  np.testing.assert_array_equal(reloaded.vae_params["decoder"]["conv_out"]["kernel"],
                                np.asarray(sd.vae_params["decoder"]["conv_out"]["kernel"]))
  base_files = sorted(p.name for p in (base / "tokenizer").iterdir())
  assert base_files and base_files == sorted(p.name for p in (out / "tokenizer").iterdir())
  for name in base_files:  # the base's tokenizer files, byte for byte
    assert (out / "tokenizer" / name).read_bytes() == (base / "tokenizer" / name).read_bytes()


def test_export_rejects_foreign_parameters(tiny_base, tmp_path):
  base, sd = tiny_base
  broken = jax.tree.map(lambda x: x, sd.unet_params)
  broken["conv_in"] = {"kernel": np.zeros((3, 3, 4, 7), np.float32),
                       "bias": np.asarray(sd.unet_params["conv_in"]["bias"])}
  del broken["conv_out"]
  with pytest.raises(ValueError, match=(r"2 missing, 0 unexpected, 1 wrong shape.*conv_out"
                                        r".*conv_in.*expected \(3, 3, 4, 32\)")):
    export.export_pipeline(base, broken, tmp_path / "x")
  with pytest.raises(ValueError, match="overwrite the base"):
    export.export_pipeline(base, sd.unet_params, base)
