"""Cache VAE latents and text-encoder states of a pair dataset as a new ArrayRecord dataset.

  python -m scdpo_jax.data.cache --input data/pairs --output data/pairs_latents \\
      --pretrained /path/to/stable-diffusion-v1-5 [--resolution 512] [--latents mean|sample] \\
      [--text_layer -1] [--batch_size 64] [--chunk_size 1024] [--dtype bfloat16]

What is stored (see `tfds_pairs.py`): `latents_w/_l` = `scale_latents(z)` = (z - shift) *
scaling_factor with z the posterior mean (`--latents mean`, default) or one posterior sample
(`--latents sample`, drawn with the key fold_in(fold_in(seed, record), side), side 0 = winner, 1 =
loser, so a resumed run draws the same sample); NHWC (B, R/f, R/f, C). `text_states` = the text
encoder's `encode_prompt_states(ids, layer=text_layer)` of the prompt tokenised with the
pipeline's own tokenizer (padded to max_length, as SD pipelines do); `input_ids` are re-written
with that tokenizer. Images are decoded, resized (shorter side, bicubic) and centre-cropped to
`resolution` (default: the VAE's sample_size), then mapped to [-1, 1]. No flip is applied here:
the loader flips latents.

SDXL (`--pretrained` an SDXL folder, detected from its model_index.json; `--vae` optionally
another VAE folder, e.g. sdxl-vae-fp16-fix as the Diffusion-DPO SDXL recipe uses): `text_states` =
diffusers' `prompt_embeds` (both encoders' penultimate states, concatenated; each tokenizer's own
ids; `--text_layer` does not apply), `pooled_text` = text_encoder_2's pooled projection, and
`time_ids` per record (`--time_ids`): "crop" (default; diffusers' SDXL training and its
Diffusion-DPO port) = (winner's original h, w, the centre crop's top, left in the resized image,
R, R); "resolution" (the Salesforce `train.py --sdxl`) = (R, R, 0, 0, R, R).

Batches of `batch_size` images are encoded by one jitted function whose inputs are sharded over
the mesh axes of the rules' `batch` entry on a (data, fsdp, tensor) mesh of this process's devices
(`parallel.py`), with the weights placed by their logical axis names and the VAE / text encoder
traced under the same rules (`parallel.with_logical_rules`), so their activation constraints
apply; a short last batch is padded so one shape compiles.

Resumable: records are processed in chunks of `chunk_size`; each finished chunk is saved as
`<output>/_cache_work/chunk_<c>.npz` (written to a temporary name, then renamed). A rerun with
the same settings (checked against `_cache_work/manifest.json`) skips finished chunks; once all
chunks exist the dataset is written and the work folder removed. With several processes, chunk c
belongs to process c % process_count and process 0 writes the dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from scdpo_jax import files
from scdpo_jax.data import tfds_pairs
from scdpo_jax.data.images import load_model_images

WORK_DIR = "_cache_work"
LATENT_MODES = ("mean", "sample")


TIME_IDS_MODES = ("crop", "resolution")


class PairEncoder:
  """Images -> scaled VAE latents, token ids -> text-encoder states; jitted, mesh-sharded.

  `encode_images(images, record_ids, sides)`: float32 (N, R, R, 3) in [-1, 1] -> float32
  (N, R/f, R/f, C) scaled latents. `encode_text(ids)`: int32 (N, T) -> float32 (N, T, D).
  `tokenize(prompts)`: list[str] -> int32 (N, T). All run in batches of `batch_size`.
  SDXL (`text_module_2`, `text_params_2`, `tokenizer_2` given): `encode_prompts(prompts)` gives
  text_states (diffusers' prompt_embeds) and pooled_text; `time_ids` as the module docstring.
  """

  def __init__(self, vae_module, vae_params, text_module, text_params, tokenizer, *,
               resolution: int | None = None, latent_mode: str = "mean", text_layer: int = -1,
               batch_size: int = 32, seed: int = 0, mesh=None, rules=None, source: str = "",
               text_module_2=None, text_params_2=None, tokenizer_2=None,
               time_ids: str = "crop", vae_folder: str = ""):
    import jax
    import jax.numpy as jnp

    from scdpo_jax import parallel
    from scdpo_jax.models import clip, layers, vae

    if latent_mode not in LATENT_MODES:
      raise ValueError(f"latent_mode must be one of {LATENT_MODES}, got {latent_mode!r}")
    if time_ids not in TIME_IDS_MODES:
      raise ValueError(f"time_ids must be one of {TIME_IDS_MODES}, got {time_ids!r}")
    self.sdxl = text_module_2 is not None
    self.time_ids_mode, self.vae_folder = time_ids, str(vae_folder or "")
    self.text_encoder_2, self.tokenizer_2 = text_module_2, tokenizer_2
    self.vae, self.text_encoder, self.tokenizer = vae_module, text_module, tokenizer
    self.resolution = int(resolution or vae_module.config.sample_size)
    if self.resolution % vae_module.config.downsample_factor:
      raise ValueError(f"resolution {self.resolution} is not a multiple of the VAE's "
                       f"downsampling factor {vae_module.config.downsample_factor}")
    self.latent_mode, self.text_layer, self.seed, self.source = (
        latent_mode, int(text_layer), int(seed), source)
    self.mesh = mesh if mesh is not None else parallel.make_mesh(devices=jax.local_devices())
    rules = parallel.rules_from_config(rules or parallel.DEFAULT_RULES)
    divisor = parallel.batch_divisor(self.mesh, rules)
    self.batch_size = -(-int(batch_size) // divisor) * divisor  # round up to the mesh
    self.max_length = int(text_module.config.max_position_embeddings)

    vae_shard = parallel.logical_shardings(layers.abstract_params(vae_module), self.mesh, rules)
    text_shard = parallel.logical_shardings(layers.abstract_params(text_module), self.mesh, rules)
    self.vae_params = jax.device_put(vae_params, vae_shard)
    self.text_params = jax.device_put(text_params, text_shard)
    b4, b3, b2, b1 = (parallel.batch_sharding(self.mesh, n, rules) for n in (4, 3, 2, 1))
    vae_cfg = vae_module.config
    base_key = jax.random.key(self.seed)
    sample = latent_mode == "sample"

    def latents(params, x, record_ids, sides):
      mean, logvar = vae_module.apply({"params": params}, x, method="encode")
      if sample:
        keys = jax.vmap(lambda r, s: jax.random.fold_in(jax.random.fold_in(base_key, r), s))(
            record_ids, sides)
        eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
        z = mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps
      else:
        z = mean.astype(jnp.float32)
      return vae.scale_latents(z, vae_cfg).astype(jnp.float32)

    def states(params, ids):
      out = text_module.apply({"params": params}, ids,
                              method=clip.CLIPTextModel.encode_prompt_states,
                              layer=self.text_layer)
      return out.astype(jnp.float32)

    self._latents = jax.jit(parallel.with_logical_rules(latents, self.mesh, rules),
                            in_shardings=(vae_shard, b4, b1, b1), out_shardings=b4)
    self._states = jax.jit(parallel.with_logical_rules(states, self.mesh, rules),
                           in_shardings=(text_shard, b2), out_shardings=b3)
    if self.sdxl:
      from scdpo_jax.models import conditioning_xl

      text_shard_2 = parallel.logical_shardings(layers.abstract_params(text_module_2),
                                                self.mesh, rules)
      self.text_params_2 = jax.device_put(text_params_2, text_shard_2)
      self.max_length_2 = int(text_module_2.config.max_position_embeddings)

      def states_xl(p1, p2, ids, ids_2):
        emb = conditioning_xl.encode_prompt(text_module, p1, text_module_2, p2, ids, ids_2)
        return (emb.prompt_embeds.astype(jnp.float32),
                emb.pooled_prompt_embeds.astype(jnp.float32))

      self._states_xl = jax.jit(parallel.with_logical_rules(states_xl, self.mesh, rules),
                                in_shardings=(text_shard, text_shard_2, b2, b2),
                                out_shardings=(b3, b2))

  @classmethod
  def from_pretrained(cls, folder: str | Path, *, dtype: str = "float32", **kwargs
                      ) -> "PairEncoder":
    """VAE, text encoder(s) and tokenizer(s) of a diffusers SD or SDXL folder (SDXL: `vae_folder`
    optionally another VAE, `time_ids` the mode of the module docstring)."""
    import jax.numpy as jnp

    from scdpo_jax.models import pipeline, pipeline_xl

    source = str(Path(folder).resolve())
    if pipeline_xl.is_sdxl_folder(folder):
      vae_folder = kwargs.pop("vae_folder", "") or None
      xl = pipeline_xl.load_stable_diffusion_xl(
          folder, ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
          vae_folder=vae_folder, dtype=jnp.dtype(dtype))
      return cls(xl.vae, xl.vae_params, xl.text_encoder, xl.text_encoder_params, xl.tokenizer,
                 text_module_2=xl.text_encoder_2, text_params_2=xl.text_encoder_2_params,
                 tokenizer_2=xl.tokenizer_2, source=source,
                 vae_folder=str(Path(vae_folder).resolve()) if vae_folder else "", **kwargs)
    if kwargs.pop("vae_folder", "") or kwargs.pop("time_ids", "crop") != "crop":
      raise ValueError(f"vae_folder / time_ids are SDXL options; {folder} is an SD 1.x/2.x "
                       "pipeline")
    sd = pipeline.load_stable_diffusion(folder, ("vae", "text_encoder", "tokenizer"),
                                        dtype=jnp.dtype(dtype))
    return cls(sd.vae, sd.vae_params, sd.text_encoder, sd.text_encoder_params, sd.tokenizer,
               source=source, **kwargs)

  def fingerprint(self) -> dict[str, Any]:
    """What determines the cached values (checked when resuming)."""
    identity = {}
    if self.source and Path(self.source).is_dir():  # which weights made the cache
      components = ("text_encoder", "text_encoder_2") if self.sdxl else ("text_encoder",)
      identity = {f"{c}_identity": files.folder_identity(Path(self.source) / c)
                  for c in components}
      identity["vae_identity"] = files.folder_identity(
          Path(self.vae_folder) if self.vae_folder else Path(self.source) / "vae")
    xl = {}
    if self.sdxl:  # text_layer does not apply: diffusers' encode_prompt (penultimate states)
      xl = {"family": "sdxl", "time_ids": self.time_ids_mode, "vae_folder": self.vae_folder,
            "max_length_2": self.max_length_2}
    return {"pretrained": self.source, **identity, **xl, "resolution": self.resolution,
            "latent_mode": self.latent_mode,
            "text_layer": None if self.sdxl else self.text_layer, "seed": self.seed,
            "max_length": self.max_length,
            "vae_scaling_factor": float(self.vae.config.scaling_factor),
            "vae_shift_factor": (None if self.vae.config.shift_factor is None
                                 else float(self.vae.config.shift_factor))}

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    from scdpo_jax.models import tokenizer as tok
    return tok.tokenize(self.tokenizer, list(prompts), self.max_length)

  def _batched(self, fn, arrays: Sequence[np.ndarray]) -> np.ndarray:
    n = len(arrays[0])
    outs = []
    for lo in range(0, n, self.batch_size):
      part = [a[lo:lo + self.batch_size] for a in arrays]
      m = len(part[0])
      if m < self.batch_size:  # pad so that every call has the compiled shape
        part = [np.concatenate([p, np.repeat(p[-1:], self.batch_size - m, axis=0)]) for p in part]
      outs.append(np.asarray(fn(*part))[:m])
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

  def encode_images(self, images: np.ndarray, record_ids: np.ndarray, sides: np.ndarray
                    ) -> np.ndarray:
    images = np.asarray(images, np.float32)
    r = self.resolution
    if images.shape[1:] != (r, r, 3):
      raise ValueError(f"encode_images expects (N, {r}, {r}, 3) in [-1, 1], got {images.shape}")
    return self._batched(lambda x, rec, side: self._latents(self.vae_params, x, rec, side),
                         [images, np.asarray(record_ids, np.int32), np.asarray(sides, np.int32)])

  def encode_text(self, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 2 or ids.shape[1] != self.max_length:
      raise ValueError(f"encode_text expects (N, {self.max_length}) token ids, got {ids.shape}")
    return self._batched(lambda x: self._states(self.text_params, x), [ids])

  def encode_prompts(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """{"input_ids", "text_states"} (SD) or, SDXL, also "pooled_text" (`input_ids`: the first
    tokenizer's; `text_states`: diffusers' prompt_embeds of both tokenizers' ids)."""
    ids = self.tokenize(prompts)
    if not self.sdxl:
      return {"input_ids": ids, "text_states": self.encode_text(ids)}
    from scdpo_jax.models import tokenizer as tok
    ids_2 = tok.tokenize(self.tokenizer_2, list(prompts), self.max_length_2)
    n, outs = len(ids), []
    for lo in range(0, n, self.batch_size):
      part = [ids[lo:lo + self.batch_size], ids_2[lo:lo + self.batch_size]]
      m = len(part[0])
      if m < self.batch_size:
        part = [np.concatenate([p, np.repeat(p[-1:], self.batch_size - m, axis=0)]) for p in part]
      states, pooled = self._states_xl(self.text_params, self.text_params_2, *part)
      outs.append((np.asarray(states)[:m], np.asarray(pooled)[:m]))
    return {"input_ids": ids, "text_states": np.concatenate([o[0] for o in outs]),
            "pooled_text": np.concatenate([o[1] for o in outs])}

  def time_ids(self, records: Sequence[dict]) -> np.ndarray:
    """(N, 6) SDXL micro-conditioning of each record's winner image (module docstring)."""
    from scdpo_jax.data.images import center_crop_box, image_size

    r = self.resolution
    rows = []
    for rec in records:
      if self.time_ids_mode == "resolution":
        rows.append([r, r, 0, 0, r, r])
        continue
      h, w = image_size(rec["image_w"])
      _, _, top, left = center_crop_box(h, w, r)
      rows.append([h, w, top, left, r, r])
    return np.asarray(rows, np.float32).reshape(-1, 6)

  def encode_records(self, records: Sequence[dict], record_ids: np.ndarray,
                     flips: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Pair records with images -> latents_w, latents_l, text_states, input_ids (NumPy); SDXL:
    also pooled_text and time_ids.

    `flips` (bool per record) mirrors both images of a pair left-right before encoding.
    """
    prompts = [tfds_pairs.text(r["prompt"]) for r in records]
    text = self.encode_prompts(prompts)
    record_ids = np.asarray(record_ids, np.int32)
    n = len(records)
    out_w, out_l = [], []
    for lo in range(0, n, self.batch_size):  # decode one batch of images at a time
      hi = min(n, lo + self.batch_size)
      imgs = load_model_images([r["image_w"] for r in records[lo:hi]]
                               + [r["image_l"] for r in records[lo:hi]], self.resolution)
      if flips is not None:
        f = np.concatenate([flips[lo:hi], flips[lo:hi]])
        imgs = np.where(f[:, None, None, None], imgs[:, :, ::-1], imgs)
      rec = np.concatenate([record_ids[lo:hi], record_ids[lo:hi]])
      side = np.repeat(np.array([0, 1], np.int32), hi - lo)
      lat = self.encode_images(imgs, rec, side)
      out_w.append(lat[:hi - lo])
      out_l.append(lat[hi - lo:])
    out = {"latents_w": np.concatenate(out_w), "latents_l": np.concatenate(out_l), **text}
    if self.sdxl:
      out["time_ids"] = self.time_ids(records)
    return out


@dataclasses.dataclass
class CacheResult:
  """`path` is the finished dataset (None if chunks are still missing)."""

  path: Path | None
  num_chunks: int
  chunks_computed: int
  chunks_skipped: int
  seconds: float


def _chunk_path(work: Path, c: int) -> Path:
  return work / f"chunk_{c:06d}.npz"


def cache_pairs(input_path: str | Path, output_dir: str | Path, encoder: PairEncoder, *,
                split: str = "train", chunk_size: int = 1024, latent_dtype: str = "float32",
                states_dtype: str = "float32", keep_images: bool = False,
                max_chunks: int | None = None, process_index: int | None = None,
                process_count: int | None = None, keep_work: bool = False) -> CacheResult:
  """Encode every pair of `input_path[split]` and write a latent pair dataset to `output_dir`.

  `max_chunks` bounds how many chunks this call computes (for time-limited or preemptible
  jobs; a later call resumes). Returns a `CacheResult`; its `path` is None while chunks are
  missing. A finished dataset in `output_dir` is returned as is.
  """
  import jax

  t0 = time.time()
  output_dir = Path(output_dir)
  try:
    return CacheResult(tfds_pairs.find_dataset_dir(output_dir), 0, 0, 0, 0.0)
  except FileNotFoundError:
    pass
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  src_ds = tfds_pairs.open_pairs(input_path)
  if not src_ds.schema.images:
    raise ValueError(f"{src_ds.path} holds no images (schema {src_ds.schema}); nothing to cache")
  src = src_ds.source(split)
  n = len(src)
  num_chunks = -(-n // chunk_size)
  work = output_dir / WORK_DIR
  work.mkdir(parents=True, exist_ok=True)
  manifest = {"source": str(src_ds.path.resolve()), "split": split, "num_records": n,
              "chunk_size": chunk_size, "encoder": encoder.fingerprint()}
  manifest_path = work / "manifest.json"
  if manifest_path.is_file():
    old = json.loads(manifest_path.read_text())
    if old != manifest:
      raise ValueError(f"{work} holds chunks made with other settings:\n  {old}\nvs now\n  "
                       f"{manifest}\nresume with the same settings or delete {work}")
  elif pi == 0:
    files.write_json(manifest_path, manifest)

  computed = skipped = 0
  for c in range(num_chunks):
    if c % pc != pi:
      continue
    path = _chunk_path(work, c)
    if path.is_file():
      skipped += 1
      continue
    if max_chunks is not None and computed >= max_chunks:
      break
    lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
    records = src.__getitems__(list(range(lo, hi)))
    out = encoder.encode_records(records, np.arange(lo, hi))
    arrays = {"latents_w": out["latents_w"].astype(latent_dtype),
              "latents_l": out["latents_l"].astype(latent_dtype),
              "text_states": out["text_states"].astype(states_dtype),
              "input_ids": out["input_ids"]}
    if "pooled_text" in out:
      arrays.update(pooled_text=out["pooled_text"].astype(states_dtype),
                    time_ids=out["time_ids"].astype(np.float32))
    files.save_npz(path, arrays)
    computed += 1

  if pc > 1 and jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("scdpo_jax.data.cache:chunks_done")
  missing = [c for c in range(num_chunks) if not _chunk_path(work, c).is_file()]
  if missing or pi != 0:
    return CacheResult(None, num_chunks, computed, skipped, time.time() - t0)

  first = np.load(_chunk_path(work, 0)) if num_chunks else None
  if first is None:
    raise ValueError(f"{src_ds.path} split {split!r} is empty")
  schema = tfds_pairs.PairSchema(
      token_length=int(first["input_ids"].shape[1]), images=keep_images,
      latent_shape=tuple(first["latents_w"].shape[1:]),
      text_states_shape=tuple(first["text_states"].shape[1:]), latent_dtype=latent_dtype,
      states_dtype=states_dtype,
      pooled_dim=int(first["pooled_text"].shape[1]) if "pooled_text" in first else 0)
  cached_keys = ("latents_w", "latents_l", "text_states", "input_ids") + (
      ("pooled_text", "time_ids") if schema.pooled_dim else ())

  def examples():
    for c in range(num_chunks):
      arrays = np.load(_chunk_path(work, c))
      lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
      for i, rec in enumerate(src.__getitems__(list(range(lo, hi)))):
        ex = {k: rec[k] for k in ("pair_id", "prompt", "category", "is_harmful", "hflip_ok",
                                  *tfds_pairs.SCALAR_FLOAT_KEYS)}
        ex.update({k: arrays[k][i] for k in cached_keys})
        if keep_images:
          ex["image_w"], ex["image_l"] = rec["image_w"], rec["image_l"]
        yield ex

  metadata = {"cache": {**manifest, "latent_dtype": latent_dtype, "states_dtype": states_dtype},
              "source_metadata": src_ds.metadata}
  path = tfds_pairs.write_pairs(output_dir, {split: examples()}, schema,
                                description=f"cached latents of {src_ds.path}",
                                metadata=metadata)
  if not keep_work:
    shutil.rmtree(work)
  return CacheResult(path, num_chunks, computed, skipped, time.time() - t0)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m scdpo_jax.data.cache",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="image pair dataset")
  parser.add_argument("--output", required=True, help="new folder for the latent dataset")
  parser.add_argument("--pretrained", required=True, help="diffusers SD or SDXL folder")
  parser.add_argument("--vae", default="", help="SDXL: another VAE folder (sdxl-vae-fp16-fix)")
  parser.add_argument("--time_ids", choices=TIME_IDS_MODES, default="crop",
                      help="SDXL micro-conditioning (module docstring)")
  parser.add_argument("--split", default="train")
  parser.add_argument("--resolution", type=int, default=None)
  parser.add_argument("--latents", choices=LATENT_MODES, default="mean")
  parser.add_argument("--text_layer", type=int, default=-1)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--chunk_size", type=int, default=1024)
  parser.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on TPU/GPU)")
  parser.add_argument("--latent_dtype", choices=("float32", "float16"), default="float32")
  parser.add_argument("--states_dtype", choices=("float32", "float16"), default="float32")
  parser.add_argument("--keep_images", action="store_true")
  parser.add_argument("--max_chunks", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  encoder = PairEncoder.from_pretrained(
      args.pretrained, dtype=args.dtype, resolution=args.resolution, latent_mode=args.latents,
      text_layer=args.text_layer, batch_size=args.batch_size, seed=args.seed,
      **({"vae_folder": args.vae, "time_ids": args.time_ids}
         if args.vae or args.time_ids != "crop" else {}))
  result = cache_pairs(args.input, args.output, encoder, split=args.split,
                       chunk_size=args.chunk_size, latent_dtype=args.latent_dtype,
                       states_dtype=args.states_dtype, keep_images=args.keep_images,
                       max_chunks=args.max_chunks)
  print(json.dumps({**dataclasses.asdict(result), "path": str(result.path),
                    "mesh": dict(encoder.mesh.shape), "batch_size": encoder.batch_size}))
  if result.path is None:
    print("chunks are still missing: run the same command again to resume", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
