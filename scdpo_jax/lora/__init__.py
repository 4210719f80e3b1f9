"""LoRA fine-tuning: adapters over the parameter trees (`adapters`: target rules, init, merge,
the dropout branch), diffusers / peft LoRA files (`io`), the LoRA train step and export
(`train`), LoRA on the CLIP text encoder too (`text_encoder`: the {"unet", "text_encoder"}
tree, the policy's text states in the step), merging experts (`merge`: Co-Merge
reconstruction, averaging) and the SafetyDPO job (`safetydpo`: one expert per category -> merge
-> export). Imports `scdpo_jax.models`, `scdpo_jax.data.batch` and `scdpo_jax.train`
(`safetydpo` runs the train job per expert); `train.state` / `train.loop` import `adapters` and
`text_encoder` (and `train` lazily); nothing in `models` imports this package."""
