"""Every exception pydiff raises on purpose: one leaf module, so any tier can raise any of them.

Bad input is a `ValueError` subclass (the command line maps it to exit code 2); a missing optional
runtime is an `ImportError` subclass; a broken network is a `RuntimeError` subclass.
"""

from __future__ import annotations


class ScheduleError(ValueError):
    """An invalid schedule setting."""


class NonFiniteError(FloatingPointError, ValueError):
    """A step met NaN or Inf (in the network's output, or produced by the update)."""


class PackageError(ValueError):
    """A model package is missing, corrupt or inconsistent; the message names the file and key."""


class BackendUnavailableError(ImportError):
    """An optional runtime (onnxruntime-gpu's CUDA provider, TensorRT) is not installed here; the
    message names what is missing and how to install it."""


class ModelOutputError(RuntimeError):
    """A network returned something the format rules out (e.g. a shape other than the sample's):
    a broken or mismatched model file, not a bug of the caller or of pydiff."""


class MixedPrecisionError(ValueError):
    """A graph the float16 rewrite cannot handle (the message says which node or tensor, and why)."""


class ShapeFreezeError(ValueError):
    """The graph's shape arithmetic cannot be frozen (a dynamic dimension other than the batch,
    or a shape value that changes with the batch where no constant can stand for it)."""


class UsageError(ValueError):
    """Bad input found by the command line itself (exit code 2)."""


__all__ = [
    "ScheduleError",
    "NonFiniteError",
    "PackageError",
    "BackendUnavailableError",
    "ModelOutputError",
    "MixedPrecisionError",
    "ShapeFreezeError",
    "UsageError",
]
