"""Safety cost model: frozen CLIP image tower + trainable adapter (method.md section 2.3)."""

from scdpo_jax.cost_model.scorer import CostModelScorer

__all__ = ["CostModelScorer"]
