"""Check a Stable Diffusion folder end to end (text encoder -> UNet -> VAE) with our Flax models.

  python main.py --config configs/inspect.py --workdir runs/inspect   # ~30 s on a 2-core CPU

Without `model.pretrained` it builds a tiny random pipeline of our own model classes, exports it
in diffusers format and loads it back. Point it at a real checkpoint with
`--config.model.pretrained=/path/to/stable-diffusion-v1-5` (needs a GPU/TPU for SD-sized models).
"""

import ml_collections

from configs.default import tiny_pipeline_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = "inspect"
  config.seed = 0
  config.prompts = ("a photo of a cat", "a red square on a blue background")
  config.model = ml_collections.ConfigDict()
  config.model.pretrained = ""  # a diffusers-format SD folder; "" = tiny random pipeline
  config.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
  config.model.attention_impl = "xla"  # "xla" | "cudnn" | "auto"
  config.model.tiny = tiny_pipeline_config()
  return config
