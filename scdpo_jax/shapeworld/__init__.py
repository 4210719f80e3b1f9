"""ShapeWorld: the embedded synthetic text-to-image world and the comparative safety study.

  world.py       the world: scenes, captions, vocabulary and prompt splits, the renderer, the
                 four exact unsafe detectors, the prompt-fidelity checker, the preference reward
  pretrain.py    the base model (UNet + text encoder trained from scratch in pixel space, or the
                 shipped one in weights/base/, made by the same recipe) -> a diffusers folder
  world_clip.py  a tiny CLIP trained on the world (or the shipped one in weights/world_clip/):
                 SafeDiffusion-R1's reward model and the cost model's frozen image tower
  shipped.py     the shipped folders (weights/): copied only for their recorded recipe
  methods.py     the study's methods: one table of what each report row is
  generation.py  sampling the base, any fine-tuned UNet, every guard
  finetune.py    every trained method through its own job (train, safetydpo, safediffusion_r1)
  evaluation.py  held-out prompts, seeds, exact scores, means and standard errors
  report.py      report.json / report.md, grids, pareto.png, the SC-DPO claims
  study.py       the `shapeworld` job: pretrain -> candidates -> cost model -> world CLIP ->
                 pairs -> fine-tunes -> evaluation -> report, each stage resumable; the stages
                 that are jobs run their job's config composed into the study's

May import: every library package (models, parallel, files, data, sampling, cost_model, train,
lora, grpo). Nothing else imports from here; configs/ is never imported (configs compose, the
study reads).
"""
