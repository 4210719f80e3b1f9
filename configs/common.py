"""Literal data shared by several configs (configs import no library code).

`SHARDING_RULES` are the default logical axis -> mesh axes rules of every job with a mesh
(`config.sharding_rules`); they equal `scdpo_jax.parallel.DEFAULT_RULES`, the rules library
callers get without a config (a test checks that the two agree).
"""

SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("kv_length", None),
    ("height", None),
    ("width", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("norm", None),
)
