"""The CUDA twin of the step kernels, on device arrays (optional: built with PYDIFF_CUDA=1).

Device arrays are torch CUDA tensors, anything with ``__cuda_array_interface__`` (CuPy, Numba) or
DLPack (``__dlpack__``: JAX, CuPy, ...), or ONNX Runtime OrtValues on the GPU; float32, float16 or
bfloat16 (arithmetic is float32), C-contiguous, all on one GPU. Nothing is
copied between host and device and nothing synchronises: work is queued on ``stream`` (an integer
handle, or an object with ``cuda_stream``/``ptr`` such as a torch or CuPy stream). Non-finite values
are counted into an optional int64 device counter you read when you choose to synchronise.

Importing this module never touches a GPU; ``available()`` asks the CUDA runtime.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

try:
    from pydiff import _C_cuda
except ImportError as e:  # built without PYDIFF_CUDA, or no CUDA runtime on this machine
    _C_cuda = None
    _IMPORT_ERROR = e

F32, F16, BF16 = 0, 1, 2
_TYPESTR = {"<f4": F32, "<f2": F16}
_TORCH_DTYPES = {"torch.float32": F32, "torch.float16": F16, "torch.bfloat16": BF16}
_ORT_TYPES = {"tensor(float)": F32, "tensor(float16)": F16, "tensor(bfloat16)": BF16}
_DL_TYPES = {(2, 32): F32, (2, 16): F16, (4, 16): BF16}  # DLPack (type code, bits): kDLFloat 2, kDLBfloat 4
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


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
    if type(obj).__name__ == "OrtValue" and hasattr(obj, "device_name"):  # onnxruntime.OrtValue
        if obj.device_name().lower() != "cuda":
            raise TypeError(f"{name} is an OrtValue on {obj.device_name()}; the CUDA step needs one on 'cuda'")
        storage = _ORT_TYPES.get(obj.data_type())
        if storage is None:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {obj.data_type()}")
        ptr = int(obj.data_ptr())
        return DeviceArray(ptr, tuple(obj.shape()), storage, _C_cuda.pointer_device(ptr) if ptr else -1)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is None:
        if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
            return _from_dlpack(obj, name)
        raise TypeError(f"{name} must be a CUDA device array (torch CUDA tensor, __cuda_array_interface__, DLPack "
                        f"or a CUDA OrtValue), got {type(obj).__name__}")
    storage = _TYPESTR.get(cai["typestr"])
    if storage is None:
        raise TypeError(f"{name} must be float32 or float16, got typestr {cai['typestr']!r}")
    shape = tuple(cai["shape"])
    _check_c_contiguous(name, shape, cai.get("strides"), 4 if storage == F32 else 2)
    ptr = int(cai["data"][0])
    dev = _C_cuda.pointer_device(ptr) if ptr else -1
    if dev < 0 and math.prod(shape) > 0:
        raise TypeError(f"{name} points to host memory; the CUDA step needs device memory")
    return DeviceArray(ptr, shape, storage, dev)


def _check_c_contiguous(name, shape, strides, itemsize) -> None:
    """strides in bytes, or None for C order."""
    if strides is None:
        return
    want, acc = [], itemsize
    for d in reversed(shape):
        want.append(acc)
        acc *= d
    if any(s != w for s, w, d in zip(strides, reversed(want), shape) if d > 1):
        raise ValueError(f"{name} must be C-contiguous, got strides {tuple(strides)}")


def _from_dlpack(obj, name: str) -> DeviceArray:
    from pydiff import _C

    dev_type, dev_id = obj.__dlpack_device__()
    if dev_type in (_DL_CPU, _DL_CUDA_HOST):
        raise TypeError(f"{name} is a host array (DLPack device type {int(dev_type)}); the CUDA step needs device "
                        f"arrays (use pydiff.ops on the CPU)")
    if dev_type not in (_DL_CUDA, _DL_CUDA_MANAGED):
        raise TypeError(f"{name} lives on DLPack device type {int(dev_type)}, not a CUDA GPU")
    # stream=-1: no synchronisation by the producer; ordering is the caller's, on the stream it gives us.
    ptr, shape, strides, code, bits, lanes = _C.dlpack_info(obj.__dlpack__(stream=-1))
    storage = _DL_TYPES.get((code, bits)) if lanes == 1 else None
    if storage is None:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got DLPack dtype code {code} with {bits} bits")
    item = bits // 8
    _check_c_contiguous(name, tuple(shape), None if strides is None else [s * item for s in strides], item)
    return DeviceArray(int(ptr), tuple(shape), storage, int(dev_id))


def stream_handle(stream) -> int:
    """The cudaStream_t of None (0, the legacy default stream), an integer handle, or a stream object
    (torch.cuda.Stream: `.cuda_stream`, CuPy: `.ptr`, or `.handle`)."""
    if stream is None:
        return 0
    if isinstance(stream, int) and not isinstance(stream, bool):
        return stream
    for attr in ("cuda_stream", "ptr", "handle"):
        if isinstance(getattr(stream, attr, None), int):
            return int(getattr(stream, attr))
    raise TypeError(f"stream must be an integer handle or a stream object, got {type(stream).__name__}")


def workspace_bytes(batch: int, n: int) -> int:
    """Scratch bytes one dynamic-thresholding step needs for `batch` samples of `n` elements each."""
    if _C_cuda is None:
        raise ImportError(f"pydiff was built without the CUDA twin (reinstall with PYDIFF_CUDA=1): {_IMPORT_ERROR}")
    return int(_C_cuda.workspace_bytes(int(batch), int(n)))


def fused_step(x, model_output, params, *, out, guidance_scale=None, x0_prev=None, x0_out=None, thresholds=None,
               nonfinite=None, stream=None, param_table=None, step_counter=None, workspace=None) -> None:
    """The fused denoising step on the GPU, queued on `stream` (see pydiff.ops.fused_step for the math).

    x, out, x0_prev, x0_out [B, ...] and model_output [B, ...] or [2B, ...] (with guidance) share one
    storage type; guidance_scale a number or a float32 [B] device array; thresholds float32 [B];
    nonfinite an int64 [1] device counter that the step adds to.

    For CUDA-graph replay (pydiff.cuda_graph): param_table, a uint8 device array holding
    ``pydiff._C.pack_step_params(rows)``, and step_counter, an int32 [1] device array: the step reads
    row ``step_counter[0]`` instead of `params` (whose prediction type and thresholding mode every row
    shares) and adds 1 to the counter. workspace: a device buffer of at least
    ``workspace_bytes(B, n)`` bytes for dynamic thresholding (else it allocates stream-ordered).
    """
    xv = device_array(x, "x")
    mv = device_array(model_output, "model_output")
    ov = device_array(out, "out")
    B = xv.shape[0] if xv.shape else 0
    n = math.prod(xv.shape[1:]) if B else 0  # math.prod: 0.2 us where np.prod takes 3.6 (a per-step call)
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
    table_ptr = counter_ptr = ws_ptr = ws_bytes = 0
    if (param_table is None) != (step_counter is None):
        raise ValueError("param_table and step_counter go together")
    if param_table is not None:
        table_ptr, counter_ptr = _raw_device_buffer(param_table, "param_table"), _raw_device_buffer(step_counter,
                                                                                                       "step_counter")
    if workspace is not None:
        ws_ptr = _raw_device_buffer(workspace, "workspace")
        ws_bytes = _nbytes(workspace)
    for name, v in views.items():
        if v.device != xv.device:
            raise ValueError(f"{name} is on GPU {v.device} but x is on GPU {xv.device}")
    _C_cuda.fused_step(xv.ptr, mv.ptr, ov.ptr, B, n, xv.storage, params, guided, scale, scales_ptr,
                       ptrs["x0_prev"], ptrs["x0_out"], thr_ptr, nf_ptr, stream_handle(stream),
                       table_ptr, counter_ptr, ws_ptr, ws_bytes)


def _raw_device_buffer(obj, name: str) -> int:
    """The device pointer of a buffer of any dtype (torch CUDA tensor or __cuda_array_interface__)."""
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_cuda"):
        if not obj.is_cuda:
            raise TypeError(f"{name} is a CPU tensor; it must live on the GPU")
        if not obj.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        return int(obj.data_ptr())
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"{name} must be a torch CUDA tensor or have __cuda_array_interface__")
    return int(cai["data"][0])


def _nbytes(obj) -> int:
    if hasattr(obj, "element_size"):
        return int(obj.numel() * obj.element_size())
    cai = obj.__cuda_array_interface__
    return math.prod(cai["shape"]) * np.dtype(cai["typestr"]).itemsize


def randn(out, seed: int, step: int = 0, *, offset: int = 0, stream=None) -> None:
    """The in-kernel noise stream (seed, step) into a float32 device array: the CPU twin's values, bit for bit."""
    v = device_array(out, "out")
    if v.storage != F32:
        raise TypeError("out must be float32")
    _C_cuda.randn(v.ptr, math.prod(v.shape), int(seed) & (2**64 - 1), int(step) & 0xFFFFFFFF, int(offset),
                  stream_handle(stream))
