"""Alias of :mod:`chinese_clip_jax.training.evaluator` (the module's former name)."""

from .evaluator import Evaluator  # noqa: F401
