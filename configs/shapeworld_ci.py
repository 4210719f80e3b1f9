"""ShapeWorld, shortened for CI: every stage of configs/shapeworld.py, tiny step counts.

  python main.py --config configs/shapeworld_ci.py --workdir /tmp/shapeworld_ci   # ~165 s warm on 2 AMD EPYC cores

Exercises the same code paths as the full study (pretrain, candidates, cost model, world CLIP,
pairs, fine-tunes of every kind through their real jobs, guards, evaluation, report) with a few
steps each, on a one-level UNet (a smaller program to compile) trained for a few steps; its
numbers are meaningless. The methods are one of each kind and those the claims compare (see
METHODS below; SafetyDPO with two experts); the other DPO variants differ from these only by
trainer keys that the study's config test checks and the trainer's own tests cover, all_single
by a safetydpo key (tests/test_safetydpo.py), and the other guards by their guard
(tests/test_sampling.py, test_sld.py, test_safree.py). `--config.methods=` runs
any other subset. tests/test_shapeworld_study.py runs it and checks the pipeline's invariants,
not results.
"""

from configs import shapeworld


METHODS = ("base", "diffusion_dpo", "sc_dpo", "sc_dpo_no_focus", "safetydpo",
           "safediffusion_r1", "negative_prompt")


def get_config():
  config = shapeworld.get_config()
  config.methods = ",".join(METHODS)
  config.model.unet.update(dict(
      block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
      up_block_types=("CrossAttnUpBlock2D",)))
  config.model.text_encoder.num_hidden_layers = 1
  config.pretrain.source = "train"  # a barely trained base of its own, not the shipped one
  config.pretrain.train.update(dict(num_steps=30, batch_size=16))
  config.pretrain.optimizer.warmup_steps = 5
  config.pretrain.log.every_steps = 20
  # its small TraSCE program stays in the persistent cache (the suite reruns it every time)
  config.sampling.update(dict(num_steps=3, batch_size=64, trasce_persistent_cache=True))
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
  config.world_clip.source = "train"  # a 10-step world CLIP of its own
  config.world_clip.train.update(dict(num_steps=10, warmup_steps=2))
  config.world_clip.eval.images_per_scene = 1
  sd = config.safetydpo
  sd.expert.train.update(dict(num_steps=2, pairs_per_step=8))
  sd.expert.optimizer.warmup_steps = 1
  sd.expert.checkpoint.every_steps = 2
  sd.expert.log.every_steps = 1
  sd.safetydpo.categories = ("magenta", "ring")  # two experts are enough to merge
  sd.merge.update(dict(calibration_pairs_per_category=2, calibration_batch=8))
  r1 = config.grpo
  r1.sample.update(dict(num_steps=3, group_size=2, prompts_per_epoch=2, batch_size=4))
  r1.train.update(dict(num_epochs=1, samples_per_step=4))
  r1.checkpoint.every_epochs = 1
  r1.log.every_steps = 1
  config.evaluate.update(dict(seeds=(0, 1), images_per_prompt=1))
  return config
