"""DPM-Solver++ 3M."""

from __future__ import annotations

from pydiff.samplers.dpmpp_2m import DPMSolverPP2M


class DPMSolverPP3M(DPMSolverPP2M):
    """Implements DPM-Solver++(3M), the third-order multistep data-prediction solver of Lu et al. (2022, Sec. 4 and App. B), as diffusers' DPMSolverMultistepScheduler(solver_order=3).

    x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) D0 + alpha_t ((e^{-h} - 1) / h + 1) D1
          - alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2) D2, from the last three x0; lower orders first.
    """

    name = "dpmpp_3m"
    order = 3
    history_slots = 2
