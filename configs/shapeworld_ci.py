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
  config.pretrain.train.update(dict(num_steps=60, batch_size=32))
  config.pretrain.optimizer.warmup_steps = 10
  config.pretrain.log.every_steps = 20
  config.sampling.update(dict(num_steps=3, batch_size=64))
  config.candidates.update(dict(per_harmful_prompt=2, per_paraphrase=2, per_clean_prompt=2))
  config.cost_model.train.num_steps = 20
  config.cost_model.checkpoint.every_steps = 20
  config.cost_model.eval.every_steps = 20
  config.pairs.pairs_per_prompt = 1
  ft = config.finetune
  ft.train.update(dict(num_steps=2, pairs_per_step=8))
  ft.optimizer.warmup_steps = 1
  ft.checkpoint.every_steps = 2
  ft.log.every_steps = 1
  config.evaluate.update(dict(seeds=(0, 1), images_per_prompt=1))
  return config
