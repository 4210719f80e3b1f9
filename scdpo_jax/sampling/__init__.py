"""Samplers and training-free guards for our Flax Stable Diffusion.

  samplers.py  DDIM / DPM-Solver++ 2M as one `lax.scan` over a host-precomputed step plan
               (`make_plan`, `run_sampler`), per-image keys (`sample_keys`, `initial_noise`)
  guards.py    classifier-free guidance, negative prompting, TraSCE, Safe Latent Diffusion and
               SAFREE as one guided denoiser (`GuardConfig`, `trasce_guard`, `sld_guard`,
               `safree_guard`, `guard_preset`, `guided_denoiser`)
  safree.py    SAFREE's prompt-state filtering (toxic subspace, trigger tokens, projection,
               self-validating step window), transcribed from the official code
  generate.py  `TextToImage`: text encoder -> guided sampler -> VAE decode in one jitted program,
               batch-sharded over a mesh under the logical axis rules; `with_unet_params` swaps
               in other UNet weights (a fine-tune) without recompiling

May import: jax, flax, numpy, `scdpo_jax.models`, `scdpo_jax.parallel`. Not data/, train/,
evaluation/, cost_model/, shapeworld/ (they import from here), nor configs/.
"""
