"""PLMS: pseudo linear multistep sampling."""

from __future__ import annotations

import numpy as np

from pydiff.samplers.base import Sampler, StepCoefficients, sqrt

# Adams-Bashforth weights of the network outputs, newest first (Liu et al. 2022, eq. 12)
_PLMS_WEIGHTS = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class PNDM(Sampler):
    """Implements PLMS (the pseudo linear multistep method, eq. 12 with the transfer of eq. 11) of Liu et al. (2022), "Pseudo Numerical Methods for Diffusion Models on Manifolds", as diffusers' PNDMScheduler with skip_prk_steps.

    x_{t'} = a x_t - b e', a = sqrt(abar_t' / abar_t), b = (abar_t' - abar_t) / (abar_t sqrt(1 - abar_t')
    + sqrt(abar_t (1 - abar_t) abar_t')), e' the Adams-Bashforth mix of the last 1-4 network outputs
    (converted at the current step, as diffusers does for v_prediction); the second evaluation repeats
    the first level with the mean of two outputs (a Heun-like start). Every step is linear in x, this
    output and the history of outputs: the fused step's history_output with c_d, c_d2, c_d3.
    """

    name = "pndm"
    uses_x0_history = True
    history_slots = 3
    history_output = True

    def __init__(self, schedule, steps, **kwargs):
        if schedule.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"pndm takes prediction_type epsilon or v_prediction, not {schedule.prediction_type!r}"
            )
        super().__init__(schedule, steps, **kwargs)

    def make_timesteps(self) -> np.ndarray:
        s, T, n = self.schedule, self.schedule.num_train_timesteps, self.steps
        if s.timestep_spacing == "linspace":
            base = np.linspace(0, T - 1, n).round().astype(np.int64)
        elif s.timestep_spacing == "leading":
            base = (np.arange(0, n) * (T // n)).round().astype(np.int64) + s.steps_offset
        else:
            base = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1
        if n < 2:
            raise ValueError("pndm needs steps >= 2")
        if base.max() >= T or base.min() < 0:
            raise ValueError(f"steps_offset={s.steps_offset} puts timesteps outside [0, {T - 1}]")
        return np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()

    def keeps_history(self, i: int) -> bool:
        return i != 1  # diffusers keeps the first output, not the second evaluation's

    def _abar(self, t: int) -> float:
        if t < 0:
            return 1.0 if self.schedule.set_alpha_to_one else float(self.alphas_cumprod[0])
        return float(self.alphas_cumprod[t])

    def _transfer(self, t: int, prev: int):
        """(a, b, kappa, varsigma): x_{prev} = a x - b e' and the output's eps = kappa m + varsigma x at t."""
        at, ap = self._abar(t), self._abar(prev)
        a = (ap / at) ** 0.5
        b = (ap - at) / (at * (1 - ap) ** 0.5 + (at * (1 - at) * ap) ** 0.5)
        if self.schedule.prediction_type == "v_prediction":
            return a, b, at**0.5, (1 - at) ** 0.5
        return a, b, 1.0, 0.0

    def coefficients(self, i: int, depth: int | None = None) -> StepCoefficients:
        ratio = self.schedule.num_train_timesteps // self.steps
        t = int(self.timesteps[i])
        depth = (i if i < 2 else i - 1) if depth is None else depth
        prev = t - ratio
        a_t = self._abar(t)
        c = StepCoefficients(
            t=t,
            alpha=sqrt(a_t),
            sigma=sqrt(1 - a_t),
            alpha_next=sqrt(self._abar(prev)),
            sigma_next=sqrt(1 - self._abar(prev)),
        )
        kappa1, vs1 = self._transfer(t, prev)[2:]
        if i == 1 and depth >= 1:  # the mean of two outputs, from the first sample (rewritten in this x)
            t0 = int(self.timesteps[0])
            a0, b0, k0, s0 = self._transfer(t0, t0 - ratio)
            a1, b1, k1, s1 = self._transfer(t + ratio, t)
            A0, A1 = a0 - b0 * s0, a1 - b1 * s1
            c.alpha_next, c.sigma_next = c.alpha, c.sigma
            c.c_d = b1 * k1 / 2 - A1 * b0 * k0 / A0
            c.c_eps = (-b1 * k1 / 2 - c.c_d) / kappa1
            c.c_x = A1 / A0 - c.c_eps * vs1
            return self._in_x0(c)
        a, b, kappa, _ = self._transfer(t, prev)
        c.c_x, c.c_eps = a, -b
        order = min(depth + 1, 4)
        if (
            order >= 2
        ):  # sum_k w_k m_k = m - W1 (m - m1) - W2 (m1 - m2) - W3 (m2 - m3), W_j = w_j + ... + w_last
            w = _PLMS_WEIGHTS[order]
            tails = [sum(w[j:]) for j in range(1, order)] + [0.0] * (4 - order)
            c.c_d, c.c_d2, c.c_d3 = (b * kappa * tails[0], b * kappa * tails[1], b * kappa * tails[2])
        return self._in_x0(c)

    def _in_x0(self, c: StepCoefficients) -> StepCoefficients:
        """For v_prediction, c_x x + c_eps eps as c_x alpha x0 + (c_x sigma + c_eps) eps: the same
        update, its cancellation (a = sqrt(abar_t' / abar_t) is 2e4 at the cosine schedule's t = 999)
        done in float64 here rather than in float32 in the kernel."""
        if self.schedule.prediction_type == "v_prediction":
            c.c_x0, c.c_eps, c.c_x = c.c_x * c.alpha, c.c_x * c.sigma + c.c_eps, 0.0
        return c
