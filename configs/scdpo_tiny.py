"""SC-DPO on a tiny random pipeline and random in-memory pairs: the whole trainer on a CPU.

  python main.py --config configs/scdpo_tiny.py --workdir runs/scdpo_tiny   # ~1 min, 2-core CPU

Exercises every code path of a real run (loading a diffusers folder, sharded state, the jitted
step with gradient accumulation, focusing, cost margin, checkpoints, metrics, export) in about a
minute. The numbers it prints mean nothing: the base model and the pairs are random.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.tiny.unet.update(dict(
      block_out_channels=(32,), layers_per_block=1, attention_head_dim=4,
      down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)))
  config.data.num_pairs = 64
  config.train.update(dict(gamma=1.0, pairs_per_step=16, grad_accum=2, num_steps=40))
  config.checkpoint.every_steps = 20
  config.log.every_steps = 10
  return config
