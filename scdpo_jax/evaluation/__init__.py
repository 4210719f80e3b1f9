"""Evaluation: the prompt-set runner and the metrics on generated images.

  job.py      the `eval` job: prompt CSV -> images (resumable) -> per-image metrics -> summary
  metrics.py  NudeNet, safety cost model, CLIP score and Q16 on uint8 images (`ClipEmbedder`:
              CLIP towers, optionally batch-sharded over a mesh under the logical axis rules)
  prompts.py  prompt CSVs (I2P and the adversarial sets): column detection, seeds, categories
  export.py   a trained UNet + the base pipeline's other components as a diffusers folder

May import: jax, flax, numpy, `scdpo_jax.models`, `scdpo_jax.parallel`, `scdpo_jax.files`,
`scdpo_jax.utils`, `scdpo_jax.sampling`, `scdpo_jax.cost_model` (scorer) and
`scdpo_jax.data.images`. Not train/, shapeworld/ nor configs/.
"""
