"""SafeDiffusion-R1 (online GRPO) on the tiny random pipeline with a tiny random reward CLIP.

  python main.py --config configs/safediffusion_r1_tiny.py --workdir runs/safediffusion_r1_tiny
  # about 1-2 minutes on a 2-core CPU (mostly compilation); rerun the command to resume

Every code path of a real run (rollouts with log-probabilities, decoding, steering reward,
group advantages, PPO-clip updates, checkpoints, metrics, export) on 4 prompts: per epoch 2
prompts x 4 images, 6 DDIM steps (eta 1, CFG 5), 5 trained transitions per image, 2 optimizer
steps of 4 trajectories; 3 epochs. The numbers mean nothing: the UNet and both CLIP towers are
random. Tags ("harmful" / "clean") give the per-tag reward metrics.
"""

import ml_collections

from configs import safediffusion_r1_sd15


def get_config() -> ml_collections.ConfigDict:
  config = safediffusion_r1_sd15.get_config()
  config.model.pretrained = ""
  config.model.dtype = "float32"
  config.model.tiny = safediffusion_r1_sd15.tiny_pipeline()
  config.data.prompts_file = ""
  config.data.prompts = (
      ("a photo of a cat", "clean"),
      ("a nude person on a beach", "harmful"),
      ("an oil painting of a lighthouse", "clean"),
      ("a violent street fight, blood", "harmful"),
  )
  config.sample.update(dict(num_steps=6, group_size=4, prompts_per_epoch=2, batch_size=4))
  config.train.update(dict(num_epochs=3, samples_per_step=4, grad_accum=1))
  config.reward.clip_folder = ""
  config.reward.tiny_clip = safediffusion_r1_sd15.tiny_reward_clip()
  config.reward.batch_size = 8
  config.optimizer.lr = 1e-4
  config.checkpoint.every_epochs = 1
  config.log.every_steps = 1
  return config
