"""pydiff: a compiled sampling engine for conditional diffusion models.

Core: ``Schedule``, ``sample``, ``make_sampler``, ``timesteps``, and the native ops in ``pydiff.ops``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pydiff.samplers import NonFiniteError, make_sampler  # noqa: E402
from pydiff.sampling import repaint, repaint_schedule, sample  # noqa: E402
from pydiff.schedules import Schedule, ScheduleError, timesteps  # noqa: E402

# The pipeline (ONNX Runtime, tokenizers, Pillow) loads on first use, so that `import pydiff`
# stays cheap for users of the core alone.
_PIPELINE_NAMES = (
    "generate",
    "load",
    "inpaint",
    "img2img",
    "upscale",
    "colorize",
    "Pipeline",
    "PackageError",
)


def __getattr__(name):
    if name in _PIPELINE_NAMES:
        from pydiff import pipeline

        return getattr(pipeline, name)
    if name in ("features", "purify"):  # issue 26: diffusion models for discriminative work
        from pydiff import discriminative

        return getattr(discriminative, name)
    if name in ("ModelOutputError", "BackendUnavailableError"):
        from pydiff import backends

        return getattr(backends, name)
    raise AttributeError(f"module 'pydiff' has no attribute {name!r}")


__all__ = [
    "Schedule",
    "ScheduleError",
    "sample",
    "repaint",
    "repaint_schedule",
    "make_sampler",
    "timesteps",
    "NonFiniteError",
    "__version__",
    "ModelOutputError",
    "BackendUnavailableError",
    "features",
    "purify",
    *_PIPELINE_NAMES,
]
