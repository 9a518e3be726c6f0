"""Heun's second-order sampling."""

from __future__ import annotations

import numpy as np

from pydiff.samplers.base import StepCoefficients, vp
from pydiff.samplers.euler import Euler


class Heun(Euler):
    """Implements Algorithm 1 (Heun's 2nd order method, deterministic) of Karras et al. (2022), as diffusers' HeunDiscreteScheduler.

    Two network evaluations per noise level, as diffusers lays them out: timesteps t0, t1, t1, t2,
    t2, ..., an Euler step s -> s' (even steps) and, at s', the correction (odd steps)
    X'' = X + dt/2 (d + d') = X' + dt/2 (d' - d). With X' = X + dt d, d = (X' - x0_prev) / s' and
    d' = (X' - x0) / s', so the correction is x'' = x' - alpha' dt / (2 s') (x0 - x0_prev): the
    fused step's x0 history. The last level steps to sigma 0 with Euler alone.
    """

    name = "heun"
    uses_x0_history = True
    network_evals_per_step = 2

    def make_timesteps(self) -> np.ndarray:
        ts, sig = super().make_timesteps(), self.sigmas
        self.sigmas = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])
        return np.concatenate([ts[:1], np.repeat(ts[1:], 2)])

    def coefficients(self, i: int, depth: int | None = None) -> StepCoefficients:
        if i % 2 == 0:
            return super().coefficients(i)
        s_prev, s = float(self.sigmas[i - 1]), float(self.sigmas[i])
        alpha, sigma = vp(s)
        return StepCoefficients(
            t=float(self.timesteps[i]),
            alpha=alpha,
            sigma=sigma,
            c_x=1.0,
            c_d=-alpha * (s - s_prev) / (2.0 * s),
            alpha_next=alpha,
            sigma_next=sigma,
        )
