"""ShapeWorld: the comparative safety study end to end on an embedded synthetic world (no downloads).

  python main.py --config configs/shapeworld.py --workdir runs/shapeworld
  python main.py --config configs/shapeworld.py --workdir runs/shapeworld --config.methods=all
  python main.py --config configs/shapeworld.py --workdir runs/shapeworld --config.methods=base,sc_dpo
  python main.py --config configs/shapeworld.py --workdir runs/shapeworld --config.only=evaluate,report

Budget: at most 15 minutes on 2 CPU cores from an empty workdir with a warm compile cache
(measured 871 s, 883 s and 895 s on 2 AMD EPYC cores with 2 workers, both cores busy: under
the target by 5-29 s, a thin margin that moves with the machine's speed; README.md,
ShapeWorld). The default study runs twelve rows (shapeworld/methods.py): the base,
Diffusion-DPO, SC-DPO with and without Dynamic Focusing and with the Diffusion-SDPO safeguard,
SafetyDPO and All-single, SafeDiffusion-R1 and four training-free guards, on the same held-out
prompts, seeds and exact detectors; `--config.methods=all` adds the four further SC-DPO
ablations (6 min 42 s more there) in the same workdir and report.
Stages, in order (`config.only` = comma-separated subset; each reuses what the workdir holds):
pretrain (the shipped base, scdpo_jax/shapeworld/weights/base/, checked against its recorded
recipe; or trained with --config.pretrain.source=train) -> candidates -> world_clip (the shipped
one in weights/world_clip/, likewise; or --config.world_clip.source=train) -> cost_model -> pairs
(human, scp, oracle, coprov2) -> finetune (each trained row through its own job) -> evaluate
-> report (report.json, report.md, grids/, pareto.png); all but pretrain and report run as
tasks, `workers` at once, each after what it needs (shapeworld/tasks.py). The world, detectors,
fidelity checker and reward are documented in scdpo_jax/shapeworld/world.py; the stages in
shapeworld/study.py.
"""

import ml_collections

from configs import cost_model, default, safediffusion_r1_sd15, safetydpo_tiny


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = "shapeworld"
  config.seed = 0  # the study's seed; the stage configs' seeds follow it (references)
  # The fine-tunes' seed (noise, timesteps, pair order, R1's rollouts): follows config.seed
  # unless set, e.g. --config.training_seed=1 retrains every row on the same data (the candidates,
  # cost model, pairs and world CLIP keep config.seed). "+ 0" makes it a reference of its own:
  # setting it leaves config.seed alone (setting a plain get_ref would change both).
  config.training_seed = config.get_ref("seed") + 0
  config.only = ""  # "" = every stage; else e.g. "evaluate,report"
  # the rows: "default" = every method but the four further SC-DPO ablations (methods.ABLATIONS,
  # left out for the time budget); "all" = every row; or names and groups, e.g. "base,sc_dpo"
  config.methods = "default"

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
  # [I] a word-level tokenizer: the world's 37 words are one token each (as common words are in
  # CLIP's real vocabulary); "chars" = characters only (the earlier world's; README).
  config.model.tokenizer = "words"
  config.model.text_encoder = ml_collections.ConfigDict(dict(
      vocab_size=768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=24, hidden_act="quick_gelu",
      bos_token_id=512, eos_token_id=513, pad_token_id=513))
  config.model.scheduler = ml_collections.ConfigDict(dict(
      _class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
      beta_schedule="linear", prediction_type="v_prediction", clip_sample=True,
      set_alpha_to_one=False, steps_offset=0, timestep_spacing="trailing"))

  # Base-model pretraining (shapeworld/pretrain.py; the trainer's key names): AdamW, linear
  # warmup then cosine decay to cosine_final_fraction * lr, gradient-norm clipping, Min-SNR-5
  # loss weights, the EMA of the weights is saved.
  config.pretrain = ml_collections.ConfigDict()
  # "shipped": copy scdpo_jax/shapeworld/weights/base/, made by this recipe (checked); "train":
  # train it here
  config.pretrain.source = "shipped"
  # 10000 steps: 1 h 49 min on one CPU core (measured); fidelity rose from 0.23 at 2000 steps
  # to 0.52 at 6000 (README, "The base model")
  config.pretrain.train = ml_collections.ConfigDict(dict(
      num_steps=10000, batch_size=64, caption_dropout=0.1, ema_decay=0.999, min_snr_gamma=5.0))
  config.pretrain.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=100, weight_decay=1e-4, cosine_final_fraction=0.1, max_grad_norm=1.0))
  config.pretrain.log = ml_collections.ConfigDict(dict(every_steps=50, snapshot_every=0))

  config.sampling = ml_collections.ConfigDict(dict(
      # batch_size: the most images per sampler call (requests run in equal batches); on 2 CPU
      # cores 426 images took 13.4 s in batches of <= 32, 15.5 s of <= 128, 22.1 s as one
      num_steps=12, guidance_scale=3.0, batch_size=32,
      negative_prompt="magenta, ring, striped, red on black",
      # TraSCE's loss guidance differentiates the UNet inside the sampler loop: unrolled (all
      # 12 steps), XLA:CPU runs it ~10x faster (a longer compile); 1 = a loop
      trasce_scan_unroll=12,
      # ... and loads that program from the persistent cache slower than it compiles it (65 s
      # vs 37 s): compiled in every run, never cached (SamplingSettings.persistent_cache)
      trasce_persistent_cache=False))
  # The training-free guards' concepts: the world's plain unsafe phrases (never a held-out
  # rephrasing); SLD with a diffusers preset, SAFREE as released (lra "released").
  config.guards = ml_collections.ConfigDict(dict(
      concepts=("magenta", "ring", "striped", "red on black"), sld_preset="medium"))

  config.candidates = ml_collections.ConfigDict(dict(
      per_harmful_prompt=6, per_paraphrase=4, per_clean_prompt=4))

  # The `cost_model` job (configs/cost_model.py) as the study runs it; the study only adds the
  # candidate images (data.images_csv, written into the workdir).
  # [I] The cost model's frozen image tower: SC-DPO puts its adapter on a pretrained CLIP image
  # tower; here the world CLIP's (world_clip stage, trained contrastively on the world before
  # the cost model), "random" = the cost_model job's tiny random tower (the study's first form).
  config.cost_model_tower = "world_clip"
  cm = cost_model.get_config()
  cm.seed = config.get_ref("seed")
  cm.tiny_clip.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, patch_size=4, projection_dim=64))
  cm.tiny_clip.image_size = config.world.get_ref("image_size")
  cm.data.update(dict(eval_fraction=0.25, embed_batch_size=128))
  cm.model.hidden_dim = 128
  # 1000 steps on the world CLIP's tower: held-out AUROC 0.93 (0.89 at 300; the random tower
  # gave 0.76 at 300), a few seconds
  cm.train.num_steps = 1000
  cm.checkpoint.every_steps = cm.eval.every_steps = 1000  # one checkpoint and evaluation, at end
  config.cost_model = cm

  # oracle_rule_cost: the detectors' 0/1 cost times this in the oracle pair set's rule (> the
  # reward's range 3, so a safe image outranks an unsafe one; study.stage_pairs)
  config.pairs = ml_collections.ConfigDict(dict(lam=1.0, pairs_per_prompt=3, oracle_rule_cost=4.0))

  # The `train` job (configs/default.py) shared by every DPO row. The study adds the base model
  # (model.pretrained = <workdir>/base_pipeline), the row's pair dataset (data.source = "tfds",
  # data.name = <workdir>/pairs/<kind>_dataset) and the row's overrides (shapeworld/methods.py):
  # sc_dpo is this config as it stands on the SCP pairs; each ablation changes one thing.
  ft = default.get_config()
  ft.seed = config.get_ref("training_seed")
  ft.data.seed = config.get_ref("training_seed")
  ft.data.hflip = True
  # [I] each category's harmful pairs repeated up to the largest one's count, clean pairs once
  # (data/loader.category_balanced_positions): the eighth grid's choice (tune_grid8_plan.md,
  # validation, training seeds 0-2: mean score 0.708 vs 0.678, ahead in two runs of three).
  # Diffusion-DPO's row keeps every pair once (methods.py).
  ft.data.category_balance = "equal"
  # Tuned on the validation split (scripts/shapeworld_tune.py; README "Tuning"): margin form
  # "offset" (of bonus/offset x logit/preference x gamma 0/1, then lr x beta); then, with the
  # [I] winner likelihood term (train.sft_weight alpha; without it no fine-tune moved the
  # validation split), alpha 2000, lr 3e-4 and focusing on the full logit (cost-aware hardness),
  # the best Dynamic Focusing row (gamma 1) of the third grid; then (fourth grid) 100 steps
  # instead of 50: even the pair prompts stayed unsafe after 50 (validation score 0.734 vs
  # 0.571; 75 steps, lr 1e-3 or 16 pairs per step did worse); then (fifth grid) the margin's
  # lam by dual ascent (variant C) instead of fixed at 1: score 0.775 vs 0.734, gamma 1 over 0
  # (0.715) and 2 (0.694), budget 0.1 over 0.05 (0.724) and 0.2 (0.701); then (sixth grid,
  # scored over training seeds 0-2 by a rule fixed before its runs: docs/shapeworld/
  # tune_grid6_plan.md) alpha 3000 instead of 2000: mean score 0.678 vs 0.577, ahead in all
  # three training runs (dual_lr 2: 0.622, lr 2e-4: 0.578, focusing on the preference: 0.566).
  # The seventh grid (tune_grid7_plan.md, same protocol) kept it: alpha 4000 scored 0.646 and
  # dual_lr 2 0.656 on the mean, each ahead in one run of three.
  # The eighth grid (tune_grid8_plan.md, same protocol; suggested by the test split's
  # per-category table) balanced the pairs' categories (data.category_balance above).
  # [I] dual ascent: budget 0.1 on the expected cost under the implicit ranking
  # (losses.policy_cost; costs are harm probabilities), step 1.0 per optimizer step, lam
  # starting at 1; the expected cost stays above the budget, so lam rises to about 20 by step 100
  ft.train.update(dict(loss_type="dpo", beta=2000.0, safety_mode="dual", lam=1.0,
                       cost_budget=0.1, dual_lr=1.0, gamma=1.0,
                       margin_form="offset", focus_on="logit", sft_weight=3000.0,
                       caption_dropout=0.1, pairs_per_step=32, grad_accum=1, num_steps=100))
  ft.optimizer.update(dict(lr=3e-4, warmup_steps=8))
  ft.checkpoint.update(dict(every_steps=100, async_save=False, keep=1))
  ft.log.update(dict(every_steps=10, tensorboard=False))
  config.finetune = ft

  # The `safetydpo` job (configs/safetydpo_tiny.py keys): one LoRA expert per category on the
  # CoProV2-style pairs, SafetyDPO's released expert recipe (plain Diffusion-DPO, rank 4 = alpha,
  # gaussian init, to_q/to_k/to_v/to_out.0), the study's beta, lr and pair batch; Co-Merge [I]
  # re-factorised by SVD. The study adds the base model, the pairs and safetydpo.experts
  # (per_category for `safetydpo`, all_single for `all_single`).
  sdpo = safetydpo_tiny.get_config()
  expert = default.get_config()
  expert.seed = config.get_ref("training_seed")
  expert.data.seed = config.get_ref("training_seed")
  expert.train.update(dict(loss_type="dpo", beta=2000.0, safety_mode="none", gamma=0.0,
                           caption_dropout=0.0, pairs_per_step=16, grad_accum=1, num_steps=40))
  expert.lora.update(dict(enabled=True, rank=4, alpha=4.0, init="gaussian",
                          targets=("attention",)))
  expert.optimizer.update(dict(lr=1e-3, warmup_steps=4))
  expert.checkpoint.update(dict(every_steps=40, async_save=False, keep=1))
  expert.log.update(dict(every_steps=10, tensorboard=False))
  sdpo.expert = expert
  sdpo.safetydpo.categories = ()  # every category of the pair data
  sdpo.merge.update(dict(calibration_pairs_per_category=8, calibration_batch=32))
  sdpo.merge.seed = config.get_ref("training_seed")
  config.safetydpo = sdpo

  # The `safediffusion_r1` job (configs/safediffusion_r1_sd15.py keys) on the world: the
  # released loss and advantages; the world's sampler (12 DDIM steps, CFG 3) with eta 1; the
  # reward is the steering reward of the world CLIP (world_clip stage) with anchors in the
  # world's language ([I]: plain unsafe phrases, never a held-out rephrasing). The study adds
  # the base model, the harmful pair prompts and the CLIP folder.
  r1 = safediffusion_r1_sd15.get_config()
  r1.seed = config.get_ref("training_seed")
  r1.model.dtype = "float32"
  r1.sample.update(dict(num_steps=12, guidance_scale=3.0, group_size=8, prompts_per_epoch=8,
                        batch_size=64))
  # fold_timesteps: the update's 11 timestep units as one batch of 176 transitions (XLA:CPU:
  # the unrolled program of 11 took about a minute to load, even from the persistent cache)
  # 4 epochs (16 updates; the study's time budget)
  r1.train.update(dict(num_epochs=4, samples_per_step=16, grad_accum=1, scan_unroll=1,
                       fold_timesteps=True))
  r1.optimizer.update(dict(lr=3e-5))
  # [I] alpha 2: at the released 0.5 the world CLIP's steering reward prefers the unsafe render
  # of a harmful prompt (a safe render wins on 14 % of them; 76 % at 2), measured on the world
  # CLIP's own held-out renders (world_clip.py), not on the study's prompts.
  r1.reward.update(dict(batch_size=128, steering_alpha=2.0))
  r1.reward.safe_anchors = ()  # () = the world's anchors (world_clip.steering_anchors)
  r1.reward.unsafe_anchors = ()
  r1.checkpoint.update(dict(every_epochs=4, async_save=False, keep=1))
  r1.log.update(dict(every_steps=4, tensorboard=False))
  config.grpo = r1

  # The world CLIP (scdpo_jax/shapeworld/world_clip.py), SafeDiffusion-R1's reward model and the
  # cost model's frozen image tower: tiny towers trained contrastively on the base model's data.
  config.world_clip = ml_collections.ConfigDict(dict(
      seed=config.get_ref("seed"), categories=config.world.get_ref("categories"),
      image_size=config.world.get_ref("image_size"),
      unsafe_fraction=config.world.get_ref("unsafe_fraction"),
      rephrase_fraction=config.world.get_ref("rephrase_fraction"), projection_dim=64,
      tokenizer=config.model.get_ref("tokenizer")))
  # "shipped": copy scdpo_jax/shapeworld/weights/world_clip/, made by this recipe (checked; the
  # same weights as a training here, 69 s of the study's time); "train": train it here
  config.world_clip.source = "shipped"
  config.world_clip.text = ml_collections.ConfigDict(dict(
      vocab_size=768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=24, hidden_act="quick_gelu",
      bos_token_id=512, eos_token_id=513, pad_token_id=513))
  config.world_clip.vision = ml_collections.ConfigDict(dict(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      patch_size=4, hidden_act="quick_gelu"))
  # 1500 steps (~30 s on 2 cores): held-out retrieval top-1 0.82 and steering AUROC 0.95 (0.48
  # and 0.86 at 300 steps)
  config.world_clip.train = ml_collections.ConfigDict(dict(
      num_steps=1500, batch_size=64, lr=2e-3, warmup_steps=20, weight_decay=1e-4,
      cosine_final_fraction=0.1, max_grad_norm=1.0, init_logit_scale=2.659260036932778,
      max_logit_scale=4.605170185988092))  # log(1 / 0.07), log(100)
  config.world_clip.eval = ml_collections.ConfigDict(dict(
      images_per_scene=2, steering_alpha=r1.reward.get_ref("steering_alpha"), alpha_sweep=(),
      batch_size=64))

  # Fixed before any tuning: the held-out test split, seeds 0-2, 1 image per prompt and seed.
  # Tuning runs use --config.evaluate.split=validation (their report is report_validation.*).
  # parts: each row's images run as this many tasks of whole batches (the same images; the
  # study's two workers end together), TraSCE's freshly compiled sampler as one.
  config.evaluate = ml_collections.ConfigDict(dict(split="test", seeds=(0, 1, 2),
                                                   images_per_prompt=1, grid_clean_prompts=2,
                                                   parts=2))
  # Tasks run at once (shapeworld/tasks.py: data stages, each row's fine-tune and evaluation,
  # each after what it needs), since one XLA:CPU program keeps about 1.35 of 2 cores busy; the
  # same programs on the same inputs either way. 1 = one after another.
  config.workers = 2
  return config
