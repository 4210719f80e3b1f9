"""LoRA fine-tuning: adapters over the parameter trees (`adapters`: target rules, init, merge,
the dropout branch), diffusers / peft LoRA files (`io`), the LoRA train step and export
(`train`), and merging experts (`merge`: Co-Merge reconstruction, averaging). Imports
`scdpo_jax.models` and `scdpo_jax.train.step`; `train.state` / `train.loop` import `adapters`
(and `train` lazily); nothing in `models` imports this package."""
