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
import onnxruntime as ort

from pydiff.backends.base import Backend, StageModel
from pydiff.backends.ort import (
    CUDA,
    ORT_TYPES,
    TENSORRT,
    check_interface,
    create_session,
    resolve_providers,
)
from pydiff.backends.text_encoder import load_text_encoder
from pydiff.cuda import stream_handle
from pydiff.errors import ModelOutputError, NetworkRunError
from pydiff.package import Package, check_stage_io, input_dtype


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
        self._async = None  # RunOptions of run_device(stream=), made on first use

    def __call__(self, x, t, cond=None):
        feeds = self.feeds(x, t, cond)
        try:
            (out,) = self.session.run(self._outputs, feeds)
        except Exception as e:  # ORT's own exception types (Fail, InvalidArgument, ...), any of them
            raise self.run_error(e) from e
        if out.shape != x.shape:
            raise ModelOutputError(
                f"stage {self.stage.name!r} ({self.stage.onnx.name}): the network returned shape "
                f"{out.shape} for a sample of shape {x.shape}"
            )
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
                raise ValueError(
                    f"stream: stage {self.stage.name!r} computes on ONNX Runtime's own "
                    f"stream; to enqueue on {handle:#x}, load with providers='cuda', "
                    f"stream=<that stream>"
                )
            if handle != self.stream:
                raise ValueError(
                    f"stream: stage {self.stage.name!r} computes on stream "
                    f"{self.stream:#x}, not {handle:#x}; run on the stream it was loaded with"
                )
            run_options = self._async_run_options()
        binding = self.session.io_binding()
        keep = []  # host arrays bound by pointer must outlive run_with_iobinding
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
        try:
            self.session.run_with_iobinding(binding, run_options)
        except Exception as e:  # as in __call__
            raise self.run_error(e) from e
        if out is None:
            (out,) = binding.get_outputs()
            if tuple(out.shape()) != x_shape:
                raise ModelOutputError(
                    f"stage {self.stage.name!r} ({self.stage.onnx.name}): the network returned shape "
                    f"{tuple(out.shape())} for a sample of shape {x_shape}"
                )
        return out

    def run_error(self, e: Exception) -> NetworkRunError:
        """ONNX Runtime's failure running this stage's network, as pydiff's error naming both."""
        return NetworkRunError(
            f"stage {self.stage.name!r} ({self.stage.onnx.name}): ONNX Runtime failed running the "
            f"network: {_first_line(e)}"
        )

    def _async_run_options(self):
        """RunOptions that leave the run enqueued on the session's stream (made once, reused per step)."""
        if self._async is None:
            opts = ort.RunOptions()
            opts.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self._async = opts
        return self._async

    def _bind(self, binding, name, value, keep, bind) -> tuple:
        """Bind `value` as input (or output "out") `name`; returns its shape."""

        port = self.stage.output if name == "out" else name
        dtype = np.float32 if name == "out" else input_dtype(name)
        if isinstance(value, ort.OrtValue):
            if value.data_type() != ORT_TYPES[dtype]:
                raise TypeError(
                    f"{name}: expected an OrtValue of {ORT_TYPES[dtype]}, got {value.data_type()}"
                )
            if name == "out":
                binding.bind_ortvalue_output(port, value)
            else:
                binding.bind_ortvalue_input(port, value)
            return tuple(value.shape())
        if hasattr(value, "__cuda_array_interface__"):
            device, iface = "cuda", value.__cuda_array_interface__
            if self.device != "cuda":
                raise ValueError(
                    f"{name}: a CUDA array, but this session runs on "
                    f"{self.session.get_providers()}; load with providers='cuda'"
                )
            dev = getattr(value, "device", None)  # torch: .device.index; CuPy: .device.id
            index = getattr(dev, "index", getattr(dev, "id", None))
            if index is not None and index != self.device_id:
                raise ValueError(f"{name}: on CUDA device {index}, the session on {self.device_id}")
        elif name == "out":
            if not isinstance(value, np.ndarray):
                raise TypeError(
                    f"out: expected an OrtValue, a CUDA array or a NumPy array, got {type(value).__name__}"
                )
            device, iface = "cpu", value.__array_interface__
        else:  # host data: converted like __call__'s feeds, bound by pointer like a device array
            value = np.ascontiguousarray(value, dtype=dtype)
            keep.append(value)
            device, iface = "cpu", value.__array_interface__
        shape = check_interface(name, iface, dtype)
        bind(port, device, self.device_id if device == "cuda" else 0, dtype, list(shape), iface["data"][0])
        return shape


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _on_device(v) -> bool:
    """An OrtValue or a CUDA array: bound as it is, never converted."""

    return isinstance(v, ort.OrtValue) or hasattr(v, "__cuda_array_interface__")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self, package: Package, providers=None, session_options=None, device_id: int = 0, stream=None
    ):
        super().__init__(package)
        self.providers = resolve_providers(providers, device_id, stream)
        # None and "auto" take the CPU when no GPU provider starts (auto says so); an explicit
        # choice, or a stream, gets what it asked for or a BackendUnavailableError
        lenient = stream is None and (
            providers is None or (isinstance(providers, str) and providers.lower() == "auto")
        )
        required = () if lenient else None
        for stage in package.stages:
            sess = create_session(stage.onnx, self.providers, session_options, required=required)
            check_stage_io(package, stage, sess)
            self.stage_models[stage.name] = OrtStageModel(stage, sess)
        self.text_encoder = load_text_encoder(package, self.providers, session_options, required=required)
        started = next(iter(self.stage_models.values())).session.get_providers() if self.stage_models else []
        wanted = [p if isinstance(p, str) else p[0] for p in self.providers]
        if lenient and isinstance(providers, str) and CUDA in wanted and CUDA not in started:
            warnings.warn(
                f"providers='auto': ONNX Runtime could not start {CUDA} (no usable GPU, or "
                f"the CUDA 13 / cuDNN 9 libraries are not found; its log says which); "
                f"running on the CPU",
                RuntimeWarning,
                stacklevel=3,
            )

    def describe(self) -> dict:
        sess = next(iter(self.stage_models.values())).session
        return {"backend": self.name, "providers": list(sess.get_providers())}
