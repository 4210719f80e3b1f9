"""scdpo-jax: Safety-Constrained Direct Preference Optimization for text-to-image diffusion in JAX."""

__version__ = "0.1.0"
