"""LoRA fine-tuning: adapters over the parameter trees (`adapters`), diffusers / peft LoRA files
(`io`) and the LoRA train step (`train`). Imports `scdpo_jax.models` and `scdpo_jax.train.step`;
nothing in `models` imports it."""
