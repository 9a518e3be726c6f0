"""Samplers: one file each, one class each, driving the fused native step."""

from __future__ import annotations

from pydiff.samplers.base import NonFiniteError, Sampler, StepCoefficients
from pydiff.samplers.ddim import DDIM
from pydiff.samplers.ddpm import DDPM
from pydiff.samplers.dpmpp_2m import DPMSolverPP2M

SAMPLERS = {"ddpm": DDPM, "ddim": DDIM, "dpmpp_2m": DPMSolverPP2M}


def make_sampler(name: str, schedule, steps: int, *, eta: float = 0.0, **options) -> Sampler:
    """A sampler by name: 'ddpm', 'ddim' (with eta) or 'dpmpp_2m'."""
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
]
