"""Training of pydiff's networks with the L_simple objective (Ho et al. 2020, Algorithm 1).

Needs torch (extra `train`); the runtime never imports this package. `pydiff.training.eval`
(the evaluators) does not need torch.
"""
from __future__ import annotations

__all__ = ["TrainConfig", "train", "load_checkpoint", "load_run_model"]


def __getattr__(name):  # lazy, so that `pydiff.training.eval` works without torch
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
