"""SafeDiffusion-R1 (online GRPO with a CLIP steering reward) on Stable Diffusion 1.5: the
released recipe (MAXNORM8650/SafeDiffusion-R1@c26c4d9, scripts/run_train.sh + config/base.py).

  python main.py --config configs/safediffusion_r1_sd15.py --workdir runs/safediffusion_r1_sd15 \
      --config.model.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.data.prompts_file=/path/to/CoProv2_captions.txt \
      --config.reward.clip_folder=/path/to/clip-vit-large-patch14

Expected runtime: 300 epochs x (512 rollouts of 50 CFG steps + 16 updates of 32 trajectories x
49 transitions, forward + backward with CFG). The released run takes 8 GPUs; in our JAX port an
epoch is ~25.6k guided UNet forwards for sampling and ~25k guided forward/backward pairs for
the update, so plan on the order of 1-2 days on 8 H100-class chips; not measured here.

Recipe [C, released code]: prompts from assets/CoProv2_captions.txt; per epoch 32 prompts (4 per
GPU x 8) x G = 16 images (`num_generations`, launcher value; the config default is 4); 50 DDIM
steps, eta 1.0, guidance 5.0, empty negative prompt; one x_T for all rollouts of an epoch
(`global_input_latents`); reward r = <z_img, normalize(z_text + 0.5 v_safe)> with the compact
5 + 3 anchors; advantages (r - mean_g) / (std_g + 1e-8), unbiased std, clipped to +-2.5; PPO
clip 1e-4 on 49 of 50 transitions (the last dropped), shuffled per sample; minibatches of 4
consecutive samples per GPU (32 global), 1 inner epoch, so 16 optimizer steps per epoch; CFG in
the update; no KL term (the project page's "KL regularization" is not in the code: kl_coef 0);
AdamW lr 1e-5, betas (0.9, 0.999), wd 1e-4, eps 1e-8, grad-norm clip 1.0, no warmup; full UNet,
bf16; checkpoint every 20 epochs.
Differences [I]: the reward encoder is any local HF CLIP folder (the release uses HPSv2.1 =
OpenCLIP ViT-H-14 + HPS weights, which our towers do not load) on the float image (no JPEG round
trip); groups are per prompt over the global batch (the release normalises per GPU, which is the
same since a prompt's G images live on one GPU); a global minibatch is 32 consecutive samples (2
prompts) where the release's is 4 consecutive samples on each of 8 GPUs (8 prompts).
"""

import ml_collections

from configs import common
from configs import default


def tiny_pipeline() -> ml_collections.ConfigDict:
  """The one-block tiny SD pipeline of configs/scdpo_tiny.py (tests, CPU demos)."""
  tiny = default.tiny_pipeline_config()
  tiny.unet.update(dict(block_out_channels=(32,), layers_per_block=1, attention_head_dim=4,
                        down_block_types=("CrossAttnDownBlock2D",),
                        up_block_types=("CrossAttnUpBlock2D",)))
  return tiny


def tiny_reward_clip() -> ml_collections.ConfigDict:
  """A tiny random CLIP pair (tests / demos only: its rewards mean nothing)."""
  c = ml_collections.ConfigDict()
  c.text = ml_collections.ConfigDict(dict(
      vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, max_position_embeddings=32, projection_dim=16, bos_token_id=512,
      eos_token_id=513, pad_token_id=513))
  c.vision = ml_collections.ConfigDict(dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
      image_size=16, patch_size=8, projection_dim=16))
  return c


SAFE_ANCHORS = ("a safe", "a non-violent, non-sexual image", "a wholesome, PG-rated photo",
                "an image with no nudity, no gore, no weapons", "appropriate image")
UNSAFE_ANCHORS = ("explicit sexual content and nudity", "pornographic material",
                  "an image with naked people engaged in sexual acts")


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = "safediffusion_r1"
  config.seed = 42

  config.model = ml_collections.ConfigDict()
  config.model.pretrained = ""  # required: a diffusers-format SD1.5 folder
  config.model.tiny = None
  config.model.dtype = "bfloat16"  # compute dtype of the UNet / VAE / text encoder
  config.model.attention_impl = "xla"
  config.model.remat_policy = "none"
  config.model.text_layer = -1

  config.data = ml_collections.ConfigDict()
  config.data.prompts_file = ""  # .txt (one prompt per line) or .csv (prompt[,tag])
  config.data.prompts = ()  # or (prompt, tag) pairs here (tiny config)

  config.sample = ml_collections.ConfigDict()
  config.sample.num_steps = 50
  config.sample.eta = 1.0
  config.sample.guidance_scale = 5.0
  config.sample.group_size = 16  # G images per prompt (num_generations; launcher value)
  config.sample.prompts_per_epoch = 32  # global (4 per GPU x 8 GPUs released)
  config.sample.batch_size = 32  # rollouts per compiled sampler call (global)
  config.sample.noise_sharing = "batch"  # "none" | "group" | "batch" (released: one x_T/epoch)
  config.sample.ddpo_final_step = True  # last step uses abar_0 (ddpo-pytorch's clamp)
  config.sample.dtype = ""  # UNet compute dtype of the rollouts ("" = model.dtype)

  config.train = ml_collections.ConfigDict()
  config.train.num_epochs = 300
  config.train.samples_per_step = 32  # global minibatch of trajectories per optimizer step
  config.train.grad_accum = 1  # micro-batches per step (samples_per_step / grad_accum each)
  config.train.inner_epochs = 1
  config.train.timestep_fraction = 1.0  # K = int((num_steps - 1) * fraction) = 49 of 50
  config.train.shuffle_samples = False  # released: consecutive samples (same prompt)
  config.train.clip_range = 1e-4
  config.train.adv_clip_max = 2.5
  config.train.adv_eps = 1e-8
  config.train.kl_coef = 0.0  # KL(pi || pi_ref) penalty; 0 as in the released code
  config.train.cfg = True  # guidance in the update (released)
  config.train.dtype = ""  # UNet compute dtype of the update ("" = model.dtype)
  config.train.recompute_old_logprobs = False  # True: old log-probs from the update's program
  config.train.export_at_end = True
  # (micro-batch, timestep) units unrolled in the update's scan: 1 = a loop (GPU/TPU); on CPU,
  # XLA runs a UNet gradient inside a loop ~14x slower (measured: 88 s vs 6.3 s for 11 units of
  # the ShapeWorld UNet, one core), so CPU configs unroll every unit (longer compile, cached).
  config.train.scan_unroll = 1
  # True: a micro-batch's timestep units as one batch (K times the memory of one unit; on
  # XLA:CPU one UNet gradient in the program instead of K unrolled ones: seconds to compile)
  config.train.fold_timesteps = False

  config.reward = ml_collections.ConfigDict()
  config.reward.terms = (("steering", 1.0),)  # (name, weight): steering | clip_score | cost
  config.reward.clip_folder = ""  # a local HF CLIPModel folder
  config.reward.clip_dtype = "float32"
  config.reward.steering_alpha = 0.5
  config.reward.safe_anchors = SAFE_ANCHORS
  config.reward.unsafe_anchors = UNSAFE_ANCHORS
  config.reward.cost_model = ""  # a cost_model job workdir, for the "cost" term (-C)
  config.reward.batch_size = 32
  config.reward.tiny_clip = None  # tiny config only: random towers when clip_folder is ""

  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-5, scale_lr=False, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
      warmup_steps=0, schedule="constant", cosine_final_fraction=0.0, max_grad_norm=1.0))

  config.lora = ml_collections.ConfigDict(dict(  # released: use_lora=False (full UNet)
      enabled=False, rank=4, alpha=4.0, init="gaussian",
      dropout=0.0,  # must stay 0 (deterministic policy)
      targets=("attention",)))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = common.SHARDING_RULES

  config.checkpoint = ml_collections.ConfigDict(dict(every_epochs=20, keep=3, async_save=True))
  config.log = ml_collections.ConfigDict(dict(every_steps=1, tensorboard=True))

  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ""
  config.distributed.num_processes = 1
  config.distributed.process_id = 0
  config.distributed.auto = False

  config.resume = ml_collections.ConfigDict()
  config.resume.allow_changes = ""
  return config
