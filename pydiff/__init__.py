"""pydiff: a compiled sampling engine for conditional diffusion models.

Core: ``Schedule``, ``sample``, ``make_sampler``, ``timesteps``, and the native ops in ``pydiff.ops``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from pydiff.samplers import NonFiniteError, make_sampler  # noqa: E402
from pydiff.sampling import sample  # noqa: E402
from pydiff.schedules import Schedule, ScheduleError, timesteps  # noqa: E402

__all__ = ["Schedule", "ScheduleError", "sample", "make_sampler", "timesteps", "NonFiniteError", "__version__"]
