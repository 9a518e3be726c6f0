"""Euler sampling in the noise level sigma."""

from __future__ import annotations

import numpy as np

from pydiff.samplers.base import Sampler, StepCoefficients, vp
from pydiff.schedules import sigma_schedule


class Euler(Sampler):
    """Implements Algorithm 2 of Karras et al. (2022) without churn (Euler steps of the probability-flow ODE), as diffusers' EulerDiscreteScheduler.

    In diffusers' X = x / alpha: X' = X + (s' - s) (X - x0) / s; in x = alpha X that is
    x' = (sigma' / sigma) x + (alpha' - sigma' alpha / sigma) x0. The network sees x (diffusers'
    scaled input X / sqrt(s^2 + 1)) at diffusers' fractional timesteps.
    """

    name = "euler"
    family = "euler"  # sigma_schedule's

    def make_timesteps(self) -> np.ndarray:
        ts, self.sigmas = sigma_schedule(self.schedule, self.steps, self.family)
        return ts

    def _levels(self, i: int):
        """(s, s') of step i: the noise levels it leaves and reaches."""
        return float(self.sigmas[i]), float(self.sigmas[i + 1])

    def coefficients(self, i: int, depth: int | None = None) -> StepCoefficients:
        s, s_next = self._levels(i)
        alpha, sigma = vp(s)
        alpha_next, sigma_next = vp(s_next)
        ratio = s_next / s
        return StepCoefficients(
            t=float(self.timesteps[i]),
            alpha=alpha,
            sigma=sigma,
            c_x=alpha_next / alpha * ratio,
            c_x0=alpha_next * (1.0 - ratio),
            alpha_next=alpha_next,
            sigma_next=sigma_next,
        )
