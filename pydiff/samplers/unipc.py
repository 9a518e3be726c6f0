"""UniPC: the unified predictor-corrector multistep solver."""

from __future__ import annotations

import math

import numpy as np

from pydiff.samplers.base import Sampler, StepCoefficients, vp
from pydiff.schedules import sigma_schedule

# diffusers' UniPCMultistepScheduler takes DPM-Solver's and DEIS's solver types as bh2
_AS_BH2 = ("midpoint", "heun")


class UniPC(Sampler):
    """Implements multistep UniPC (the UniP-p predictor and the UniC-p corrector, B(h) = h (bh1) or e^h - 1 (bh2), data prediction) of Zhao et al. (2023), "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models", as diffusers' UniPCMultistepScheduler.

    Step i evaluates the network at the predictor's x_i, corrects it with that output, x_i^c = x_i
    + Delta_i, then predicts x_{i+1} = (sigma_{i+1} / sigma_i) x_i^c - alpha_{i+1} (e^{-h} - 1) m_i
    - alpha_{i+1} B(h) sum_k rho_k (m_{i-k} - m_i) / r_k. The corrector and the predictor that made
    x_i start from the same (sigma_i / sigma_{i-1}) x_{i-1}^c - alpha_i (e^{-h} - 1) m_{i-1}, so Delta_i
    is linear in the outputs m_i .. m_{i-3} alone: the whole step is the fused step's update over x,
    this x0 and three x0 histories (c_d, c_d2, c_d3).
    """

    name = "unipc"
    uses_x0_history = True
    history_slots = 3  # the corrector of order 3 reads m_{i-1}, m_{i-2}, m_{i-3}

    def __init__(self, schedule, steps, **kwargs):
        self.solver_order = schedule.solver_order or 2
        solver_type = schedule.solver_type or "bh2"
        self.solver_type = "bh2" if solver_type in _AS_BH2 else solver_type
        self.disable_corrector = frozenset(int(k) for k in schedule.disable_corrector)
        super().__init__(schedule, steps, **kwargs)

    def make_timesteps(self) -> np.ndarray:
        ts, self.sigmas = sigma_schedule(self.schedule, self.steps, "unipc")
        return ts.astype(np.int64)

    def _lam(self, k: int) -> float:
        alpha, sigma = vp(self.sigmas[k])
        return math.log(alpha) - math.log(sigma) if sigma > 0.0 else math.inf

    def step_order(self, i: int, depth: int) -> int:
        """The predictor's order at step i with `depth` previous outputs (lower_order_final: at most
        the steps left). At a final sigma of 0 it is 1: there r_k = 0 and diffusers' higher orders
        divide by it (inf), DPM-Solver's rule."""
        n = len(self.timesteps)
        order = min(self.solver_order, depth + 1)
        if self.schedule.lower_order_final:
            order = min(order, n - i)
        if float(self.sigmas[i + 1]) == 0.0:
            order = 1
        return order

    def _rhos(self, j: int, order: int):
        """For the step from level j to j + 1 at `order`: (h, B(h), r_1 .. r_{order-1}, the predictor's
        rho (order - 1 of them), the corrector's rho (order of them, the last weighing m_{j+1} - m_j))."""
        lam_s = self._lam(j)
        h = self._lam(j + 1) - lam_s
        hh = -h  # data prediction
        rks = [(self._lam(j - k) - lam_s) / h for k in range(1, order)]
        b_h = hh if self.solver_type == "bh1" else math.expm1(hh)
        b, h_phi_k, factorial = [], math.expm1(hh) / hh - 1.0, 1
        for k in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        R = np.array([[r ** (k - 1) for r in [*rks, 1.0]] for k in range(1, order + 1)])
        if order == 1:
            rho_p = []
        elif order == 2:
            rho_p = [0.5]
        else:
            rho_p = list(np.linalg.solve(R[:-1, :-1], b[:-1]))
        rho_c = [0.5] if order == 1 else list(np.linalg.solve(R, b))
        return h, b_h, rks, rho_p, rho_c

    def coefficients(self, i: int, depth: int | None = None) -> StepCoefficients:
        depth = i if depth is None else min(depth, i)
        alpha_s, sigma_s = vp(self.sigmas[i])
        alpha_t, sigma_t = vp(self.sigmas[i + 1])
        c = StepCoefficients(
            t=int(self.timesteps[i]), alpha=alpha_s, sigma=sigma_s, alpha_next=alpha_t, sigma_next=sigma_t
        )
        w = [0.0, 0.0, 0.0, 0.0]  # x_{i+1} = c_x x + sum_k w_k m_{i-k}
        # the predictor x_{i+1} = A x_i^c + ...
        if sigma_t == 0.0:  # the last step to sigma 0: x0
            A = 0.0
            w[0] = 1.0
        else:
            A = sigma_t / sigma_s
            order = self.step_order(i, depth)
            if self._lam(i + 1) != self._lam(
                i
            ):  # else a spaced schedule's sigma_min repeated at the end: x stays
                h, b_h, rks, rho_p, _ = self._rhos(i, order)
                w[0] -= alpha_t * math.expm1(-h)
                for k in range(1, order):
                    g = -alpha_t * b_h * rho_p[k - 1] / rks[k - 1]
                    w[k] += g
                    w[0] -= g
        # the corrector x_i^c = x_i + Delta_i (diffusers: step i - 1 in disable_corrector skips it)
        if A != 0.0 and depth >= 1 and (i - 1) not in self.disable_corrector:
            order = self.step_order(i - 1, depth - 1)
            _, b_h, rks, rho_p, rho_c = self._rhos(i - 1, order)
            g = -alpha_s * b_h * rho_c[-1]  # Delta_i weighs m_i - m_{i-1} by it, m_{i-1-k} - m_{i-1} by:
            w[0] += A * g
            w[1] -= A * g
            for k in range(1, order):
                g = -alpha_s * b_h * (rho_c[k - 1] - rho_p[k - 1]) / rks[k - 1]
                w[1 + k] += A * g
                w[1] -= A * g
        # c_x0 m_i + c_d (m_i - m_{i-1}) + c_d2 (m_{i-1} - m_{i-2}) + c_d3 (m_{i-2} - m_{i-3})
        c.c_x = A
        c.c_x0 = w[0] + w[1] + w[2] + w[3]
        c.c_d = -(w[1] + w[2] + w[3])
        c.c_d2 = -(w[2] + w[3])
        c.c_d3 = -w[3]
        return c
