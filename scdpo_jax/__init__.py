"""scdpo-jax: Safety-Constrained Direct Preference Optimization for text-to-image diffusion in JAX.

Packages, from the bottom up (a package may import only those above it in this list, plus jax,
flax, optax, orbax, numpy and the libraries in requirements.txt; nothing here imports `configs/`,
which holds data only):

  parallel.py   mesh, logical-axis sharding rules, activation constraints, global batches
  files.py      atomic file / JSONL writes shared by every job
  models/       Flax SD models (UNet, VAE, CLIP), configs parsing and torch-free checkpoint IO
  data/         preference-pair format, tfds ArrayRecord datasets, converters, latent cache
  cost_model/   the safety cost model (frozen CLIP image tower + adapter) and its job
  train/        SC-DPO / Diffusion-DPO losses, the jitted step, state, checkpoints, the job
  sampling/     samplers and training-free guards (TextToImage)
  evaluation/   metrics and the prompt-set evaluation job
  shapeworld/   the embedded synthetic world and its end-to-end study (composes the jobs above)
  jobs.py, cli.py, inspect_job.py   what `main.py` / `python -m scdpo_jax` / `scdpo-jax` run
"""

__version__ = "0.2.0"
