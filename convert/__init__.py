"""`python -m convert`: thin CLI over chinese_clip_jax.conversion."""
