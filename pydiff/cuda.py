"""The CUDA twin of the step kernels, on device arrays (optional: built with PYDIFF_CUDA=1).

Device arrays are torch CUDA tensors, or anything with ``__cuda_array_interface__`` (CuPy, Numba),
in float32, float16 or bfloat16 (arithmetic is float32), C-contiguous, all on one GPU. Nothing is
copied between host and device and nothing synchronises: work is queued on ``stream`` (an integer
handle, or an object with ``cuda_stream``/``ptr`` such as a torch or CuPy stream). Non-finite values
are counted into an optional int64 device counter you read when you choose to synchronise.

Importing this module never touches a GPU; ``available()`` asks the CUDA runtime.
"""
from __future__ import annotations

import dataclasses

import numpy as np

try:
    from pydiff import _C_cuda
except ImportError as e:  # built without PYDIFF_CUDA, or no CUDA runtime on this machine
    _C_cuda = None
    _IMPORT_ERROR = e

F32, F16, BF16 = 0, 1, 2
_TYPESTR = {"<f4": F32, "<f2": F16}
_TORCH_DTYPES = {"torch.float32": F32, "torch.float16": F16, "torch.bfloat16": BF16}


def built() -> bool:
    """Whether the CUDA module was built and loads (no GPU needed)."""
    return _C_cuda is not None


def available() -> bool:
    """Whether the CUDA module is built and a GPU is visible."""
    return _C_cuda is not None and _C_cuda.device_count() > 0


@dataclasses.dataclass(frozen=True)
class DeviceArray:
    ptr: int
    shape: tuple
    storage: int
    device: int


def device_array(obj, name: str) -> DeviceArray:
    """A validated view of a device array; host arrays and non-contiguous layouts are errors naming `name`."""
    if isinstance(obj, np.ndarray):
        raise TypeError(f"{name} is a host (NumPy) array; the CUDA step needs device arrays (use pydiff.ops on the CPU)")
    if _C_cuda is None:
        raise ImportError(f"pydiff was built without the CUDA twin (reinstall with PYDIFF_CUDA=1): {_IMPORT_ERROR}")
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_cuda"):  # a torch tensor
        if not obj.is_cuda:
            raise TypeError(f"{name} is a CPU tensor; the CUDA step needs device tensors")
        storage = _TORCH_DTYPES.get(str(obj.dtype))
        if storage is None:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {obj.dtype}")
        if not obj.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous())")
        return DeviceArray(int(obj.data_ptr()), tuple(obj.shape), storage, int(obj.device.index))
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"{name} must be a CUDA device array (torch CUDA tensor or __cuda_array_interface__), "
                        f"got {type(obj).__name__}")
    storage = _TYPESTR.get(cai["typestr"])
    if storage is None:
        raise TypeError(f"{name} must be float32 or float16, got typestr {cai['typestr']!r}")
    shape = tuple(cai["shape"])
    strides = cai.get("strides")
    if strides is not None:
        item = 4 if storage == F32 else 2
        want, acc = [], item
        for d in reversed(shape):
            want.append(acc)
            acc *= d
        if tuple(reversed(want)) != tuple(strides):
            raise ValueError(f"{name} must be C-contiguous, got strides {strides}")
    ptr = int(cai["data"][0])
    dev = _C_cuda.pointer_device(ptr) if ptr else -1
    if dev < 0 and int(np.prod(shape)) > 0:
        raise TypeError(f"{name} points to host memory; the CUDA step needs device memory")
    return DeviceArray(ptr, shape, storage, dev)


def _stream_handle(stream) -> int:
    if stream is None:
        return 0
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr", "handle"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    raise TypeError(f"stream must be an integer handle or a stream object, got {type(stream).__name__}")


def fused_step(x, model_output, params, *, out, guidance_scale=None, x0_prev=None, x0_out=None, thresholds=None,
               nonfinite=None, stream=None) -> None:
    """The fused denoising step on the GPU, queued on `stream` (see pydiff.ops.fused_step for the math).

    x, out, x0_prev, x0_out [B, ...] and model_output [B, ...] or [2B, ...] (with guidance) share one
    storage type; guidance_scale a number or a float32 [B] device array; thresholds float32 [B];
    nonfinite an int64 [1] device counter that the step adds to.
    """
    xv = device_array(x, "x")
    mv = device_array(model_output, "model_output")
    ov = device_array(out, "out")
    B = xv.shape[0] if xv.shape else 0
    n = int(np.prod(xv.shape[1:])) if B else 0
    guided = guidance_scale is not None
    want_mo = ((2 * B,) if guided else (B,)) + tuple(xv.shape[1:])
    if mv.shape != want_mo:
        raise ValueError(f"model_output must have shape {want_mo}, got {mv.shape}")
    views = {"model_output": mv, "out": ov}
    if ov.shape != xv.shape:
        raise ValueError(f"out must have shape {xv.shape}, got {ov.shape}")
    ptrs = {}
    for name, arr, shape in (("x0_prev", x0_prev, xv.shape), ("x0_out", x0_out, xv.shape)):
        if arr is None:
            ptrs[name] = 0
            continue
        v = device_array(arr, name)
        if v.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {v.shape}")
        views[name] = v
        ptrs[name] = v.ptr
    for name, v in views.items():
        if v.storage != xv.storage:
            raise TypeError(f"{name} must have the same dtype as x")
    scale, scales_ptr = 1.0, 0
    if guided and np.ndim(guidance_scale) == 0:
        scale = float(guidance_scale)
        if not np.isfinite(scale):
            raise ValueError(f"guidance scale must be finite, got {scale}")
    elif guided:
        sv = device_array(guidance_scale, "guidance_scale")
        if sv.storage != F32 or sv.shape != (B,):
            raise ValueError(f"guidance_scale must be float32 of shape ({B},)")
        views["guidance_scale"], scales_ptr = sv, sv.ptr
    thr_ptr = 0
    if thresholds is not None:
        tv = device_array(thresholds, "thresholds")
        if tv.storage != F32 or tv.shape != (B,):
            raise ValueError(f"thresholds must be float32 of shape ({B},)")
        views["thresholds"], thr_ptr = tv, tv.ptr
    nf_ptr = 0
    if nonfinite is not None:
        if hasattr(nonfinite, "dtype") and str(nonfinite.dtype) not in ("torch.int64", "int64"):
            raise TypeError("nonfinite must be an int64 device counter")
        nf_ptr = int(nonfinite.data_ptr()) if hasattr(nonfinite, "data_ptr") else int(
            nonfinite.__cuda_array_interface__["data"][0])
    for name, v in views.items():
        if v.device != xv.device:
            raise ValueError(f"{name} is on GPU {v.device} but x is on GPU {xv.device}")
    _C_cuda.fused_step(xv.ptr, mv.ptr, ov.ptr, B, n, xv.storage, params, guided, scale, scales_ptr,
                       ptrs["x0_prev"], ptrs["x0_out"], thr_ptr, nf_ptr, _stream_handle(stream))


def randn(out, seed: int, step: int = 0, *, offset: int = 0, stream=None) -> None:
    """The in-kernel noise stream (seed, step) into a float32 device array: the CPU twin's values, bit for bit."""
    v = device_array(out, "out")
    if v.storage != F32:
        raise TypeError("out must be float32")
    _C_cuda.randn(v.ptr, int(np.prod(v.shape)), int(seed) & (2**64 - 1), int(step) & 0xFFFFFFFF, int(offset),
                  _stream_handle(stream))
