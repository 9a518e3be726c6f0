"""DPM-Solver++ 2M."""

from __future__ import annotations

import math

import numpy as np

from pydiff.samplers.base import Sampler, StepCoefficients


class DPMSolverPP2M(Sampler):
    """Implements Algorithm 2 (DPM-Solver++(2M), data prediction) of Lu et al. (2022), as diffusers' DPMSolverMultistepScheduler.

    First order at the first step (no history) and at the last (the final sigma is zero, so the
    step returns x0); midpoint second order in between:
    x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) (D0 + D1 / 2), D1 = (D0 - D_prev) / r.
    """

    name = "dpmpp_2m"
    uses_x0_history = True

    def __init__(self, schedule, steps, **kwargs):
        super().__init__(schedule, steps, **kwargs)
        abar = self.alphas_cumprod.astype(np.float32)  # diffusers keeps these in float32
        sig = ((1 - abar) / abar) ** 0.5
        sig = np.interp(self.timesteps, np.arange(len(sig)), sig)
        self.sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)

    def _alpha_sigma(self, k: int):
        s = float(self.sigmas[k])
        alpha = 1.0 / math.sqrt(s * s + 1.0)
        return alpha, s * alpha

    def coefficients(self, i: int) -> StepCoefficients:
        alpha_s, sigma_s = self._alpha_sigma(i)
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        c = StepCoefficients(
            t=int(self.timesteps[i]), alpha=alpha_s, sigma=sigma_s, alpha_next=alpha_t, sigma_next=sigma_t
        )
        if sigma_t == 0.0:  # the last step: lambda_t = +inf, exp(-h) = 0, x_t = x0
            c.c_x0 = 1.0
            return c
        lam_s = math.log(alpha_s) - math.log(sigma_s)
        lam_t = math.log(alpha_t) - math.log(sigma_t)
        h = lam_t - lam_s
        c.c_x = sigma_t / sigma_s
        c.c_x0 = -alpha_t * (math.exp(-h) - 1.0)
        if i > 0:  # second order: needs the previous step's x0
            alpha_p, sigma_p = self._alpha_sigma(i - 1)
            r0 = (lam_s - (math.log(alpha_p) - math.log(sigma_p))) / h
            c.c_d = 0.5 * c.c_x0 / r0
        return c
