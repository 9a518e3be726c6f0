"""DPM-Solver++ 2M."""

from __future__ import annotations

import math

import numpy as np

from pydiff.samplers.base import Sampler, StepCoefficients, vp
from pydiff.schedules import sigma_schedule


class DPMSolverPP2M(Sampler):
    """Implements Algorithm 2 (DPM-Solver++(2M), data prediction) of Lu et al. (2022), as diffusers' DPMSolverMultistepScheduler.

    First order at the first step (no history) and at the last (the final sigma is zero, so the
    step returns x0); midpoint second order in between:
    x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) (D0 + D1 / 2), D1 = (D0 - D_prev) / r.
    solver_type 'heun' weighs D1 by alpha_t ((e^{-h} - 1) / h + 1) instead; the schedule's
    use_*_sigmas, final_sigmas_type, lower_order_final and euler_at_final act as in diffusers.
    """

    name = "dpmpp_2m"
    uses_x0_history = True
    order = 2  # the highest order this sampler takes (solver_order may lower it)
    stochastic = False  # sde-dpmsolver++ (DPMSolverPP2MSDE)

    def __init__(self, schedule, steps, **kwargs):
        order = schedule.solver_order
        if order is not None and order not in ((1, 2) if self.order == 2 else (3,)):
            raise ValueError(
                f"the schedule's solver_order={order} is not {self.name}'s (dpmpp_2m and dpmpp_2m_sde: "
                f"1 or 2; dpmpp_3m: 3)"
            )
        self.solver_order = order or self.order
        self.heun = schedule.solver_type == "heun"
        super().__init__(schedule, steps, **kwargs)

    def make_timesteps(self) -> np.ndarray:
        ts, self.sigmas = sigma_schedule(self.schedule, self.steps, "dpm")
        return ts.astype(np.int64)

    def _alpha_sigma(self, k: int):
        return vp(self.sigmas[k])

    def _lam(self, k: int) -> float:
        alpha, sigma = self._alpha_sigma(k)
        return math.log(alpha) - math.log(sigma)

    def step_order(self, i: int, depth: int | None = None) -> int:
        """The order of step i with `depth` previous x0 (diffusers' lower_order_final rules)."""
        n, s = len(self.timesteps), self.schedule
        depth = i if depth is None else min(depth, i)
        final = i == n - 1 and (
            s.euler_at_final or (s.lower_order_final and n < 15) or float(self.sigmas[i + 1]) == 0.0
        )
        second = i == n - 2 and s.lower_order_final and n < 15
        if self.solver_order == 1 or depth < 1 or final:
            return 1
        if self.solver_order == 2 or depth < 2 or second:
            return 2
        return 3

    def coefficients(self, i: int, depth: int | None = None) -> StepCoefficients:
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
        if h == 0.0:  # a repeated sigma (a spaced schedule's sigma_min twice): x stays
            c.c_x = 1.0
            return c
        order = self.step_order(i, depth)
        if self.stochastic:
            c.c_x = sigma_t / sigma_s * math.exp(-h)
            c.c_x0 = alpha_t * (1.0 - math.exp(-2.0 * h))
            c.c_noise = sigma_t * math.sqrt(1.0 - math.exp(-2.0 * h))
            w1 = alpha_t * ((1.0 - math.exp(-2.0 * h)) / (-2.0 * h) + 1.0) if self.heun else 0.5 * c.c_x0
        else:
            c.c_x = sigma_t / sigma_s
            c.c_x0 = -alpha_t * (math.exp(-h) - 1.0)
            w1 = alpha_t * ((math.exp(-h) - 1.0) / h + 1.0) if self.heun else 0.5 * c.c_x0
        if order == 1:
            return c
        r0 = (lam_s - self._lam(i - 1)) / h
        if order == 2:  # x_t += w1 D1, D1 = (D0 - D_prev) / r0
            c.c_d = w1 / r0 if self.heun else 0.5 * c.c_x0 / r0
            return c
        # third order (DPM-Solver++(3M)): D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1),
        # D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1: linear in m0 - m1 (c_d) and m1 - m2 (c_d2)
        r1 = (self._lam(i - 1) - self._lam(i - 2)) / h
        b = alpha_t * ((math.exp(-h) - 1.0) / h + 1.0)
        e = alpha_t * ((math.exp(-h) - 1.0 + h) / h**2 - 0.5)
        c.c_d = (b * (1.0 + r0 / (r0 + r1)) - e / (r0 + r1)) / r0
        c.c_d2 = (e - b * r0) / (r1 * (r0 + r1))
        return c
