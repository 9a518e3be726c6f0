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


class NetworkRunError(ModelOutputError):
    """ONNX Runtime (or another runtime) failed while running a package's network: the message
    names the stage (or the text encoder, the guidance model) and its ONNX file, and the runtime's
    own first line."""


class CallbackError(ValueError):
    """A function given to the sampler returned something it cannot use (a dtype that is not
    floating point, another shape, NaN or Inf in float32, or a sum with the state that overflows):
    the message names the function (the callback, the noise function, the guidance function) and
    the step. `source` is "callback", "noise" or "guidance_fn"."""

    def __init__(self, message: str, source: str | None = None):
        super().__init__(message)
        self.source = source


class MixedPrecisionError(ValueError):
    """A graph the float16 rewrite cannot handle (the message says which node or tensor, and why)."""


class ShapeFreezeError(ValueError):
    """The graph's shape arithmetic cannot be frozen (a dynamic dimension other than the batch,
    or a shape value that changes with the batch where no constant can stand for it)."""


class UsageError(ValueError):
    """Bad input found by the command line itself (exit code 2)."""


class QueueFullError(RuntimeError):
    """The queue holds `max_queue` calls already; `retry_after` estimates the seconds to wait."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(RuntimeError):
    """The engine is draining for shutdown and takes no new work."""


class CancelledJobError(RuntimeError):
    """Every request of a call was cancelled (deadline passed or client gone): the call stops."""


__all__ = [
    "QueueFullError",
    "ShuttingDownError",
    "CancelledJobError",
    "ScheduleError",
    "NonFiniteError",
    "PackageError",
    "BackendUnavailableError",
    "ModelOutputError",
    "NetworkRunError",
    "CallbackError",
    "MixedPrecisionError",
    "ShapeFreezeError",
    "UsageError",
]
