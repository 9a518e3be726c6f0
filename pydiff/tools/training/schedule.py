"""The noise schedule for training-time noising: the sampler's own (pydiff.Schedule), so that a
network is trained on exactly the alpha-bars it is later sampled with."""

from __future__ import annotations

import numpy as np

from pydiff.schedules import Schedule


def alphas_cumprod(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2") -> np.ndarray:
    """float64 [T] products of (1 - beta), diffusers' betas (pydiff.Schedule.alphas_cumprod)."""
    return Schedule(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule).alphas_cumprod
