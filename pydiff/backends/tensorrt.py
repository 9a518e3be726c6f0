"""TensorRT backend: one engine per stage, built from the stage's ONNX file and cached on disk.

Needs NVIDIA TensorRT (`pip install 'pydiff[tensorrt]'`: the tensorrt-cu13 wheel), a CUDA GPU and
torch (device buffers, streams, the GPU's name); all imported lazily. Engines run on the current CUDA
device (torch.cuda.set_device picks another). The text encoder and the guidance models still run on
ONNX Runtime.

Engine cache: `<dir>/<onnx stem>-<key>.engine`, dir = the `cache_dir` argument, else
$PYDIFF_TRT_CACHE, else ~/.cache/pydiff/trt. The key is the sha256 of the ONNX file's sha256, the
GPU's name and compute capability, the TensorRT version and the build options (fp16, tf32, the
batch profile, the version of the float16 graph rewrite), so a change to any of them builds a new
engine. Files are written atomically (temp file + os.replace) and carry a checksum; a corrupt or
truncated file is rebuilt with a warning.

fp16: TensorRT 10 gets its FP16 builder flag (it then picks float16 or float32 per layer); TensorRT 11
removed that flag (its networks are strongly typed), so there the ONNX graph is first rewritten to
compute in float16 with float32 inputs and outputs (`pydiff.backends.float16`, needs the
`onnx` package) and built as a strongly typed network.
"""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pydiff.backends.base import Backend, StageModel
from pydiff.backends.float16 import VERSION as FLOAT16_VERSION
from pydiff.backends.float16 import convert as float16_convert
from pydiff.backends.ort import check_interface, resolve_providers, trt_cache_dir
from pydiff.backends.text_encoder import load_text_encoder
from pydiff.cuda import stream_handle
from pydiff.errors import BackendUnavailableError, PackageError
from pydiff.files import atomic_write_bytes
from pydiff.package import Package, input_dtype

MAGIC = b"pydiff-trt-engine 1\n"  # then sha256(engine) (32 bytes), then the engine


@dataclass(frozen=True)
class EngineOptions:
    """Build options; every field is part of the cache key."""

    fp16: bool = False
    min_batch: int = 1  # the dynamic-batch optimisation profile (batch = dim 0 of every input)
    opt_batch: int = 2
    max_batch: int = 32  # classifier-free guidance doubles the batch: 16 images
    tf32: bool = False  # TensorRT's default is on; off, fp32 layers round as the CPU provider's do

    def __post_init__(self):
        b = (self.min_batch, self.opt_batch, self.max_batch)
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in b)
        if not ints or not 1 <= b[0] <= b[1] <= b[2]:
            raise ValueError(f"need integers 1 <= min_batch <= opt_batch <= max_batch, got {b}")


def import_tensorrt():
    try:
        import tensorrt  # lazily: the [tensorrt] extra
    except ImportError as e:
        raise BackendUnavailableError(
            f"the tensorrt backend needs NVIDIA TensorRT, which does not import here ({e}); install "
            f"it with: pip install 'pydiff[tensorrt]' (the tensorrt-cu13 wheel, for CUDA 13 "
            f"drivers), or use backend='onnxruntime'"
        ) from e
    return tensorrt


def gpu_identity() -> tuple[str, str]:
    """(name, compute capability "major.minor") of the current CUDA device."""
    try:
        import torch  # lazily: device buffers and streams, on a GPU only
    except ImportError as e:
        raise BackendUnavailableError(
            f"the tensorrt backend needs torch for device buffers and "
            f"streams ({e}): pip install 'pydiff[torch]'"
        ) from e
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"the tensorrt backend needs a CUDA GPU, and torch {torch.__version__} sees none"
        )
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def engine_key(
    onnx_bytes: bytes,
    gpu: tuple[str, str],
    trt_version: str,
    options: EngineOptions,
    graph_rewrite: str | None = None,
) -> str:
    """What an engine depends on, hashed: the ONNX bytes, the GPU, TensorRT, the build options and
    the rewrite the graph goes through before TensorRT parses it (None: parsed as it is)."""
    fields = {
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "gpu": gpu[0],
        "compute_capability": gpu[1],
        "tensorrt": trt_version,
        **asdict(options),
    }
    if graph_rewrite is not None:
        fields["graph_rewrite"] = graph_rewrite
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def graph_rewrite(trt, options: EngineOptions) -> str | None:
    """The rewrite an ONNX file needs before this TensorRT builds it with these options: fp16 on a
    TensorRT without the FP16 builder flag (11 and later) is a float16 graph; otherwise none."""
    if options.fp16 and not hasattr(trt.BuilderFlag, "FP16"):
        return f"mixed-precision-fp16-v{FLOAT16_VERSION}"
    return None


def check_options(trt, options: EngineOptions) -> None:
    """Refuse what cannot be built here, before any work: fp16 on TensorRT 11 rewrites the ONNX
    graph, which needs the onnx package."""
    if graph_rewrite(trt, options) is not None:
        try:
            import onnx  # noqa: F401
        except ImportError as e:
            raise BackendUnavailableError(
                f"fp16=True on TensorRT {trt.__version__} (strongly typed networks, no FP16 builder "
                f"flag) rewrites the ONNX graph to float16, which needs the onnx package ({e}): "
                f"pip install onnx, or use fp16=False"
            ) from e


def float16_graph(onnx_bytes: bytes, what: str, path: str | None = None) -> bytes:
    """The ONNX model rewritten to compute in float16 with float32 inputs and outputs, serialized
    with its weights inside (`path`: where external weights, if any, lie)."""
    import onnx  # lazily: the [tensorrt] extra (the float16 rewrite)
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load_from_string(onnx_bytes)  # the bytes the cache key hashed, not a re-read
    if path is not None:
        load_external_data_for_model(model, str(Path(path).parent))
    return float16_convert(model, what).SerializeToString()


def load_engine(
    onnx_path, options: EngineOptions = EngineOptions(), *, cache=None, gpu: tuple[str, str] | None = None
):
    """(engine, cache file, built) for an ONNX file: from the cache, else built and cached.
    pydiff packages keep their weights inside the .onnx file, the bytes the key hashes."""
    trt = import_tensorrt()
    check_options(trt, options)
    onnx_path = Path(onnx_path)
    data = onnx_path.read_bytes()  # hashed and parsed: the same bytes
    key = engine_key(data, gpu or gpu_identity(), trt.__version__, options, graph_rewrite(trt, options))
    path = trt_cache_dir(cache) / f"{onnx_path.stem}-{key[:32]}.engine"
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    blob = _read_cached(path)
    if blob is not None:
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is not None:
            return engine, path, False
        warnings.warn(f"{path}: TensorRT cannot load this cached engine; rebuilding it", RuntimeWarning)
    blob = build_engine(trt, data, options, what=str(onnx_path), path=str(onnx_path))
    try:
        atomic_write_bytes(path, MAGIC + hashlib.sha256(blob).digest() + blob)
    except OSError as e:  # a read-only or full disk costs a rebuild next time, not this run
        warnings.warn(
            f"{path}: cannot cache the engine ({e}); it will be built again next time", RuntimeWarning
        )
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        raise RuntimeError(f"{onnx_path}: TensorRT cannot load the engine it just built")
    return engine, path, True


def build_engine(trt, onnx_bytes: bytes, options: EngineOptions, what: str, path: str | None = None) -> bytes:
    """A serialized engine: explicit batch, one profile over dim 0 of every input, fp16 if asked
    (the FP16 flag on TensorRT 10, a float16 graph on 11). `path`: the ONNX file's path, where the
    parser looks for external weights."""
    check_options(trt, options)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated); 8.x needs the flag
    flags = (
        0
        if int(trt.__version__.split(".")[0]) >= 10
        else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    )
    if graph_rewrite(trt, options) is not None:
        onnx_bytes, path = float16_graph(onnx_bytes, what, path), None
        # TensorRT 11 types every network strongly; the flag says so to versions that still ask
        strongly_typed = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
        if strongly_typed is not None:
            flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes, path=path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{what}: TensorRT cannot parse this ONNX file ({errors})")
    config = builder.create_builder_config()
    if options.fp16 and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    if options.tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = tuple(inp.shape)
        rest = shape[1:]
        if not shape or shape[0] != -1 or any(d < 0 for d in rest):
            raise ValueError(
                f"{what}: input {inp.name!r} has shape {shape}; the batch (dim 0) must be "
                f"dynamic and every other dimension fixed"
            )
        profile.set_shape(
            inp.name, (options.min_batch, *rest), (options.opt_batch, *rest), (options.max_batch, *rest)
        )
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"{what}: TensorRT could not build an engine (its log says why)")
    return bytes(blob)


def _read_cached(path: Path) -> bytes | None:
    """The engine in a cache file; None when absent, or (with a warning) corrupt or truncated."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        warnings.warn(f"{path}: cannot read the cached engine ({e}); rebuilding it", RuntimeWarning)
        return None
    head = len(MAGIC) + 32
    if (
        len(data) <= head
        or not data.startswith(MAGIC)
        or hashlib.sha256(data[head:]).digest() != data[len(MAGIC) : head]
    ):
        warnings.warn(
            f"{path}: corrupt or truncated TensorRT engine cache file; rebuilding it", RuntimeWarning
        )
        return None
    return data[head:]


def _stream_handle(stream) -> int:
    """cudaStream_t of None (torch's current stream), a stream object or a raw handle."""
    if stream is None:
        import torch  # lazily: device buffers and streams, on a GPU only

        return torch.cuda.current_stream().cuda_stream
    return stream_handle(stream)


def _cuda_pointer(name: str, value, dtype) -> tuple[int, tuple]:
    """(device pointer, shape) of a `__cuda_array_interface__` array of `dtype`, C-contiguous."""
    iface = getattr(value, "__cuda_array_interface__", None)
    if iface is None:
        raise TypeError(
            f"{name}: expected a CUDA array (torch CUDA tensor, CuPy, anything with "
            f"__cuda_array_interface__), got {type(value).__name__}"
        )
    return iface["data"][0], check_interface(name, iface, dtype)


class TrtStageModel(StageModel):
    """A stage on one TensorRT engine; one execution context, so calls are serialised."""

    def __init__(self, stage, engine):
        trt = import_tensorrt()
        super().__init__(stage)
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if sorted(inputs) != sorted(stage.inputs) or outputs != [stage.output]:
            raise PackageError(
                f"{stage.onnx}: engine inputs {inputs} / outputs {outputs} disagree "
                f"with the manifest's {list(stage.inputs)} / {[stage.output]}"
            )
        # the buffers pydiff binds have the manifest's dtypes: an engine that wants others (an fp16
        # I/O model, int32 labels) would read them as the wrong type
        for n in names:
            want = np.dtype(input_dtype(n)) if n in inputs else np.dtype(np.float32)
            got = _numpy_dtype(engine.get_tensor_dtype(n))
            if got != want:
                raise PackageError(f"{stage.onnx}: the engine's {n!r} is {got}, pydiff binds {want}")
        self.batch_range = (
            engine.get_tensor_profile_shape("sample", 0)[0][0],
            engine.get_tensor_profile_shape("sample", 0)[2][0],
        )
        self.context = engine.create_execution_context()
        self._shapes = {}  # input name -> the shape last set on the context
        self._out_checked = None  # the sample shape whose output shape was checked
        self._stream = None  # __call__'s own stream (the default stream synchronises)
        self._lock = threading.RLock()  # one context: one call in flight (held to its end in __call__)

    def __call__(self, x, t, cond=None):
        import torch  # lazily: device buffers and streams, on a GPU only

        with self._lock:
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            stream = self._stream
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                feeds = {k: torch.from_numpy(v).cuda() for k, v in self.feeds(x, t, cond).items()}
                out = torch.empty(tuple(x.shape), dtype=torch.float32, device="cuda")
            self.run_device(feeds["sample"], feeds["timestep"], feeds, out=out, stream=stream)
            stream.synchronize()
        return out.cpu().numpy()

    def run_device(self, x, t, cond=None, *, out=None, stream=None):
        """Enqueue one engine call (`execute_async_v3`) on `stream`; returns `out` [B,C,H,W] f32.

        `x`, `t` [B], `cond` values: CUDA arrays (torch CUDA tensors, anything with
        `__cuda_array_interface__`) of the inputs' dtypes, complete on or before `stream`. `out`:
        such an array of x's shape, or None (a torch tensor is allocated). `stream`: a
        torch.cuda.Stream or a raw cudaStream_t (default: torch's current stream). Nothing waits
        for the result: synchronise `stream` before reading `out` on another stream or the host,
        and before calling this stage on another stream (the engine has one execution context).
        """
        values = self.input_values(x, t, cond)
        x_ptr, x_shape = _cuda_pointer("sample", x, np.float32)
        lo, hi = self.batch_range
        if not lo <= x_shape[0] <= hi:
            raise ValueError(
                f"stage {self.stage.name!r}: batch {x_shape[0]} is outside the engine's "
                f"profile {lo}..{hi}; load with max_batch={x_shape[0]} or more"
            )
        if out is None:
            import torch  # lazily: device buffers and streams, on a GPU only

            out = torch.empty(x_shape, dtype=torch.float32, device="cuda")
        out_ptr, out_shape = _cuda_pointer("out", out, np.float32)
        if out_shape != x_shape:
            raise ValueError(f"out: shape {out_shape} differs from the sample's {x_shape}")
        handle = _stream_handle(stream)
        with self._lock:
            for name, value in values.items():
                ptr, shape = _cuda_pointer(name, value, input_dtype(name))
                # a new shape only when it changes: a set shape is a deferred update that the next
                # enqueue applies, and the enqueue captured in a CUDA graph must have none
                if self._shapes.get(name) != shape:
                    self._shapes.pop(name, None)
                    if not self.context.set_input_shape(name, shape):
                        raise ValueError(
                            f"stage {self.stage.name!r}: TensorRT refuses shape {shape} for "
                            f"input {name!r} (its log says why)"
                        )
                    self._shapes[name] = shape
                self._bind(name, ptr)
            if self._out_checked != x_shape:  # host-side; only after a shape change
                got = tuple(self.context.get_tensor_shape(self.stage.output))
                if got != x_shape:
                    raise ValueError(
                        f"stage {self.stage.name!r}: the engine's output has shape {got}, "
                        f"not the sample's {x_shape}"
                    )
                self._out_checked = x_shape
            self._bind(self.stage.output, out_ptr)
            if not self.context.execute_async_v3(handle):
                raise RuntimeError(
                    f"stage {self.stage.name!r}: TensorRT execute_async_v3 failed (its log says why)"
                )
        return out

    def _bind(self, name: str, ptr: int) -> None:
        # False leaves the previous address bound: the engine would read or write stale buffers
        if not self.context.set_tensor_address(name, ptr):
            why = f" (0x{ptr:x} is not 256-byte aligned)" if ptr % 256 else ""
            raise ValueError(f"stage {self.stage.name!r}: TensorRT refuses the address of {name!r}{why}")


_NUMPY_OF_TRT = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


def _numpy_dtype(dtype) -> np.dtype | str:
    """NumPy dtype of a tensorrt.DataType (its name where NumPy has none, e.g. BF16)."""
    name = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
    return np.dtype(_NUMPY_OF_TRT[name]) if name in _NUMPY_OF_TRT else name


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(
        self,
        package: Package,
        fp16: bool = False,
        min_batch: int = 1,
        opt_batch: int = 2,
        max_batch: int = 32,
        cache_dir=None,
        providers=None,
        session_options=None,
        tf32: bool = False,
    ):
        import_tensorrt()  # the missing-TensorRT message before any other work
        super().__init__(package)
        self.options = EngineOptions(fp16, min_batch, opt_batch, max_batch, tf32)
        self.gpu = gpu_identity()
        self.engine_files: dict[str, Path] = {}
        self.built: list[str] = []  # stages whose engine was built now, not read from the cache
        for stage in package.stages:
            engine, path, built = load_engine(stage.onnx, self.options, cache=cache_dir, gpu=self.gpu)
            self.engine_files[stage.name] = path
            self.built += [stage.name] if built else []
            self.stage_models[stage.name] = TrtStageModel(stage, engine)
        self.providers = resolve_providers(providers)  # the text encoder and guidance models
        self.text_encoder = load_text_encoder(package, self.providers, session_options)

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "gpu": list(self.gpu),
            **asdict(self.options),
            "engines": {k: str(v) for k, v in self.engine_files.items()},
        }
