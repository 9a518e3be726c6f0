"""DPM-Solver++ 2M SDE."""

from __future__ import annotations

from pydiff.samplers.dpmpp_2m import DPMSolverPP2M


class DPMSolverPP2MSDE(DPMSolverPP2M):
    """Implements SDE-DPM-Solver++(2M) (Lu et al. 2022, Appendix; eq. of Gonzalez et al. 2023), as diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++").

    x_t = (sigma_t / sigma_s) e^{-h} x + alpha_t (1 - e^{-2h}) (D0 + D1 / 2) + sigma_t sqrt(1 - e^{-2h}) z.
    """

    name = "dpmpp_2m_sde"
    stochastic = True
