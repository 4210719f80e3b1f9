"""Defaults of every training config: SC-DPO (margin form) on a Stable Diffusion UNet.

  python main.py --config configs/default.py --workdir runs/default   # ~1 min on a 2-core CPU

On its own this trains the tiny random pipeline below on random in-memory pairs (a smoke run of
the real code paths). Real runs use a derived config (configs/scdpo_sd15.py) that overrides
these keys. Conventions: beta is the public Diffusion-DPO code's (z = -0.5*beta*((m_w - m_l) -
(r_w - r_l)), beta = 5000 for SD1.5; diffusers' LoRA port calls the same thing beta = 2500).
Unknown keys given on the command line are rejected.
"""

import ml_collections

from configs import common


def tiny_pipeline_config() -> ml_collections.ConfigDict:
  """Tiny SD1-style components (diffusers config.json keys)."""
  c = ml_collections.ConfigDict()
  c.unet = ml_collections.ConfigDict(dict(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
  c.vae = ml_collections.ConfigDict(dict(
      in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
      latent_channels=4, norm_num_groups=32, sample_size=16, scaling_factor=0.18215,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))
  c.text_encoder = ml_collections.ConfigDict(dict(
      vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=32, hidden_act="quick_gelu",
      bos_token_id=512, eos_token_id=513, pad_token_id=513))
  c.scheduler = ml_collections.ConfigDict(dict(
      _class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085,
      beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
      clip_sample=False, set_alpha_to_one=False, steps_offset=1))
  return c


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = "train"
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.pretrained = ""  # diffusers-format SD folder; "" = tiny random pipeline (tests)
  config.model.dtype = "float32"  # compute dtype; "bfloat16" on GPU/TPU
  config.model.ref_param_dtype = "float32"  # frozen reference UNet storage; "bfloat16" on GPU/TPU
  config.model.ref_dtype = ""  # reference UNet compute dtype; "" = model.dtype
  config.model.attention_impl = "xla"  # "xla" | "cudnn" | "auto"
  config.model.remat_policy = "none"  # "none" | "block" | "dots_saveable" | "nothing_saveable"
  config.model.text_layer = -1  # text-encoder layer the UNet is conditioned on (-1 = last)
  config.model.tiny = tiny_pipeline_config()

  config.data = ml_collections.ConfigDict()
  config.data.source = "memory_random"  # "memory_random" | "tfds"
  config.data.num_pairs = 64  # memory_random only
  config.data.harmful_fraction = 0.5  # memory_random only
  config.data.seed = 0
  config.data.hflip = True
  config.data.name = ""  # tfds: dataset name (builder) or folder
  config.data.data_dir = ""  # tfds: data_dir holding the prepared ArrayRecord files
  config.data.split = "train"
  config.data.nan_cost = "zero"  # tfds: unknown (NaN) costs -> 0 = no margin, logged | "error"
  # tfds: "none" | "equal" (each category of categorised pairs repeated up to the largest
  # one's count; uncategorised pairs once; data/loader.category_balanced_positions) [I]
  config.data.category_balance = "none"

  config.train = ml_collections.ConfigDict()
  config.train.loss_type = "dpo"  # "dpo" | "sft" (winner MSE only)
  config.train.beta = 5000.0
  config.train.safety_mode = "margin"  # "none" | "relabel" (A) | "margin" (B) | "dual" (C)
  config.train.lam = 1.0  # lambda: weight of the safety cost (initial value in "dual")
  # margin form: "offset" z - lam (C_l - C_w) (SafeDPO-style; moves harmful pairs more than plain
  # DPO; the ShapeWorld study's validation choice) | "bonus" z + lam (C_l - C_w) (the first [I]
  # form; moves them LESS, see README)
  config.train.margin_form = "offset"
  config.train.cost_budget = 0.0  # "dual": target expected cost d
  config.train.dual_lr = 0.0  # "dual": dual ascent step size
  config.train.lam_max = 1e4
  config.train.gamma = 0.0  # Dynamic Focusing exponent; 0 = plain DPO
  config.train.gamma_start = 0.0  # gamma ramps linearly from here ...
  config.train.gamma_ramp_steps = 0  # ... over this many steps (0 = fixed gamma)
  config.train.focus_normalize = True  # divide by sum of focusing weights (else by pairs)
  # [I] what Dynamic Focusing measures hardness on: "preference" (the DPO logit without the
  # margin; the ShapeWorld study's validation choice without the winner term) | "logit" (z with
  # the cost margin: cost-aware hardness; the study's choice with the winner term, sft_weight)
  config.train.focus_on = "preference"
  # Diffusion-SDPO winner-preserving safeguard (AIDC-AI/Diffusion-SDPO, arXiv 2511.03317) on any
  # loss_type "dpo" config: the loser's gradient is scaled by a detached lambda in [0, 1] per
  # micro-batch; mu in [0, 1] is its margin. 0 = off (the default; the official mu = 0, "on with
  # no margin", is not selectable). Released launchers: SD1.5 Diffusion-DPO 0.9, SDXL 0.6.
  config.train.sdpo_mu = 0.0
  # [I] winner likelihood term: loss_type "dpo" + alpha * mean(m_w), the winners' denoising MSE,
  # outside the focusing weights (losses.focused_dpo_sft_loss: "maximize the likelihood of
  # preferred samples"); DPO's own pull on m_w is 0.5 beta sigma(-z), so alpha = 0.5 beta
  # matches it at z = 0. 0 = off (plain Diffusion-DPO / SC-DPO).
  config.train.sft_weight = 0.0
  config.train.caption_dropout = 0.2  # fraction of pairs trained on the empty prompt
  config.train.pairs_per_step = 8  # global (effective) batch of pairs per optimizer step
  config.train.grad_accum = 1  # micro-batches per step (pairs_per_step / grad_accum each)
  config.train.num_steps = 20
  config.train.export_at_end = True  # write <workdir>/export/unet in diffusers format

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"  # "adamw" | "adafactor"
  config.optimizer.lr = 1e-5
  config.optimizer.scale_lr = False  # lr *= pairs_per_step (Diffusion-DPO's --scale_lr)
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 1e-2
  config.optimizer.warmup_steps = 5
  config.optimizer.schedule = "constant"  # "constant" | "cosine" (after warmup)
  config.optimizer.cosine_final_fraction = 0.0
  config.optimizer.max_grad_norm = 1.0  # 0 = no clipping

  # LoRA fine-tuning (scdpo_jax/lora/): the state trains only adapters W + (alpha/rank) A @ B on
  # the frozen base, which is also the DPO reference (one copy in memory); the optimizer state
  # holds only the adapters. Exports export/lora/pytorch_lora_weights.safetensors (diffusers'
  # load_lora_weights) and export/unet (the base with the LoRA fused).
  config.lora = ml_collections.ConfigDict()
  config.lora.enabled = False
  config.lora.rank = 4
  config.lora.alpha = 4.0  # scale alpha / rank, as peft's lora_alpha
  config.lora.init = "gaussian"  # "gaussian" (peft's: A ~ N(0, 1/r^2), B = 0) | "kaiming"
  config.lora.dropout = 0.0  # on the LoRA branch input (peft lora_dropout); 0 = merged weights
  # Which kernels get adapters: regular expressions (re.fullmatch on module paths such as
  # down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q) or preset names: "attention"
  # (to_q/to_k/to_v/to_out.0, the Diffusion-DPO / SafetyDPO recipe), "feed_forward", "proj",
  # "resnet_conv".
  config.lora.targets = ("attention",)
  # Adapters on the CLIP text encoder too (SD 1.x/2.x; needs lora.dropout = 0): rules over its
  # module paths (text_model/encoder/layers_0/self_attn/q_proj) or presets "attention"
  # (q/k/v/out_proj of every layer, diffusers' train_dreambooth_lora) and "mlp" (fc1/fc2).
  # Empty: UNet only. With targets, the policy's text states are computed in the step through the
  # adapted encoder (the reference keeps the base's); the exports add text_encoder.* LoRA keys
  # and export/text_encoder (the base text encoder with its LoRA fused).
  config.lora.text_encoder_targets = ()

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1: all remaining devices
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  config.sharding_rules = common.SHARDING_RULES  # logical axis -> mesh axes

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 10
  config.checkpoint.keep = 3
  config.checkpoint.async_save = True

  config.log = ml_collections.ConfigDict()
  config.log.every_steps = 5
  config.log.tensorboard = True
  config.log.peak_flops_per_device = 0.0  # 0 = look up the device kind

  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ""  # "host:port" -> jax.distributed.initialize(...)
  config.distributed.num_processes = 1
  config.distributed.process_id = 0
  config.distributed.auto = False  # jax.distributed.initialize() with auto-detection (pods)

  # Resume safety (scdpo_jax/train/resume.py): a rerun on a workdir must match the run that wrote
  # it, except train.num_steps, train.export_at_end, log.*, checkpoint.every_steps/keep/
  # async_save, mesh.*, distributed.*, sharding_rules, model.attention_impl, model.remat_policy.
  config.resume = ml_collections.ConfigDict()
  config.resume.allow_changes = ""  # experts: comma-separated keys (or 'prefix.') to accept
  return config
