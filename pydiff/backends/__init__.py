"""Backends run a package's stage networks: `model(x_t, t, cond) -> prediction` for pydiff.sample.

- `onnxruntime` (default): one InferenceSession per stage, created once; CUDA provider first
  when ONNX Runtime has it, else CPU (`providers="auto"|"cpu"|"cuda"|"tensorrt"` to choose).
- `tensorrt`: one TensorRT engine per stage, built from its ONNX file and cached on disk
  (tensorrt and torch imported only here, lazily; see docs/backends.md).
- `torch`: user-supplied `torch.nn.Module`s per stage (torch is imported only here, lazily).

A backend object is immutable after construction and its stage models are safe to call from
several threads at once (ONNX Runtime sessions are thread-safe for `run`).
"""
from __future__ import annotations

from typing import Any

from .base import Backend, BackendUnavailableError, ModelOutputError, StageModel

__all__ = ["Backend", "BackendUnavailableError", "ModelOutputError", "StageModel", "create_backend", "BACKENDS"]

BACKENDS = ("onnxruntime", "tensorrt", "torch")


def create_backend(name: str, package, **options: Any) -> Backend:
    """Make the backend `name` ("auto", "onnxruntime", "ort", "tensorrt", "trt" or "torch")."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name {list(BACKENDS)} or a Backend, got {type(name).__name__}")
    key = name.lower()
    if key in ("auto", "onnxruntime", "ort"):
        from .onnxruntime import OnnxRuntimeBackend
        return OnnxRuntimeBackend(package, **options)
    if key in ("tensorrt", "trt"):
        from .tensorrt import TensorRTBackend
        return TensorRTBackend(package, **options)
    if key == "torch":
        from .torch import TorchBackend
        return TorchBackend(package, **options)
    raise ValueError(f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]}")
