"""Preference-pair data: the batch format the trainer consumes, sources, converters, caching.

  batch.py        the pair batch contract (`PAIR_KEYS`, `PairSource`: batch(step, global_batch))
  memory.py       an in-memory, step-indexed pair source (`InMemoryPairs`, `global_indices`)
  tfds_pairs.py   the pair dataset as tensorflow-datasets ArrayRecord files, without TensorFlow
  loader.py       `PairLoader`: grain over a tfds pair dataset, indexed by step
  convert.py      Pick-a-Pic / CoProV2 / CSV -> pair datasets (with a report of every row)
  cache.py        VAE latents + text states of a pair dataset (jitted, mesh-sharded under the
                  logical axis rules, resumable)
  pairs_build.py  SCP-style pairs from a scored candidate pool (r - lambda C)
  images.py       decode / encode / resize, and the one float [-1, 1] <-> uint8 conversion pair
  shapes.py       synthetic labelled images (the cost model's demo data)

May import: numpy, grain, tensorflow_datasets (no TensorFlow), PIL, jax (cache.py, loader.py),
`scdpo_jax.models`, `scdpo_jax.parallel`, `scdpo_jax.files`; pairs_build.py's command line loads
`scdpo_jax.cost_model.CostModelScorer` (lazily; the library functions take any scorer). Not
train/, sampling/, evaluation/, shapeworld/ nor configs/.
"""
