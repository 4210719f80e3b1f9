"""SafeDiffusion-R1: online GRPO post-training (`rollout`: the eta = 1 DDIM sampler that keeps
latents and log-probabilities; `rewards`: CLIP steering reward, CLIP score, cost model;
`losses`: log-density, group advantages, PPO-clip, KL as pure functions; `update`: the
optimizer step; `job`: the `safediffusion_r1` job). Imports `scdpo_jax.models`, `sampling`,
`lora`, `cost_model` and the trainer's machinery in `scdpo_jax.train` (state, checkpoints,
resume, metrics); nothing else in the package imports it except the job registry."""
