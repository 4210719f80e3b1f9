"""Flax models of the Stable Diffusion stack and their torch-free checkpoint IO.

Each model is split by concern, one file each:

* `<model>_config.py`: the frozen config dataclass parsed from (and written back to) the
  diffusers / transformers config.json; unsupported options raise naming the key.
* `<model>.py`: the Flax linen modules (and pure helpers on their outputs, such as the VAE's
  latent scaling); the top-level module provides `dummy_inputs()`.
* `<model>_io.py`: load / save a diffusers or Hugging Face folder (`load_unet` / `save_unet`,
  `load_vae` / `save_vae`, `load_clip_text` / `load_clip_vision` / `save_clip_*`).

for `unet` (UNet2DConditionModel), `vae` (AutoencoderKL) and `clip` (CLIP text and vision
towers). Shared by all: `layers.py` (layers, logical axis names, the `Module` base, the dtype
and parameter-tree conventions, `abstract_params` / `init_params`), `convert.py` (the one
PyTorch <-> Flax key and layout rule set), `io.py` (folders, JSON, safetensors). Whole
pipelines: `pipeline.py` (a diffusers SD folder), `pipeline_xl.py` (a diffusers SDXL folder:
both text encoders and tokenizers, an optional separate VAE folder), `tiny.py` (the tiny random
SD or SDXL one); `conditioning_xl.py` (SDXL prompt states, pooled embeddings, time ids); plus
`schedule.py` (noise schedule) and `tokenizer.py`.

Imports: modules here may import only jax, flax, numpy, safetensors, transformers' tokenizer
(`tokenizer.py`), the standard library, `scdpo_jax.models.*` and `scdpo_jax.parallel` (for the
activation constraints); never `configs/`, `scdpo_jax.train`, `sampling`, `evaluation`, `data`,
`cost_model` or `shapeworld`, which build on this package. torch is never imported.
"""
