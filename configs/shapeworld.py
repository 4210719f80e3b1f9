"""ShapeWorld: the whole SC-DPO study end to end on an embedded synthetic world (no downloads).

  python main.py --config configs/shapeworld.py --workdir runs/shapeworld
  python main.py --config configs/shapeworld.py --workdir runs/shapeworld --config.only=evaluate

Budget: at most 15 minutes on 2 CPU cores; measured: 10 min 37 s for a fresh workdir (warm
compile cache, idle machine); an earlier run (60 fine-tune steps) with another job competing
for the CPU took 13 min 35 s. Details in README.md, section ShapeWorld.
Stages, in order (`config.only` = comma-separated subset; each reuses what the workdir holds):
pretrain (base UNet + text encoder, pixel space, 16x16) -> candidates (base-model images for the
pair prompts, detector-labelled) -> cost_model (frozen random CLIP tower + MLP adapter, the
`cost_model` job; held-out AUROC against the exact detector) -> pairs (SCP rule r - lam*C, and
human-preference-only pairs) -> finetune (Diffusion-DPO, SC-DPO, SC-DPO gamma=0 with the real
trainer `train.loop.run`) -> evaluate (base, fine-tunes, negative prompt, TraSCE, SLD, SAFREE; harmful,
adversarial and clean held-out prompts, several seeds) -> report (report.json, report.md,
grids/). The world, detector, fidelity checker and reward are documented in
scdpo_jax/shapeworld/world.py; the stages in scdpo_jax/shapeworld/study.py.
"""

import ml_collections

from configs import cost_model, default


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = "shapeworld"
  config.seed = 0  # the study's seed; the stage configs' seeds follow it (references)
  config.only = ""  # "" = every stage; else e.g. "evaluate,report"
  config.methods = ""  # "" = every method (study.METHODS); else e.g. "base,sc_dpo"

  # The unsafe categories (world.CATEGORIES: a colour, a shape, a pattern, a composition) and
  # the prompt splits, fixed before any tuning: per category, a third of the scenes is the
  # held-out test split, a sixth the validation split, the rest builds pairs.
  config.world = ml_collections.ConfigDict(dict(
      image_size=16, categories=("magenta", "ring", "stripes", "red_on_black"),
      unsafe_fraction=0.4, rephrase_fraction=0.5, test_fraction=1 / 3,
      validation_fraction=1 / 6))

  config.model = ml_collections.ConfigDict()
  config.model.unet = ml_collections.ConfigDict(dict(
      sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
      layers_per_block=1, cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")))
  config.model.text_encoder = ml_collections.ConfigDict(dict(
      vocab_size=514, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=64, hidden_act="quick_gelu",
      bos_token_id=512, eos_token_id=513, pad_token_id=513))
  config.model.scheduler = ml_collections.ConfigDict(dict(
      _class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
      beta_schedule="linear", prediction_type="v_prediction", clip_sample=True,
      set_alpha_to_one=False, steps_offset=0, timestep_spacing="trailing"))

  # Base-model pretraining (shapeworld/pretrain.py; the trainer's key names): AdamW, linear
  # warmup then cosine decay to cosine_final_fraction * lr, gradient-norm clipping.
  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.train = ml_collections.ConfigDict(dict(
      num_steps=450, batch_size=64, caption_dropout=0.1))
  config.pretrain.optimizer = ml_collections.ConfigDict(dict(
      lr=2e-3, warmup_steps=40, weight_decay=1e-4, cosine_final_fraction=0.1, max_grad_norm=1.0))
  config.pretrain.log = ml_collections.ConfigDict(dict(every_steps=50, snapshot_every=0))

  config.sampling = ml_collections.ConfigDict(dict(
      num_steps=12, guidance_scale=3.0, batch_size=128,
      negative_prompt="magenta, ring, striped, red on black"))
  # The training-free guards' concepts: the world's plain unsafe phrases (never a held-out
  # rephrasing); SLD with a diffusers preset, SAFREE as released (lra "released").
  config.guards = ml_collections.ConfigDict(dict(
      concepts=("magenta", "ring", "striped", "red on black"), sld_preset="medium"))

  config.candidates = ml_collections.ConfigDict(dict(
      per_harmful_prompt=6, per_paraphrase=4, per_clean_prompt=4))

  # The `cost_model` job (configs/cost_model.py) as the study runs it; the study only adds the
  # candidate images (data.images_csv, written into the workdir).
  cm = cost_model.get_config()
  cm.seed = config.get_ref("seed")
  cm.tiny_clip.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, patch_size=4, projection_dim=64))
  cm.tiny_clip.image_size = config.world.get_ref("image_size")
  cm.data.update(dict(eval_fraction=0.25, embed_batch_size=128))
  cm.model.hidden_dim = 128
  cm.train.num_steps = 300
  cm.checkpoint.every_steps = cm.eval.every_steps = 300  # one checkpoint and evaluation, at the end
  config.cost_model = cm

  config.pairs = ml_collections.ConfigDict(dict(lam=1.0, pairs_per_prompt=3))

  # The `train` job (configs/default.py) shared by the three fine-tunes. The study adds the base
  # model (model.pretrained = <workdir>/base_pipeline), the method's pair dataset (data.source =
  # "tfds", data.name = <workdir>/pairs/<kind>_dataset) and the method's loss:
  # diffusion_dpo: train.safety_mode "none", train.gamma 0 (human-preference pairs);
  # sc_dpo: as below (SCP pairs); sc_dpo_no_focus: train.gamma 0 (SCP pairs).
  ft = default.get_config()
  ft.seed = config.get_ref("seed")
  ft.data.seed = config.get_ref("seed")
  ft.data.hflip = True
  ft.train.update(dict(loss_type="dpo", beta=2000.0, safety_mode="margin", lam=1.0, gamma=1.0,
                       focus_on="preference",
                       caption_dropout=0.1, pairs_per_step=32, grad_accum=1, num_steps=80))
  ft.optimizer.update(dict(lr=3e-4, warmup_steps=8))
  ft.checkpoint.update(dict(every_steps=80, async_save=False, keep=1))
  ft.log.update(dict(every_steps=10, tensorboard=False))
  config.finetune = ft

  # Fixed before any tuning: the held-out test split, seeds 0-2, 2 images per prompt and seed.
  # Tuning runs use --config.evaluate.split=validation (their report is report_validation.*).
  config.evaluate = ml_collections.ConfigDict(dict(split="test", seeds=(0, 1, 2),
                                                   images_per_prompt=2, grid_clean_prompts=2))
  return config
