"""LoRA fine-tuning: adapters over the parameter trees (`adapters`: target rules, init, merge,
the dropout branch), diffusers / peft LoRA files (`io`), the LoRA train step and export
(`train`), merging experts (`merge`: Co-Merge reconstruction, averaging) and the SafetyDPO job
(`safetydpo`: one expert per category -> merge -> export). Imports `scdpo_jax.models` and
`scdpo_jax.train` (`safetydpo` runs the train job per expert); `train.state` / `train.loop`
import `adapters` (and `train` lazily); nothing in `models` imports this package."""
