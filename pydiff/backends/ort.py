"""ONNX Runtime sessions and execution providers: the one place pydiff creates a session.

The stage networks, the text encoder, the guidance models and the TensorRT backend's helpers all
take their sessions from `create_session`, on providers chosen by `resolve_providers`.
Providers: None (CUDA where this onnxruntime build has it, else CPU, silently), "auto" (the same,
with a warning when it falls back to the CPU), "cpu", "cuda", "tensorrt", or a list of ONNX Runtime
provider names (with options, as ORT takes them).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pydiff.cuda import stream_handle
from pydiff.errors import BackendUnavailableError, PackageError

DEFAULT_TRT_CACHE = "~/.cache/pydiff/trt"


def trt_cache_dir(path=None) -> Path:
    """TensorRT's engine cache folder (the tensorrt backend's and ORT's TensorRT provider's):
    `path`, else $PYDIFF_TRT_CACHE, else ~/.cache/pydiff/trt."""
    return Path(path or os.environ.get("PYDIFF_TRT_CACHE") or DEFAULT_TRT_CACHE).expanduser()


CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# --provider choice -> ORT providers, in priority order (CPU stays as the fallback for odd nodes)
PROVIDER_CHOICES = {"cpu": (CPU,), "cuda": (CUDA, CPU), "tensorrt": (TENSORRT, CUDA, CPU)}
# The CUDA provider's options when pydiff picks it (None, "auto", "cuda", "tensorrt"): TF32 off, so a
# seed gives the CPU provider's image (ORT's default, TF32 on, rounds convolutions and matmuls to
# 10-bit mantissas and the sampling trajectory drifts: up to 223/255 on the H200, against 1/255
# with TF32 off). A provider list passed by the caller keeps ORT's defaults, or its own.
CUDA_DEFAULT_OPTIONS = {"use_tf32": "0"}
ORT_TYPES = {np.float32: "tensor(float)", np.int64: "tensor(int64)"}


def _default_options(provider: str) -> dict:
    """Options of a provider pydiff picks: TF32 off on CUDA; TensorRT's engines cached on disk
    (else ORT rebuilds them in every process), next to the tensorrt backend's."""
    if provider == CUDA:
        return dict(CUDA_DEFAULT_OPTIONS)
    if provider == TENSORRT:
        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(trt_cache_dir() / "ort")}
    return {}


def default_providers() -> list:
    """CUDA first (TF32 off) where this onnxruntime build has it, CPU always as the fallback."""

    return resolve_providers("cuda" if CUDA in ort.get_available_providers() else "cpu")


def resolve_providers(providers=None, device_id: int = 0, stream=None) -> list:
    """ORT's provider list for None, "auto", "cpu", "cuda", "tensorrt" or a list of ORT names.

    `stream`: a cudaStream_t (or stream object) for the CUDA provider to compute on
    (`user_compute_stream`); needs the CUDA provider, and a stream other than the legacy default
    stream 0, which ONNX Runtime takes for "none".
    """

    if stream is not None:
        handle = stream_handle(stream)
        if handle == 0:
            raise ValueError(
                "stream: ONNX Runtime takes stream 0 (the legacy default stream) for "
                "'none'; create one, e.g. torch.cuda.Stream(), and pass it"
            )
        chosen = resolve_providers("cuda" if providers is None else providers, device_id)
        names = [p if isinstance(p, str) else p[0] for p in chosen]
        if CUDA not in names:
            raise ValueError(
                f"stream: only the CUDA provider computes on a caller's stream, and the "
                f"providers are {names}; choose providers='cuda'"
            )
        for i, name in enumerate(names):
            if name not in (CUDA, TENSORRT):
                continue
            opts = dict(chosen[i][1]) if not isinstance(chosen[i], str) else {"device_id": device_id}
            # decimal, as ORT parses it. ORT takes a device's streams from its first provider, so
            # TensorRT needs the stream too; its option parser knows no has_user_compute_stream
            opts["user_compute_stream"] = str(handle)
            if name == CUDA:
                opts["has_user_compute_stream"] = "1"
            chosen[i] = (name, opts)
        return chosen
    if providers is None:
        return default_providers()
    available = ort.get_available_providers()
    if isinstance(providers, str):
        key = providers.lower()
        if key == "auto":
            key = "cuda" if CUDA in available else "cpu"
            if key == "cpu":
                warnings.warn(
                    f"providers='auto': this onnxruntime {ort.__version__} build has no "
                    f"{CUDA} (it has {available}); running on the CPU. For the GPU: "
                    f"pip uninstall onnxruntime && pip install onnxruntime-gpu",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if key not in PROVIDER_CHOICES:
            raise ValueError(
                f"unknown provider {providers!r}; choose one of "
                f"{['auto', *PROVIDER_CHOICES]} or a list of ONNX Runtime provider names"
            )
        names = PROVIDER_CHOICES[key]
        chosen = [p if p == CPU else (p, {"device_id": device_id, **_default_options(p)}) for p in names]
    else:
        chosen = list(providers)
        names = [p if isinstance(p, str) else p[0] for p in chosen]
    missing = [p for p in names if p not in available]
    if missing:
        raise BackendUnavailableError(
            f"this onnxruntime {ort.__version__} build lacks {missing} (it has {available}); "
            f"the CUDA and TensorRT providers come with the GPU build: pip uninstall onnxruntime && "
            f"pip install onnxruntime-gpu (TensorRT also needs NVIDIA's TensorRT libraries), or "
            f"choose the CPU (providers='cpu', --provider cpu)"
        )
    return chosen


def server_session_options() -> ort.SessionOptions:
    """Session options for a long-running server: intra-op threads that block when idle.

    By default each session's threads spin after a run, waiting for the next; a server alternates
    between sessions (text encoder, each stage), the fused step's OpenMP threads and its own Python
    threads, which those spinning threads starve. benchmarks/bench_serve.py measures both settings.
    """
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def create_session(path, providers, session_options=None, *, required=None):
    """An InferenceSession of `path` on `providers`, without ONNX Runtime's silent fallbacks.

    ONNX Runtime skips a provider whose libraries do not load (no GPU, no CUDA 13 / cuDNN 9) with
    a log line, and when TensorRT's fails it retries on CUDA and CPU without the provider options
    (TF32 off, the caller's stream: lost). Here the retry is off, and a provider in `required`
    (default: every GPU provider asked for; () accepts whatever ONNX Runtime could start) that the
    session lacks is a BackendUnavailableError. A model ONNX Runtime cannot load is a PackageError.
    """

    providers = list(providers)
    names = [p if isinstance(p, str) else p[0] for p in providers]
    required = [n for n in names if n != CPU] if required is None else list(required)
    try:
        sess = ort.InferenceSession(
            str(path), sess_options=session_options, providers=providers, enable_fallback=0
        )
    except Exception as e:  # ORT raises its own exception types for corrupt/truncated files
        if names != [CPU]:
            try:  # the provider, or the model? the CPU provider tells them apart
                ort.InferenceSession(str(path), sess_options=session_options, providers=[CPU])
            except Exception:
                pass
            else:
                raise BackendUnavailableError(
                    f"{path}: ONNX Runtime could not start {[n for n in names if n != CPU]} "
                    f"({_first_line(e)}); choose providers='cpu' or 'cuda'"
                ) from None
        raise PackageError(f"{path}: ONNX Runtime cannot load this model ({_first_line(e)})") from None
    missing = [n for n in required if n not in sess.get_providers()]
    if missing:
        raise BackendUnavailableError(
            f"{path}: ONNX Runtime could not start {missing} (the session has {sess.get_providers()}): "
            f"no usable GPU, or the CUDA 13 / cuDNN 9 (and for TensorRT, TensorRT's) libraries are not "
            f"found; ONNX Runtime's log above says which. Or choose providers='cpu'"
        )
    return sess


def check_interface(name, iface: dict, dtype) -> tuple:
    """The shape of an array interface (NumPy's or CUDA's) of `dtype`, C-contiguous, else raise."""
    shape = tuple(iface["shape"])
    if np.dtype(iface["typestr"]) != np.dtype(dtype):
        raise TypeError(
            f"{name}: expected {np.dtype(dtype)}, got {np.dtype(iface['typestr'])} "
            f"(device arrays are not converted)"
        )
    strides, itemsize = iface.get("strides"), np.dtype(dtype).itemsize
    dense = [itemsize * int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
    if strides is not None and any(n > 1 and s != d for n, s, d in zip(shape, strides, dense)):
        raise ValueError(f"{name}: must be C-contiguous (strides {tuple(strides)}, shape {shape})")
    if name == "out" and iface["data"][1]:
        raise ValueError("out: is read-only")
    return shape
