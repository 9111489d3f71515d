"""Sharded contrastive training: state, optimizer, train step, checkpoints and the loop."""

from .optim import decay_mask, make_optimizer, make_schedule
from .state import TrainState, create_train_state
from .step import make_embed_fn, make_train_step

__all__ = [
    "TrainState",
    "create_train_state",
    "decay_mask",
    "make_embed_fn",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
]
