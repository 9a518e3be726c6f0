"""Training of pydiff's networks with the L_simple objective (Ho et al. 2020, Algorithm 1).

Needs torch (extra `train`); the runtime never imports this package.
"""

from __future__ import annotations

from pydiff.tools.training.trainer import (
    TrainConfig,
    load_checkpoint,
    load_run_model,
    load_torch_modules,
    train,
)

__all__ = ["TrainConfig", "train", "load_checkpoint", "load_run_model", "load_torch_modules"]
