"""Latent Consistency Model multistep sampling."""

from __future__ import annotations

import numpy as np

from pydiff.samplers.base import Sampler, StepCoefficients, sqrt
from pydiff.schedules import lcm_timesteps

SIGMA_DATA = 0.5  # the consistency models' sigma_data (Song et al. 2023, App. C), diffusers' fixed value


class LCM(Sampler):
    """Implements Algorithm 3 (multistep latent consistency sampling) of Luo et al. (2023), "Latent Consistency Models", as diffusers' LCMScheduler.

    The consistency function f(x, t) = c_skip(t) x + c_out(t) x0 with the boundary-condition scalings
    c_skip = s_d^2 / ((k t)^2 + s_d^2), c_out = k t / sqrt((k t)^2 + s_d^2) (k = timestep_scaling,
    s_d = 0.5); between steps f is noised again to the next timestep, x_{t'} = sqrt(abar_t') f +
    sqrt(1 - abar_t') z, and the last step returns f. The timesteps are `steps` of the
    `original_inference_steps` distillation timesteps k' - 1, 2 k' - 1, ... (k' = T // original steps).
    """

    name = "lcm"

    def make_timesteps(self) -> np.ndarray:
        return lcm_timesteps(self.schedule, self.steps)

    def scalings(self, t: int) -> tuple[float, float]:
        """(c_skip, c_out) at training timestep t (the consistency model's boundary condition f(x, 0) = x)."""
        st = t * float(self.schedule.timestep_scaling)
        c_skip = SIGMA_DATA**2 / (st * st + SIGMA_DATA**2)
        c_out = st / (st * st + SIGMA_DATA**2) ** 0.5
        return c_skip, c_out

    def coefficients(self, i: int, depth: int | None = None) -> StepCoefficients:
        ts, abar = self.timesteps, self.alphas_cumprod
        t = int(ts[i])
        a_t = float(abar[t])
        c_skip, c_out = self.scalings(t)
        c = StepCoefficients(t=t, alpha=sqrt(a_t), sigma=sqrt(1.0 - a_t), c_x=c_skip, c_x0=c_out)
        if i + 1 < len(ts):  # noised again to the next timestep
            a_next = float(abar[int(ts[i + 1])])
            c.alpha_next, c.sigma_next = sqrt(a_next), sqrt(1.0 - a_next)
            c.c_x, c.c_x0, c.c_noise = c.alpha_next * c_skip, c.alpha_next * c_out, c.sigma_next
        return c
