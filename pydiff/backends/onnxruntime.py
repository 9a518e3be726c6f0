"""ONNX Runtime backend: one InferenceSession per stage, created once and shared by all calls.

Providers: `providers=` None (CUDA where this onnxruntime build has it, else CPU, silently),
"auto" (the same, with a warning when it falls back to the CPU), "cpu", "cuda", "tensorrt", or a
list of ONNX Runtime provider names (with options, as ORT takes them). A provider this build lacks,
or one it cannot start, is a `BackendUnavailableError` (create_session; not given / "auto" take the
CPU instead). The CUDA provider that pydiff picks runs with TF32 off (CUDA_DEFAULT_OPTIONS): a seed
then gives the CPU provider's image (ORT's TensorRT provider keeps TensorRT's TF32 default).

`OrtStageModel.run_device` runs a stage through ORT IO binding, so that callers holding device
arrays (OrtValues, torch CUDA tensors) chain network calls and pydiff's CUDA step without host copies.
With `stream=` (a cudaStream_t; the CUDA provider's `user_compute_stream`) the sessions compute on the
caller's stream, and `run_device(..., stream=)` returns without synchronising: what
pydiff.cuda_graph needs to capture the network and the step in one CUDA graph.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..cuda import stream_handle
from ..package import Package, PackageError, check_stage_io, check_text_encoder_io
from .base import Backend, BackendUnavailableError, ModelOutputError, StageModel, input_dtype

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# --provider choice -> ORT providers, in priority order (CPU stays as the fallback for odd nodes)
PROVIDER_CHOICES = {"cpu": (CPU,), "cuda": (CUDA, CPU), "tensorrt": (TENSORRT, CUDA, CPU)}
# The CUDA provider's options when pydiff picks it (None, "auto", "cuda", "tensorrt"): TF32 off, so a
# seed gives the CPU provider's image (ORT's default, TF32 on, rounds convolutions and matmuls to
# 10-bit mantissas and the sampling trajectory drifts: up to 223/255 on the H200, against 1/255
# with TF32 off). A provider list passed by the caller keeps ORT's defaults, or its own.
CUDA_DEFAULT_OPTIONS = {"use_tf32": "0"}
_ORT_TYPES = {np.float32: "tensor(float)", np.int64: "tensor(int64)"}


def _default_options(provider: str) -> dict:
    """Options of a provider pydiff picks: TF32 off on CUDA; TensorRT's engines cached on disk
    (else ORT rebuilds them in every process), next to the tensorrt backend's."""
    if provider == CUDA:
        return dict(CUDA_DEFAULT_OPTIONS)
    if provider == TENSORRT:
        from .tensorrt import cache_dir

        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir() / "ort")}
    return {}


def default_providers() -> list:
    """CUDA first (TF32 off) where this onnxruntime build has it, CPU always as the fallback."""
    import onnxruntime as ort

    return resolve_providers("cuda" if CUDA in ort.get_available_providers() else "cpu")


def resolve_providers(providers=None, device_id: int = 0, stream=None) -> list:
    """ORT's provider list for None, "auto", "cpu", "cuda", "tensorrt" or a list of ORT names.

    `stream`: a cudaStream_t (or stream object) for the CUDA provider to compute on
    (`user_compute_stream`); needs the CUDA provider, and a stream other than the legacy default
    stream 0, which ONNX Runtime takes for "none".
    """
    import onnxruntime as ort

    if stream is not None:
        handle = stream_handle(stream)
        if handle == 0:
            raise ValueError("stream: ONNX Runtime takes stream 0 (the legacy default stream) for "
                             "'none'; create one, e.g. torch.cuda.Stream(), and pass it")
        chosen = resolve_providers("cuda" if providers is None else providers, device_id)
        names = [p if isinstance(p, str) else p[0] for p in chosen]
        if CUDA not in names:
            raise ValueError(f"stream: only the CUDA provider computes on a caller's stream, and the "
                             f"providers are {names}; choose providers='cuda'")
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
                warnings.warn(f"providers='auto': this onnxruntime {ort.__version__} build has no "
                              f"{CUDA} (it has {available}); running on the CPU. For the GPU: "
                              f"pip uninstall onnxruntime && pip install onnxruntime-gpu",
                              RuntimeWarning, stacklevel=3)
        if key not in PROVIDER_CHOICES:
            raise ValueError(f"unknown provider {providers!r}; choose one of "
                             f"{['auto', *PROVIDER_CHOICES]} or a list of ONNX Runtime provider names")
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
            f"choose the CPU (providers='cpu', --provider cpu)")
    return chosen


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
    import onnxruntime as ort

    providers = list(providers)
    names = [p if isinstance(p, str) else p[0] for p in providers]
    required = [n for n in names if n != CPU] if required is None else list(required)
    try:
        sess = ort.InferenceSession(str(path), sess_options=session_options, providers=providers,
                                    enable_fallback=0)
    except Exception as e:  # ORT raises its own exception types for corrupt/truncated files
        if names != [CPU]:
            try:   # the provider, or the model? the CPU provider tells them apart
                ort.InferenceSession(str(path), sess_options=session_options, providers=[CPU])
            except Exception:
                pass
            else:
                raise BackendUnavailableError(f"{path}: ONNX Runtime could not start {[n for n in names if n != CPU]} "
                                              f"({_first_line(e)}); choose providers='cpu' or 'cuda'") from None
        raise PackageError(f"{path}: ONNX Runtime cannot load this model ({_first_line(e)})") from None
    missing = [n for n in required if n not in sess.get_providers()]
    if missing:
        raise BackendUnavailableError(
            f"{path}: ONNX Runtime could not start {missing} (the session has {sess.get_providers()}): "
            f"no usable GPU, or the CUDA 13 / cuDNN 9 (and for TensorRT, TensorRT's) libraries are not "
            f"found; ONNX Runtime's log above says which. Or choose providers='cpu'")
    return sess


def load_text_encoder(package: Package, providers, session_options=None, *, required=()):
    """The package's TextEncoder (ORT session checked against the format), or None.
    `required`: as create_session's (default: whatever providers ONNX Runtime could start)."""
    te = package.text_encoder
    if te is None:
        return None
    from ..text_encoder import TextEncoder

    session = create_session(te.onnx, providers, session_options, required=required)
    try:
        enc = TextEncoder(str(te.onnx), str(te.tokenizer), te.max_length, session=session,
                          per_prompt=te.encode == "per_prompt")
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PackageError(f"{te.onnx} / {te.tokenizer}: cannot load the text encoder ({msg})") from None
    check_text_encoder_io(package, enc.session)
    return enc


class OrtStageModel(StageModel):
    def __init__(self, stage, session):
        super().__init__(stage)
        self.session = session
        self._outputs = [stage.output]
        # where run_device binds: the CUDA (or TensorRT) provider's device when the session has it
        po = session.get_provider_options()
        opts = po.get(CUDA) or po.get(TENSORRT)
        self.device = "cuda" if opts is not None else "cpu"
        self.device_id = int(opts.get("device_id", 0)) if opts is not None else 0
        # the caller's stream the CUDA provider computes on (user_compute_stream), else None
        user = int(opts.get("user_compute_stream", 0) or 0) if opts is not None else 0
        self.stream = user or None
        self._async = None   # RunOptions of run_device(stream=), made on first use

    def __call__(self, x, t, cond=None):
        (out,) = self.session.run(self._outputs, self.feeds(x, t, cond))
        if out.shape != x.shape:
            raise ModelOutputError(f"stage {self.stage.name!r}: the network returned shape {out.shape} "
                               f"for a sample of shape {x.shape}")
        return out

    def run_device(self, x, t, cond=None, *, out=None, stream=None):
        """One network call through ORT IO binding; returns `out`, or the output OrtValue.

        `x` [B,C,H,W] f32, `t` [B] f32 (a host scalar is broadcast), `cond` name -> [B,...]: each an
        OrtValue, a device array with `__cuda_array_interface__` (torch CUDA tensor, CuPy), or host
        data (copied in by ORT). Device arrays must have the input's dtype, be C-contiguous and be
        complete on their stream. `out`: None (ORT allocates it on the session's device, `.device`),
        or an OrtValue / device array / NumPy array of x's shape, f32, C-contiguous, written in place.

        `stream`: None (ORT synchronises before it returns), or the stream this session computes on
        (loaded with `stream=`): the call is then only enqueued there, as TensorRT's is, and the
        caller synchronises that stream before reading `out` elsewhere.
        """
        run_options = None
        if stream is not None:
            handle = stream_handle(stream)
            if self.stream is None:
                raise ValueError(f"stream: stage {self.stage.name!r} computes on ONNX Runtime's own "
                                 f"stream; to enqueue on {handle:#x}, load with providers='cuda', "
                                 f"stream=<that stream>")
            if handle != self.stream:
                raise ValueError(f"stream: stage {self.stage.name!r} computes on stream "
                                 f"{self.stream:#x}, not {handle:#x}; run on the stream it was loaded with")
            run_options = self._async_run_options()
        binding = self.session.io_binding()
        keep = []   # host arrays bound by pointer must outlive run_with_iobinding
        values = self.input_values(x, t, cond)

        x_shape = self._bind(binding, "sample", x, keep, binding.bind_input)
        if not _on_device(t):
            values["timestep"] = np.broadcast_to(np.asarray(t, np.float32), x_shape[:1])
        for name, value in values.items():
            if name != "sample":
                self._bind(binding, name, value, keep, binding.bind_input)
        if out is None:
            binding.bind_output(self.stage.output, self.device, self.device_id)
        else:
            out_shape = self._bind(binding, "out", out, keep, binding.bind_output)
            if out_shape != x_shape:
                raise ValueError(f"out: shape {out_shape} differs from the sample's {x_shape}")
        self.session.run_with_iobinding(binding, run_options)
        if out is None:
            (out,) = binding.get_outputs()
            if tuple(out.shape()) != x_shape:
                raise ModelOutputError(f"stage {self.stage.name!r}: the network returned shape "
                                   f"{tuple(out.shape())} for a sample of shape {x_shape}")
        return out

    def _async_run_options(self):
        """RunOptions that leave the run enqueued on the session's stream (made once, reused per step)."""
        if self._async is None:
            import onnxruntime as ort

            opts = ort.RunOptions()
            opts.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self._async = opts
        return self._async

    def _bind(self, binding, name, value, keep, bind) -> tuple:
        """Bind `value` as input (or output "out") `name`; returns its shape."""
        import onnxruntime as ort

        port = self.stage.output if name == "out" else name
        dtype = np.float32 if name == "out" else input_dtype(name)
        if isinstance(value, ort.OrtValue):
            if value.data_type() != _ORT_TYPES[dtype]:
                raise TypeError(f"{name}: expected an OrtValue of {_ORT_TYPES[dtype]}, got "
                                f"{value.data_type()}")
            if name == "out":
                binding.bind_ortvalue_output(port, value)
            else:
                binding.bind_ortvalue_input(port, value)
            return tuple(value.shape())
        if hasattr(value, "__cuda_array_interface__"):
            device, iface = "cuda", value.__cuda_array_interface__
            if self.device != "cuda":
                raise ValueError(f"{name}: a CUDA array, but this session runs on "
                                 f"{self.session.get_providers()}; load with providers='cuda'")
            dev = getattr(value, "device", None)   # torch: .device.index; CuPy: .device.id
            index = getattr(dev, "index", getattr(dev, "id", None))
            if index is not None and index != self.device_id:
                raise ValueError(f"{name}: on CUDA device {index}, the session on {self.device_id}")
        elif name == "out":
            if not isinstance(value, np.ndarray):
                raise TypeError(f"out: expected an OrtValue, a CUDA array or a NumPy array, got "
                                f"{type(value).__name__}")
            device, iface = "cpu", value.__array_interface__
        else:   # host data: converted like __call__'s feeds, bound by pointer like a device array
            value = np.ascontiguousarray(value, dtype=dtype)
            keep.append(value)
            device, iface = "cpu", value.__array_interface__
        shape = _check_interface(name, iface, dtype)
        bind(port, device, self.device_id if device == "cuda" else 0, dtype, list(shape),
             iface["data"][0])
        return shape


def _on_device(v) -> bool:
    """An OrtValue or a CUDA array: bound as it is, never converted."""
    import onnxruntime as ort

    return isinstance(v, ort.OrtValue) or hasattr(v, "__cuda_array_interface__")


def _check_interface(name, iface: dict, dtype) -> tuple:
    """The shape of an array interface (NumPy's or CUDA's) of `dtype`, C-contiguous, else raise."""
    shape = tuple(iface["shape"])
    if np.dtype(iface["typestr"]) != np.dtype(dtype):
        raise TypeError(f"{name}: expected {np.dtype(dtype)}, got {np.dtype(iface['typestr'])} "
                        f"(device arrays are not converted)")
    strides, itemsize = iface.get("strides"), np.dtype(dtype).itemsize
    dense = [itemsize * int(np.prod(shape[i + 1:])) for i in range(len(shape))]
    if strides is not None and any(n > 1 and s != d for n, s, d in zip(shape, strides, dense)):
        raise ValueError(f"{name}: must be C-contiguous (strides {tuple(strides)}, shape {shape})")
    if name == "out" and iface["data"][1]:
        raise ValueError("out: is read-only")
    return shape


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, package: Package, providers=None, session_options=None, device_id: int = 0,
                 stream=None):
        super().__init__(package)
        self.providers = resolve_providers(providers, device_id, stream)
        # None and "auto" take the CPU when no GPU provider starts (auto says so); an explicit
        # choice, or a stream, gets what it asked for or a BackendUnavailableError
        lenient = stream is None and (providers is None or (isinstance(providers, str)
                                                             and providers.lower() == "auto"))
        required = () if lenient else None
        for stage in package.stages:
            sess = create_session(stage.onnx, self.providers, session_options, required=required)
            check_stage_io(package, stage, sess)
            self.stage_models[stage.name] = OrtStageModel(stage, sess)
        self.text_encoder = load_text_encoder(package, self.providers, session_options, required=required)
        started = next(iter(self.stage_models.values())).session.get_providers() if self.stage_models else []
        wanted = [p if isinstance(p, str) else p[0] for p in self.providers]
        if lenient and isinstance(providers, str) and CUDA in wanted and CUDA not in started:
            warnings.warn(f"providers='auto': ONNX Runtime could not start {CUDA} (no usable GPU, or "
                          f"the CUDA 13 / cuDNN 9 libraries are not found; its log says which); "
                          f"running on the CPU", RuntimeWarning, stacklevel=3)

    def describe(self) -> dict:
        sess = next(iter(self.stage_models.values())).session
        return {"backend": self.name, "providers": list(sess.get_providers())}
