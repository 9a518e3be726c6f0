"""Backends run a package's stage networks: `model(x_t, t, cond) -> prediction` for pydiff.sample.

- `onnxruntime` (default): one InferenceSession per stage, created once; CUDA provider first
  when ONNX Runtime has it, else CPU (`providers="auto"|"cpu"|"cuda"|"tensorrt"` to choose).
- `tensorrt`: one TensorRT engine per stage, built from its ONNX file and cached on disk
  (tensorrt and torch imported only when this backend is made; see docs/backends.md).
- `torch`: user-supplied `torch.nn.Module`s per stage (torch is imported only when this backend is
  made).

The parts every backend shares: `ort` (ONNX Runtime sessions and providers, the one leaf that makes
sessions), `text_encoder`, `guidance_models`, and `float16` (the float16 graph rewrite TensorRT 11
needs). A backend object is immutable after construction and its stage models are safe to call
from several threads at once (ONNX Runtime sessions are thread-safe for `run`).
"""

from __future__ import annotations

from typing import Any

from pydiff.backends.base import Backend, StageModel
from pydiff.backends.onnxruntime import OnnxRuntimeBackend
from pydiff.backends.tensorrt import TensorRTBackend
from pydiff.backends.torch import TorchBackend
from pydiff.errors import BackendUnavailableError, ModelOutputError

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "ModelOutputError",
    "StageModel",
    "create_backend",
    "BACKENDS",
]

BACKENDS = ("onnxruntime", "tensorrt", "torch")
_BY_NAME = {
    "auto": OnnxRuntimeBackend,
    "onnxruntime": OnnxRuntimeBackend,
    "ort": OnnxRuntimeBackend,
    "tensorrt": TensorRTBackend,
    "trt": TensorRTBackend,
    "torch": TorchBackend,
}


def create_backend(name: str, package, **options: Any) -> Backend:
    """Make the backend `name` ("auto", "onnxruntime", "ort", "tensorrt", "trt" or "torch")."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name {list(BACKENDS)} or a Backend, got {type(name).__name__}")
    cls = _BY_NAME.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]}")
    return cls(package, **options)
