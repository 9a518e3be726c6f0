"""Euler ancestral sampling."""

from __future__ import annotations

import math

from pydiff.samplers.base import StepCoefficients, vp
from pydiff.samplers.euler import Euler


class EulerAncestral(Euler):
    """Implements k-diffusion's sample_euler_ancestral (Euler step to sigma_down, then fresh noise sigma_up; Karras et al. 2022, Sec. 4), as diffusers' EulerAncestralDiscreteScheduler.

    sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2), sigma_down = sqrt(s'^2 - sigma_up^2);
    X' = X + (sigma_down - s) (X - x0) / s + sigma_up z, stepped in x = alpha X.
    """

    name = "euler_ancestral"

    def coefficients(self, i: int, depth: int | None = None) -> StepCoefficients:
        s, s_next = self._levels(i)
        alpha, sigma = vp(s)
        alpha_next, sigma_next = vp(s_next)
        up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        down = math.sqrt(s_next**2 - up**2)
        ratio = down / s
        return StepCoefficients(
            t=float(self.timesteps[i]),
            alpha=alpha,
            sigma=sigma,
            c_x=alpha_next / alpha * ratio,
            c_x0=alpha_next * (1.0 - ratio),
            c_noise=alpha_next * up,
            alpha_next=alpha_next,
            sigma_next=sigma_next,
        )
