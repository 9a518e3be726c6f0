"""Beta schedules in diffusers' vocabulary (NumPy float64), for training-time noising."""
from __future__ import annotations

import math

import numpy as np


def betas_for(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
              beta_start: float = 0.0001, beta_end: float = 0.02) -> np.ndarray:
    """float64 [T] betas; `squaredcos_cap_v2` is Nichol & Dhariwal (2021) eq. 17, capped at 0.999."""
    T = num_train_timesteps
    if beta_schedule == "squaredcos_cap_v2":
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=np.float64)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}")


def alphas_cumprod(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2") -> np.ndarray:
    """float64 [T] products of (1 - beta)."""
    return np.cumprod(1.0 - betas_for(num_train_timesteps, beta_schedule))
