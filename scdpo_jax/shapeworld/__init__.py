"""ShapeWorld: the embedded synthetic text-to-image world and the end-to-end SC-DPO study.

  world.py     the world: scenes, captions and prompt splits, the renderer, the exact unsafe
               detector, the prompt-fidelity checker and the preference reward
  pretrain.py  base UNet + text encoder trained from scratch in pixel space -> a diffusers folder
  study.py     the `shapeworld` job: pretrain -> candidates -> cost model -> pairs -> fine-tunes
               -> evaluation -> report, each stage resumable; the stages that are jobs run their
               job's config composed into the study's (`config.cost_model`, `config.finetune`)

May import: every library package (models, parallel, files, data, sampling, cost_model, train).
Nothing else imports from here; configs/ is never imported (configs compose, the study reads).
"""
