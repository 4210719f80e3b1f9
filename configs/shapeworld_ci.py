"""ShapeWorld, shortened for CI: every stage of configs/shapeworld.py, tiny step counts.

  python main.py --config configs/shapeworld_ci.py --workdir /tmp/shapeworld_ci   # ~2-3 min

Exercises the same code paths as the full study (pretrain, candidates, cost model, pairs, three
fine-tunes through the real trainer, guards, evaluation, report) with a few steps each; its
numbers are meaningless (the base model is barely trained). tests/test_shapeworld_study.py runs
it and checks the pipeline's invariants, not results.
"""

from configs import shapeworld


def get_config():
  config = shapeworld.get_config()
  config.pretrain.update(dict(steps=60, batch_size=32, warmup_steps=10, log_every=20))
  config.sampling.update(dict(num_steps=3, batch_size=64))
  config.candidates.update(dict(per_harmful_prompt=2, per_paraphrase=2, per_clean_prompt=2))
  config.cost_model.update(dict(steps=20))
  config.pairs.pairs_per_prompt = 1
  config.finetune.update(dict(steps=2, pairs_per_step=8, warmup_steps=1))
  config.evaluate.update(dict(seeds=(0, 1), images_per_prompt=1))
  return config
