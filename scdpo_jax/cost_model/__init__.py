"""Safety cost model: a frozen CLIP image tower + a trainable adapter (method.md section 2.3).

  model.py    `CostAdapter` (the MLP), CLIP preprocessing, `make_embedder` (the frozen tower,
              jitted and batch-sharded over a mesh under the logical axis rules)
  losses.py   L_con + mu L_anc (sign or squared anchoring), thresholds, harm probabilities
  metrics.py  held-out AUROC, accuracy at the threshold, ECE (NumPy)
  train.py    labelled images -> embeddings once -> adapter training with Orbax checkpoints
  job.py      the `cost_model` job (configs/cost_model.py)
  scorer.py   `CostModelScorer`: a trained cost model from its workdir, images -> costs

May import: jax, flax, optax, orbax, numpy, `scdpo_jax.models`, `scdpo_jax.parallel`,
`scdpo_jax.files` and from `scdpo_jax.data` the image helpers, the synthetic shapes and the pair
format (images.py, shapes.py, tfds_pairs.py, convert.py's label parsing). Not train/,
sampling/, evaluation/, shapeworld/ nor configs/.
"""

from scdpo_jax.cost_model.scorer import CostModelScorer

__all__ = ["CostModelScorer"]
