"""SafeDiffusion-R1: online GRPO post-training (rollouts with log-probabilities, CLIP steering
rewards, group-relative advantages, PPO-clip update, the `safediffusion_r1` job)."""
