"""The CUDA twin of the step kernels, on device arrays (optional: built with PYDIFF_CUDA=1).

Device arrays are torch CUDA tensors, anything with ``__cuda_array_interface__`` (CuPy, Numba) or
DLPack (``__dlpack__``: JAX, CuPy, ...), or ONNX Runtime OrtValues on the GPU; float32, float16 or
bfloat16 (arithmetic is float32), C-contiguous, all on one GPU. Nothing is
copied between host and device and nothing synchronises with the host: work is queued on ``stream``
(an integer handle, or an object with ``cuda_stream``/``ptr``/``handle`` such as a torch, CuPy or
Numba stream) on the arrays' GPU, made current for the launch. Ordering: a DLPack producer is given
``stream`` to order its pending work before; a ``__cuda_array_interface__`` array that names its
producer's stream has ``stream`` wait for it (on the device); torch tensors must be ready on
``stream`` (e.g. torch's current stream). Non-finite values are counted into an optional int64
device counter you read when you choose to synchronise.

Importing this module never touches a GPU; ``available()`` asks the CUDA runtime.
"""

from __future__ import annotations

import dataclasses
import math
import typing

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
    stream: int | None = None  # the producer's stream to wait for (__cuda_array_interface__ "stream")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.storage == F32 else 2)


def device_array(obj, name: str, *, stream: int = 0, writable: bool = False) -> DeviceArray:
    """A validated view of a device array; host arrays and non-contiguous layouts are errors naming `name`.

    `stream`: the stream the caller will use it on (given to a DLPack producer so that it orders
    its pending work before it). `writable`: the array is written, so a read-only one is refused."""
    if isinstance(obj, np.ndarray):
        raise TypeError(
            f"{name} is a host (NumPy) array; the CUDA step needs device arrays (use pydiff.ops on the CPU)"
        )
    if _C_cuda is None:
        raise ImportError(
            f"pydiff was built without the CUDA twin (reinstall with PYDIFF_CUDA=1): {_IMPORT_ERROR}"
        )
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_cuda"):  # a torch tensor
        if not obj.is_cuda:
            raise TypeError(f"{name} is a CPU tensor; the CUDA step needs device tensors")
        storage = _TORCH_DTYPES.get(str(obj.dtype))
        if storage is None:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {obj.dtype}")
        if not obj.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous())")
        # torch orders work on its current stream; the caller passes a stream that sees it
        return DeviceArray(int(obj.data_ptr()), tuple(obj.shape), storage, int(obj.device.index))
    if type(obj).__name__ == "OrtValue" and hasattr(obj, "device_name"):  # onnxruntime.OrtValue
        if obj.device_name().lower() != "cuda":
            raise TypeError(
                f"{name} is an OrtValue on {obj.device_name()}; the CUDA step needs one on 'cuda'"
            )
        storage = _ORT_TYPES.get(obj.data_type())
        if storage is None:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {obj.data_type()}")
        ptr = int(obj.data_ptr())
        return DeviceArray(ptr, tuple(obj.shape()), storage, _C_cuda.pointer_device(ptr) if ptr else -1)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is None:
        if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
            return _from_dlpack(obj, name, stream=stream, writable=writable)
        raise TypeError(
            f"{name} must be a CUDA device array (torch CUDA tensor, __cuda_array_interface__, DLPack "
            f"or a CUDA OrtValue), got {type(obj).__name__}"
        )
    storage = _TYPESTR.get(cai["typestr"])
    if storage is None:
        raise TypeError(f"{name} must be float32 or float16, got typestr {cai['typestr']!r}")
    if cai.get("mask") is not None:
        raise ValueError(
            f"{name} has a mask (__cuda_array_interface__ 'mask'); masked arrays are not supported"
        )
    shape = tuple(cai["shape"])
    _check_c_contiguous(name, shape, cai.get("strides"), 4 if storage == F32 else 2)
    ptr, read_only = int(cai["data"][0]), bool(cai["data"][1])
    if writable and read_only:
        raise ValueError(f"{name} is read-only (__cuda_array_interface__ data[1]); it is written")
    dev = _C_cuda.pointer_device(ptr) if ptr else -1
    if dev < 0 and math.prod(shape) > 0:
        raise TypeError(f"{name} points to host memory; the CUDA step needs device memory")
    # v3: an integer stream is one the consumer must order itself after (0 is not allowed)
    producer = cai.get("stream") if cai.get("version", 0) >= 3 else None
    if producer is not None and (
        isinstance(producer, bool) or not isinstance(producer, int) or producer == 0
    ):
        raise ValueError(f"{name}: __cuda_array_interface__ stream {producer!r} is not a stream handle")
    return DeviceArray(ptr, shape, storage, dev, producer)


def _check_c_contiguous(name, shape, strides, itemsize) -> None:
    """strides in bytes, or None for C order. Empty arrays, and size-1 dimensions, take any stride."""
    if strides is None or math.prod(shape) == 0:
        return
    want, acc = [], itemsize
    for d in reversed(shape):
        want.append(acc)
        acc *= d
    if any(s != w for s, w, d in zip(strides, reversed(want), shape) if d > 1):
        raise ValueError(f"{name} must be C-contiguous, got strides {tuple(strides)}")


def _from_dlpack(obj, name: str, *, stream: int = 0, writable: bool = False) -> DeviceArray:
    from pydiff import _C

    dev_type, dev_id = obj.__dlpack_device__()
    if dev_type in (_DL_CPU, _DL_CUDA_HOST):
        raise TypeError(
            f"{name} is a host array (DLPack device type {int(dev_type)}); the CUDA step needs device "
            f"arrays (use pydiff.ops on the CPU)"
        )
    if dev_type not in (_DL_CUDA, _DL_CUDA_MANAGED):
        raise TypeError(f"{name} lives on DLPack device type {int(dev_type)}, not a CUDA GPU")
    # The consumer's stream, so that the producer orders its pending work before it (the DLPack
    # protocol; 0 is not allowed there: the legacy default stream is 1, as torch maps it).
    ptr, shape, strides, code, bits, lanes, read_only = _C.dlpack_info(obj.__dlpack__(stream=stream or 1))
    if writable and read_only:
        raise ValueError(f"{name} is read-only (its DLPack producer says so); it is written")
    storage = _DL_TYPES.get((code, bits)) if lanes == 1 else None
    if storage is None:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16, got DLPack dtype code {code} with {bits} bits"
        )
    item = bits // 8
    _check_c_contiguous(name, tuple(shape), None if strides is None else [s * item for s in strides], item)
    return DeviceArray(int(ptr), tuple(shape), storage, int(dev_id))


def stream_handle(stream) -> int:
    """The cudaStream_t of None (0, the legacy default stream), an integer handle, or a stream object
    (torch.cuda.Stream: `.cuda_stream`, CuPy: `.ptr`, or `.handle`)."""
    if stream is None:
        return 0
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, (bool, np.bool_)):
        return int(stream)
    for attr in ("cuda_stream", "ptr", "handle"):
        h = getattr(stream, attr, None)
        h = getattr(h, "value", h)  # Numba: .handle is a ctypes c_void_p (value None: stream 0)
        if isinstance(h, (int, np.integer)) and not isinstance(h, bool):
            return int(h)
        if h is None and attr == "handle" and hasattr(getattr(stream, attr, None), "value"):
            return 0
    raise TypeError(f"stream must be an integer handle or a stream object, got {type(stream).__name__}")


def workspace_bytes(batch: int, n: int) -> int:
    """Scratch bytes one dynamic-thresholding step needs for `batch` samples of `n` elements each."""
    if _C_cuda is None:
        raise ImportError(
            f"pydiff was built without the CUDA twin (reinstall with PYDIFF_CUDA=1): {_IMPORT_ERROR}"
        )
    return int(_C_cuda.workspace_bytes(int(batch), int(n)))


def fused_step(
    x,
    model_output,
    params,
    *,
    out,
    guidance_scale=None,
    x0_prev=None,
    x0_out=None,
    thresholds=None,
    nonfinite=None,
    stream=None,
    param_table=None,
    step_counter=None,
    workspace=None,
) -> None:
    """The fused denoising step on the GPU, queued on `stream` (see pydiff.ops.fused_step for the math).

    x, out, x0_prev, x0_out [B, ...] and model_output [B, ...] or [2B, ...] (with guidance) share one
    storage type; guidance_scale a number or a float32 [B] device array; thresholds float32 [B];
    nonfinite an int64 [1] device counter that the step adds to.

    For CUDA-graph replay (pydiff.cuda_graph): param_table, a uint8 device array holding
    ``pydiff._C.pack_step_params(rows)``, and step_counter, an int32 [1] device array: the step reads
    row ``step_counter[0]`` instead of `params` (whose prediction type and thresholding mode every row
    shares) and adds 1 to the counter, which must stay below the table's row count (the kernel
    cannot check it without a host synchronisation; GraphSampler resets it every run). workspace: a
    device buffer of at least
    ``workspace_bytes(B, n)`` bytes for dynamic thresholding (else it allocates stream-ordered).
    """
    from pydiff import _C

    c = _step_call(
        x,
        model_output,
        out,
        guidance_scale,
        x0_prev,
        x0_out,
        thresholds,
        nonfinite,
        stream,
        workspace,
        param_table=param_table,
        step_counter=step_counter,
    )
    _C.validate_step_params(params)  # the CPU twin's rules: the kernel takes them on trust
    _wait_for_producers(c.stream, c.device, c.producers)
    _C_cuda.fused_step(
        c.x,
        c.model_output,
        c.out,
        c.batch,
        c.n,
        c.storage,
        params,
        c.guided,
        c.scale,
        c.scales,
        c.x0_prev,
        c.x0_out,
        c.thresholds,
        c.nonfinite,
        c.stream,
        c.param_table,
        c.step_counter,
        c.workspace,
        c.workspace_bytes,
        c.device,
    )


def fused_step_rows(
    x,
    model_output,
    params,
    *,
    out,
    guidance_scale=None,
    x0_prev=None,
    x0_out=None,
    thresholds=None,
    nonfinite=None,
    stream=None,
    workspace=None,
) -> None:
    """fused_step with every row at a step of its own, on the GPU (see pydiff.ops.fused_step_rows for
    the math and the noise key: the CPU twin's values, bit for bit).

    Arrays as fused_step's. params: the host table of the rows, B pydiff._C.StepParams or a [B]
    STEP_PARAMS_DTYPE NumPy array (pydiff.ops.step_params_table), checked and copied at the call: the
    launches carry the rows as kernel arguments (32 rows a launch), so nothing is copied to the device or
    synchronised, and the table may be changed as soon as this returns. workspace: as fused_step's, for
    the rows with dynamic thresholding.
    """
    from pydiff import _C

    c = _step_call(
        x, model_output, out, guidance_scale, x0_prev, x0_out, thresholds, nonfinite, stream, workspace
    )
    # the twins' rules, here before any wait is queued (the binding checks them again)
    _C.validate_step_rows(params, c.batch, c.n, x0_prev is not None)
    _wait_for_producers(c.stream, c.device, c.producers)
    _C_cuda.fused_step_rows(
        c.x,
        c.model_output,
        c.out,
        c.batch,
        c.n,
        c.storage,
        params,
        c.guided,
        c.scale,
        c.scales,
        c.x0_prev,
        c.x0_out,
        c.thresholds,
        c.nonfinite,
        c.stream,
        c.workspace,
        c.workspace_bytes,
        c.device,
    )


class _StepCall(typing.NamedTuple):
    """The launch arguments of one fused step, from the checked device arrays (a tuple: cheap per step)."""

    x: int
    model_output: int
    out: int
    batch: int
    n: int
    storage: int
    guided: bool
    scale: float
    scales: int
    x0_prev: int
    x0_out: int
    thresholds: int
    nonfinite: int
    stream: int
    param_table: int
    step_counter: int
    workspace: int
    workspace_bytes: int
    device: int
    producers: tuple  # the streams the arrays' producers named, to wait for


def _step_call(
    x,
    model_output,
    out,
    guidance_scale,
    x0_prev,
    x0_out,
    thresholds,
    nonfinite,
    stream,
    workspace,
    *,
    param_table=None,
    step_counter=None,
) -> _StepCall:
    """Checks the arrays of a fused step (dtype, shape, device, layout, overlaps) into launch arguments."""
    from pydiff import _C

    handle = stream_handle(stream)
    xv = device_array(x, "x", stream=handle)
    mv = device_array(model_output, "model_output", stream=handle)
    ov = device_array(out, "out", stream=handle, writable=True)
    B = xv.shape[0] if xv.shape else 0
    n = math.prod(xv.shape[1:]) if B else 0  # math.prod: 0.2 us where np.prod takes 3.6 (a per-step call)
    guided = guidance_scale is not None
    want_mo = ((2 * B,) if guided else (B,)) + tuple(xv.shape[1:])
    if mv.shape != want_mo:
        raise ValueError(f"model_output must have shape {want_mo}, got {mv.shape}")
    views = {"x": xv, "model_output": mv, "out": ov}
    if ov.shape != xv.shape:
        raise ValueError(f"out must have shape {xv.shape}, got {ov.shape}")
    ptrs = {}
    for name, arr, write in (("x0_prev", x0_prev, False), ("x0_out", x0_out, True)):
        if arr is None:
            ptrs[name] = 0
            continue
        v = device_array(arr, name, stream=handle, writable=write)
        if v.shape != xv.shape:
            raise ValueError(f"{name} must have shape {xv.shape}, got {v.shape}")
        views[name] = v
        ptrs[name] = v.ptr
    for name, v in views.items():
        if v.storage != xv.storage:
            raise TypeError(f"{name} must have the same dtype as x")
    # the CPU twin's rule: an output may be an input exactly (in place), never a part of one
    half = B * n * (4 if xv.storage == F32 else 2)
    inputs = [("x", xv.ptr, xv.nbytes), ("model_output", mv.ptr, half)]
    if guided:
        inputs.append(("model_output", mv.ptr + half, half))
    _no_partial_overlap("out", ov.ptr, ov.nbytes, inputs)
    if "x0_out" in views:
        _no_partial_overlap("x0_out", ptrs["x0_out"], ov.nbytes, [("out", ov.ptr, ov.nbytes)])
    scale, scales_ptr = 1.0, 0
    if guided and np.ndim(guidance_scale) == 0:
        scale = float(guidance_scale)
        if not np.isfinite(scale):
            raise ValueError(f"guidance scale must be finite, got {scale}")
    elif guided:
        sv = device_array(guidance_scale, "guidance_scale", stream=handle)
        if sv.storage != F32 or sv.shape != (B,):
            raise ValueError(f"guidance_scale must be float32 of shape ({B},)")
        views["guidance_scale"], scales_ptr = sv, sv.ptr
    thr_ptr = 0
    if thresholds is not None:
        tv = device_array(thresholds, "thresholds", stream=handle, writable=True)
        if tv.storage != F32 or tv.shape != (B,):
            raise ValueError(f"thresholds must be float32 of shape ({B},)")
        views["thresholds"], thr_ptr = tv, tv.ptr
    raw = {}  # name -> (ptr, device, bytes, producer stream)
    if nonfinite is not None:
        raw["nonfinite"] = _raw_device_buffer(
            nonfinite, "nonfinite", dtype=np.int64, min_bytes=8, writable=True
        )
    if (param_table is None) != (step_counter is None):
        raise ValueError("param_table and step_counter go together")
    if param_table is not None:
        raw["param_table"] = _raw_device_buffer(
            param_table, "param_table", dtype=np.uint8, min_bytes=_C.STEP_PARAMS_BYTES
        )
        raw["step_counter"] = _raw_device_buffer(
            step_counter, "step_counter", dtype=np.int32, min_bytes=4, writable=True
        )
    if workspace is not None:
        raw["workspace"] = _raw_device_buffer(workspace, "workspace", writable=True)
    for name, v in views.items():
        if v.device != xv.device:
            raise ValueError(f"{name} is on GPU {v.device} but x is on GPU {xv.device}")
    for name, (_, dev, _, _) in raw.items():
        if dev != xv.device:
            raise ValueError(f"{name} is on GPU {dev} but x is on GPU {xv.device}")
    nf, table, counter, ws = (
        raw.get(k, (0, 0, 0, None)) for k in ("nonfinite", "param_table", "step_counter", "workspace")
    )
    return _StepCall(
        xv.ptr,
        mv.ptr,
        ov.ptr,
        B,
        n,
        xv.storage,
        guided,
        scale,
        scales_ptr,
        ptrs["x0_prev"],
        ptrs["x0_out"],
        thr_ptr,
        nf[0],
        handle,
        table[0],
        counter[0],
        ws[0],
        ws[2],
        xv.device,
        tuple(v.stream for v in views.values()) + tuple(r[3] for r in raw.values()),
    )


def _no_partial_overlap(name: str, ptr: int, nbytes: int, others) -> None:
    for other, optr, obytes in others:
        if ptr < optr + obytes and optr < ptr + nbytes and (ptr, nbytes) != (optr, obytes):
            raise ValueError(
                f"{name} partially overlaps {other} (it may be the same buffer, not a part of it)"
            )


def _same_stream(a: int, b: int) -> bool:
    return a == b or {a, b} == {0, 1}  # 0 (no stream given) is the legacy default stream, 1


def _wait_for_producers(consumer: int, device: int, producers) -> None:
    """Order `consumer` after the streams that arrays' producers named (CUDA Array Interface v3)."""
    for producer in dict.fromkeys(p for p in producers if p is not None):
        if not _same_stream(producer, consumer):
            _C_cuda.stream_wait(consumer, producer, device)


def _raw_device_buffer(obj, name: str, *, dtype=None, min_bytes: int = 0, writable: bool = False):
    """(device pointer, device, bytes, producer stream) of a contiguous device buffer (torch CUDA
    tensor or __cuda_array_interface__) of `dtype` (any if None) with at least `min_bytes`."""
    if isinstance(obj, np.ndarray):
        raise TypeError(f"{name} is a host (NumPy) array; it must live on the GPU")
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_cuda"):
        if not obj.is_cuda:
            raise TypeError(f"{name} is a CPU tensor; it must live on the GPU")
        if not obj.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        got = str(obj.dtype).replace("torch.", "")
        if dtype is not None and got != np.dtype(dtype).name:
            raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {got}")
        ptr, dev, nbytes, producer = int(obj.data_ptr()), int(obj.device.index), _nbytes(obj), None
    else:
        cai = getattr(obj, "__cuda_array_interface__", None)
        if cai is None:
            raise TypeError(f"{name} must be a torch CUDA tensor or have __cuda_array_interface__")
        if dtype is not None and np.dtype(cai["typestr"]) != np.dtype(dtype):
            raise TypeError(f"{name} must be {np.dtype(dtype).name}, got typestr {cai['typestr']!r}")
        _check_c_contiguous(name, tuple(cai["shape"]), cai.get("strides"), np.dtype(cai["typestr"]).itemsize)
        if writable and cai["data"][1]:
            raise ValueError(f"{name} is read-only (__cuda_array_interface__ data[1]); it is written")
        ptr, nbytes = int(cai["data"][0]), _nbytes(obj)
        dev = _C_cuda.pointer_device(ptr) if ptr else -1
        if dev < 0:
            raise TypeError(f"{name} points to host memory; it must live on the GPU")
        producer = cai.get("stream") if cai.get("version", 0) >= 3 else None
    if nbytes < min_bytes:
        raise ValueError(f"{name} has {nbytes} bytes; it needs at least {min_bytes}")
    return ptr, dev, nbytes, producer


def _nbytes(obj) -> int:
    if hasattr(obj, "element_size"):
        return int(obj.numel() * obj.element_size())
    cai = obj.__cuda_array_interface__
    return math.prod(cai["shape"]) * np.dtype(cai["typestr"]).itemsize


def randn(out, seed: int, step: int = 0, *, offset: int = 0, stream=None) -> None:
    """The in-kernel noise stream (seed, step) into a float32 device array: the CPU twin's values, bit for bit."""
    handle = stream_handle(stream)
    v = device_array(out, "out", stream=handle, writable=True)
    if v.storage != F32:
        raise TypeError("out must be float32")
    _wait_for_producers(handle, v.device, [v.stream])
    _C_cuda.randn(
        v.ptr, math.prod(v.shape), seed, step, offset, handle, v.device
    )  # ranges: as pydiff.ops.randn
