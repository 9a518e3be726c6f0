"""Samplers: one file each, one class each, driving the fused native step."""

from __future__ import annotations

from pydiff.samplers.base import NonFiniteError, Sampler, StepCoefficients
from pydiff.samplers.ddim import DDIM
from pydiff.samplers.ddpm import DDPM
from pydiff.samplers.dpmpp_2m import DPMSolverPP2M
from pydiff.samplers.dpmpp_2m_sde import DPMSolverPP2MSDE
from pydiff.samplers.dpmpp_3m import DPMSolverPP3M
from pydiff.samplers.euler import Euler
from pydiff.samplers.euler_ancestral import EulerAncestral
from pydiff.samplers.heun import Heun
from pydiff.samplers.lcm import LCM
from pydiff.samplers.pndm import PNDM
from pydiff.samplers.unipc import UniPC

SAMPLERS = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "dpmpp_2m": DPMSolverPP2M,
    "dpmpp_2m_sde": DPMSolverPP2MSDE,
    "dpmpp_3m": DPMSolverPP3M,
    "euler": Euler,
    "euler_ancestral": EulerAncestral,
    "heun": Heun,
    "pndm": PNDM,
    "unipc": UniPC,
    "lcm": LCM,
}


def make_sampler(name: str, schedule, steps: int, *, eta: float = 0.0, **options) -> Sampler:
    """A sampler by name (a key of SAMPLERS); eta is DDIM's."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    if name == "ddim":
        return DDIM(schedule, steps, eta=eta, **options)
    if eta:
        raise ValueError(f"eta applies to 'ddim' only, not {name!r}")
    return SAMPLERS[name](schedule, steps, **options)


__all__ = [
    "SAMPLERS",
    "make_sampler",
    "Sampler",
    "StepCoefficients",
    "NonFiniteError",
    "DDPM",
    "DDIM",
    "DPMSolverPP2M",
    "DPMSolverPP2MSDE",
    "DPMSolverPP3M",
    "Euler",
    "EulerAncestral",
    "Heun",
    "PNDM",
    "UniPC",
    "LCM",
]
