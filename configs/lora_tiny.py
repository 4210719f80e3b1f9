"""LoRA SC-DPO on the tiny random pipeline: configs/scdpo_tiny.py with adapters (CPU, ~1 min).

  python main.py --config configs/lora_tiny.py --workdir runs/lora_tiny

Trains rank-4 LoRA adapters on the attention projections of the frozen base (the DPO reference
is the base itself) and writes export/lora/pytorch_lora_weights.safetensors (diffusers'
`load_lora_weights`) and export/unet (the base with the LoRA fused). The numbers mean nothing:
the base model and the pairs are random.
"""

from configs import scdpo_tiny


def get_config():
  config = scdpo_tiny.get_config()
  config.lora.enabled = True
  config.lora.rank = 4
  config.lora.alpha = 4.0
  config.lora.init = "gaussian"
  config.optimizer.lr = 1e-3  # adapters start at B = 0 and need a larger lr than full weights
  return config
