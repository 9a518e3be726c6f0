"""The TensorRT backend's engine cache and wiring, host side, on a fake `tensorrt` module.

The fake parses nothing: it reads an ONNX file's inputs through ONNX Runtime (or takes a default
for test bytes that are not ONNX) and "builds" an engine that is a JSON description of the network.
Real engines run only in tests/gpu/test_backends_gpu.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from pydiff import cli
from pydiff.backends import BackendUnavailableError, create_backend
from pydiff.backends import tensorrt as trtb
from pydiff.package import PackageError, load_package
from pydiff.pipeline import bundled_path

GPU = ("NVIDIA H200", "9.0")


def fake_tensorrt(version="10.13.0.35"):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.builds = []  # (onnx bytes, fp16, profile) per build_serialized_network call
    trt.build_flags = []  # the builder config's flags per build
    trt.fail_build = False
    trt.executions = []
    trt.parsed_inputs = None  # set: the network's inputs instead of the file's
    trt.dtypes = {}  # tensor name -> DataType name the engine reports (default: FLOAT)
    trt.refused_addresses = set()  # tensor names whose set_tensor_address answers False
    trt.output_shape = None  # set: what get_tensor_shape answers for the output

    class Logger:
        WARNING = 2

        def __init__(self, level=None):
            pass

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class BuilderFlag:
        FP16, TF32 = "fp16", "tf32"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1  # TensorRT 11 accepts it and ignores it: every network is strongly typed

    trt.network_flags = []  # create_network's flags per build
    if int(version.split(".")[0]) >= 11:  # TensorRT 11: strongly typed networks, no FP16 flag
        del BuilderFlag.FP16

    class DataType:
        def __init__(self, name):
            self.name = name

    class Network:
        def __init__(self):
            self.inputs, self.outputs = [], []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i][0], shape=self.inputs[i][1])

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse(self, data, path=None):
            if data.startswith(b"not onnx"):
                self.num_errors = 1
                return False
            try:
                import onnxruntime as ort

                sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
                self.network.inputs = [
                    (i.name, tuple(d if isinstance(d, int) else -1 for d in i.shape))
                    for i in sess.get_inputs()
                ]
                self.network.outputs = [o.name for o in sess.get_outputs()]
            except Exception:
                self.network.inputs = [("sample", (-1, 3, 8, 8)), ("timestep", (-1,))]
                self.network.outputs = ["out"]
            if trt.parsed_inputs is not None:
                self.network.inputs = trt.parsed_inputs
            self.network.data = data
            return True

        def get_error(self, i):
            return "fake parser: not a model"

    class Config:
        def __init__(self):
            self.flags, self.profiles = {"tf32"}, []  # TensorRT's default: TF32 on

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class Profile(dict):
        def set_shape(self, name, lo, opt, hi):
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise RuntimeError("Shape provided for min is inconsistent with other shapes")
            self[name] = [list(lo), list(opt), list(hi)]

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            assert flags in (0, 1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # explicit batch only
            trt.network_flags.append(flags)
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            fp16 = "fp16" in config.flags
            trt.builds.append((network.data, fp16, dict(config.profiles[0])))
            trt.build_flags.append(set(config.flags))
            if trt.fail_build:
                return None
            return (
                b"ENGINE"
                + json.dumps(
                    {
                        "inputs": [n for n, _ in network.inputs],
                        "outputs": network.outputs,
                        "profile": config.profiles[0],
                        "fp16": fp16,
                    }
                ).encode()
            )

    class Context:
        def __init__(self):
            self.shapes, self.addresses, self.shape_calls = {}, {}, 0

        def set_input_shape(self, name, shape):
            self.shape_calls += 1
            if any(d <= 0 for d in shape):
                return False  # TensorRT answers a bad shape with False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            if name in trt.refused_addresses:
                return False  # the real one keeps the old address then
            self.addresses[name] = ptr
            return True

        def get_tensor_shape(self, name):
            return trt.output_shape or self.shapes["sample"]

        def execute_async_v3(self, stream):
            trt.executions.append((dict(self.shapes), dict(self.addresses), stream))
            return True

    class Engine:
        def __init__(self, desc):
            self.desc = desc
            self.names = desc["inputs"] + desc["outputs"]
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name in self.desc["inputs"] else TensorIOMode.OUTPUT

        def get_tensor_profile_shape(self, name, index):
            return self.desc["profile"][name]

        def get_tensor_dtype(self, name):
            return DataType(trt.dtypes.get(name, "INT64" if name == "class_labels" else "FLOAT"))

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine(json.loads(blob[6:])) if bytes(blob).startswith(b"ENGINE") else None

    for cls in (
        Logger,
        TensorIOMode,
        BuilderFlag,
        Builder,
        OnnxParser,
        Runtime,
        NetworkDefinitionCreationFlag,
    ):
        setattr(trt, cls.__name__, cls)
    return trt


@pytest.fixture
def trt(monkeypatch):
    fake = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trtb, "gpu_identity", lambda: GPU)
    return fake


def _onnx(tmp_path, data=b"onnx model A", name="base.onnx"):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_key_changes_with_onnx_gpu_version_and_options_only():
    opts = trtb.EngineOptions()
    key = trtb.engine_key(b"A", GPU, "10.13.0", opts)
    assert key == trtb.engine_key(b"A", GPU, "10.13.0", trtb.EngineOptions(False, 1, 2, 32))
    variants = [
        trtb.engine_key(b"B", GPU, "10.13.0", opts),
        trtb.engine_key(b"A", ("NVIDIA H100", "9.0"), "10.13.0", opts),
        trtb.engine_key(b"A", ("NVIDIA H200", "10.0"), "10.13.0", opts),
        trtb.engine_key(b"A", GPU, "10.14.1", opts),
        trtb.engine_key(b"A", GPU, "10.13.0", trtb.EngineOptions(fp16=True)),
        trtb.engine_key(b"A", GPU, "10.13.0", trtb.EngineOptions(tf32=True)),
        trtb.engine_key(b"A", GPU, "10.13.0", trtb.EngineOptions(max_batch=64)),
    ]
    assert len({key, *variants}) == 1 + len(variants)
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        trtb.EngineOptions(min_batch=4, opt_batch=2)


def test_cache_hit_skips_the_build(trt, tmp_path):
    onnx = _onnx(tmp_path)
    cache = tmp_path / "cache"
    engine, path, built = trtb.load_engine(onnx, cache=cache)
    assert built and path.parent == cache and path.is_file() and len(trt.builds) == 1
    assert path.name.startswith("base-") and path.suffix == ".engine"
    engine2, path2, built2 = trtb.load_engine(onnx, cache=cache)
    assert (path2, built2) == (path, False) and len(trt.builds) == 1
    assert engine2.desc == engine.desc
    # the same bytes in another file of the same name: the same engine; other bytes: a new one
    assert trtb.load_engine(_onnx(tmp_path / "copy"), cache=cache)[1:] == (path, False)
    assert trtb.load_engine(_onnx(tmp_path / "b", b"onnx model B"), cache=cache)[2]
    assert len(trt.builds) == 2


@pytest.mark.parametrize("change", ["fp16", "tf32", "gpu", "tensorrt"])
def test_cache_miss_when_the_key_changes(trt, tmp_path, monkeypatch, change):
    onnx, cache = _onnx(tmp_path), tmp_path / "cache"
    path = trtb.load_engine(onnx, cache=cache)[1]
    kw = {}
    if change in ("fp16", "tf32"):
        kw["options"] = trtb.EngineOptions(**{change: True})
    elif change == "gpu":
        kw["gpu"] = ("NVIDIA H100 80GB HBM3", "9.0")
    else:
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.14.1"))
    _, path2, built = trtb.load_engine(onnx, cache=cache, **kw)
    assert built and path2 != path and sorted(cache.iterdir()) == sorted([path, path2])
    if change == "fp16":
        assert trt.builds[-1][1] is True and trt.builds[0][1] is False
    # TensorRT turns TF32 on by default; pydiff's default engine clears it (fp32 as the CPU rounds)
    assert "tf32" not in trt.build_flags[0]
    assert ("tf32" in trt.build_flags[-1]) == (change == "tf32")


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip", "not-an-engine"])
def test_corrupt_cache_file_is_rebuilt_with_a_warning(trt, tmp_path, damage):
    onnx, cache = _onnx(tmp_path), tmp_path / "cache"
    path = trtb.load_engine(onnx, cache=cache)[1]
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flip":
        path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    else:  # a well-formed cache file whose engine TensorRT refuses (e.g. from another build)
        path.write_bytes(trtb.MAGIC + hashlib.sha256(b"junk").digest() + b"junk")
    match = "cannot load this cached engine" if damage == "not-an-engine" else "corrupt or truncated"
    with pytest.warns(RuntimeWarning, match=match):
        _, path2, built = trtb.load_engine(onnx, cache=cache)
    assert built and path2 == path and path.read_bytes() == good and len(trt.builds) == 2
    assert trtb.load_engine(onnx, cache=cache)[2] is False  # repaired: a hit again


def test_failing_build_or_write_leaves_no_file(trt, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    trt.fail_build = True
    with pytest.raises(RuntimeError, match="base.onnx: TensorRT could not build an engine"):
        trtb.load_engine(_onnx(tmp_path), cache=cache)
    with pytest.raises(RuntimeError, match="bad.onnx: TensorRT cannot parse.*not a model"):
        trtb.load_engine(_onnx(tmp_path, b"not onnx", "bad.onnx"), cache=cache)
    assert not cache.exists() or list(cache.iterdir()) == []
    trt.fail_build = False

    def broken_replace(src, dst):  # the disk fills up / the rename fails after the temp file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.warns(RuntimeWarning, match="cannot cache the engine.*No space left"):
        engine, path, built = trtb.load_engine(_onnx(tmp_path), cache=cache)
    assert built and engine is not None and list(cache.iterdir()) == []  # no temp file left


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("PYDIFF_TRT_CACHE", raising=False)
    assert trtb.trt_cache_dir() == Path("~/.cache/pydiff/trt").expanduser()
    monkeypatch.setenv("PYDIFF_TRT_CACHE", str(tmp_path / "env"))
    assert trtb.trt_cache_dir() == tmp_path / "env"
    assert trtb.trt_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_profile_covers_the_batch_and_only_the_batch(trt, tmp_path):
    pkg = load_package(bundled_path("shapes"))
    trtb.load_engine(
        pkg.stage("base").onnx, trtb.EngineOptions(min_batch=1, opt_batch=4, max_batch=8), cache=tmp_path
    )
    profile = trt.builds[-1][2]
    assert profile["sample"] == [[1, 3, 16, 16], [4, 3, 16, 16], [8, 3, 16, 16]]
    assert profile["encoder_hidden_states"] == [[1, 16, 384], [4, 16, 384], [8, 16, 384]]
    assert profile["timestep"] == [[1], [4], [8]]


class _CudaArray:
    """Host memory posing as a CUDA array: the fake engine only records pointers."""

    def __init__(self, a):
        self.a = a
        self.__cuda_array_interface__ = {
            "shape": a.shape,
            "typestr": a.dtype.str,
            "strides": None,
            "data": (a.ctypes.data, False),
            "version": 3,
        }


def test_backend_builds_each_stage_once_and_binds_device_pointers(trt, tmp_path):
    pkg = load_package(bundled_path("shapes"))
    backend = create_backend("tensorrt", pkg, cache_dir=tmp_path, max_batch=4, providers="cpu")
    assert backend.built == ["base", "sr64"] and backend.text_encoder is not None
    assert all(p.is_file() for p in backend.engine_files.values())
    again = create_backend("tensorrt", pkg, cache_dir=tmp_path, max_batch=4, providers="cpu")
    assert again.built == [] and again.engine_files == backend.engine_files
    assert again.describe()["gpu"] == list(GPU)

    model = again.model("base")
    x, t = np.zeros((2, 3, 16, 16), np.float32), np.zeros(2, np.float32)
    states, mask = np.zeros((2, 16, 384), np.float32), np.zeros((2, 16), np.float32)
    out = np.empty_like(x)
    cond = {"encoder_hidden_states": _CudaArray(states), "encoder_attention_mask": _CudaArray(mask)}
    assert model.run_device(_CudaArray(x), _CudaArray(t), cond, out=_CudaArray(out), stream=1234).a is out
    shapes, addresses, stream = trt.executions[-1]
    assert stream == 1234 and shapes["sample"] == (2, 3, 16, 16) and shapes["timestep"] == (2,)
    assert addresses == {
        "sample": x.ctypes.data,
        "timestep": t.ctypes.data,
        "out": out.ctypes.data,
        "encoder_hidden_states": states.ctypes.data,
        "encoder_attention_mask": mask.ctypes.data,
    }
    with pytest.raises(TypeError, match="timestep: expected a CUDA array"):
        model.run_device(_CudaArray(x), t, cond, out=_CudaArray(out), stream=1234)
    # shapes are set only when they change: an enqueue captured in a CUDA graph has no deferred update
    calls = model.context.shape_calls
    model.run_device(_CudaArray(x), _CudaArray(t), cond, out=_CudaArray(out), stream=1234)
    assert model.context.shape_calls == calls
    x1, t1, out1 = x[:1], t[:1], out[:1]
    cond1 = {"encoder_hidden_states": _CudaArray(states[:1]), "encoder_attention_mask": _CudaArray(mask[:1])}
    model.run_device(_CudaArray(x1), _CudaArray(t1), cond1, out=_CudaArray(out1), stream=1234)
    assert model.context.shape_calls == calls + 4 and trt.executions[-1][0]["sample"] == (1, 3, 16, 16)
    empty = {
        "encoder_hidden_states": _CudaArray(states[:1, :0]),
        "encoder_attention_mask": _CudaArray(mask[:1]),
    }
    with pytest.raises(
        ValueError, match=r"TensorRT refuses shape \(1, 0, 384\) for input 'encoder_hidden_states'"
    ):
        model.run_device(_CudaArray(x1), _CudaArray(t1), empty, out=_CudaArray(out1), stream=1234)
    big = np.zeros((5, 3, 16, 16), np.float32)
    with pytest.raises(
        ValueError, match="batch 5 is outside the engine's profile 1..4; load with max_batch=5"
    ):
        model.run_device(_CudaArray(big), _CudaArray(np.zeros(5, np.float32)), cond, out=_CudaArray(big))


def test_missing_tensorrt_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install 'pydiff\[tensorrt\]'.*tensorrt-cu13"):
        create_backend("tensorrt", load_package(bundled_path("shapes")))
    assert issubclass(BackendUnavailableError, ImportError)
    rc = cli.main(["generate", "red", "--backend", "tensorrt", "-q", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pydiff[tensorrt]" in err[0], err


def test_cli_fp16_reaches_the_tensorrt_backend(monkeypatch, tmp_path, capsys):
    import pydiff.pipeline as pipeline

    seen = []

    def init(self, package, **options):
        seen.append(("tensorrt", options))
        raise BackendUnavailableError("stop here")

    monkeypatch.setattr(trtb.TensorRTBackend, "__init__", init)
    pipeline.clear_cache()
    rc = cli.main(
        ["generate", "red", "--backend", "tensorrt", "--fp16", "-q", "--out", str(tmp_path / "x.png")]
    )
    assert rc == 2 and seen == [("tensorrt", {"fp16": True})]
    rc = cli.main(["generate", "red", "--fp16", "-q", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert (
        rc == 2
        and len(seen) == 1
        and "--fp16 builds float16 TensorRT engines: it needs --backend tensorrt" in err
    )
    assert not (tmp_path / "x.png").exists()


def test_missing_torch_or_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    pkg = load_package(bundled_path("shapes"))
    torch = pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"needs torch.*pip install 'pydiff\[torch\]'"):
        create_backend("tensorrt", pkg)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU, and torch .* sees none"):
        create_backend("tensorrt", pkg)


def test_module_imports_neither_tensorrt_nor_torch():
    code = (
        "import sys, pydiff.backends.tensorrt; print([m for m in ('tensorrt', 'torch') if m in sys.modules])"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent
    )  # tests/: the installed pydiff, as in test_cli
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_fp16_on_tensorrt_11_builds_a_float16_graph(monkeypatch, tmp_path):
    """TensorRT 11 has no FP16 builder flag: fp16=True parses the graph rewritten to float16 (float32
    inputs and outputs), builds it strongly typed, and keys the cache on the rewrite."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto

    from pydiff.backends import float16 as mixed_precision

    fake = fake_tensorrt("11.4.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trtb, "gpu_identity", lambda: GPU)
    src = bundled_path("digits") / "model.onnx"
    path = _onnx(tmp_path, src.read_bytes(), "model.onnx")
    fp16 = trtb.EngineOptions(fp16=True)

    engine, file, built = trtb.load_engine(path, fp16, cache=tmp_path / "c")
    assert built and fake.network_flags == [1 << 1] and "fp16" not in fake.build_flags[0]
    parsed = onnx.load_from_string(fake.builds[0][0])
    assert [i.type.tensor_type.elem_type for i in parsed.graph.input] == [
        TensorProto.FLOAT,
        TensorProto.FLOAT,
        TensorProto.INT64,
    ]  # sample, timestep, class_labels
    assert parsed.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    convs = [n for n in parsed.graph.node if n.op_type == "Conv"]
    weights = {t.name: t.data_type for t in parsed.graph.initializer}
    assert convs and all(weights[n.input[1]] == TensorProto.FLOAT16 for n in convs)
    assert (
        file.name
        == "model-"
        + trtb.engine_key(
            src.read_bytes(), GPU, "11.4.0", fp16, f"mixed-precision-fp16-v{mixed_precision.VERSION}"
        )[:32]
        + ".engine"
    )

    assert not trtb.load_engine(path, fp16, cache=tmp_path / "c")[2]  # cached
    _, fp32_file, built32 = trtb.load_engine(path, cache=tmp_path / "c")  # fp32: a network as parsed
    assert built32 and fp32_file != file and fake.network_flags[-1] == 0
    assert fake.builds[-1][0] == src.read_bytes()

    monkeypatch.setitem(sys.modules, "onnx", None)  # the rewrite needs onnx
    with pytest.raises(BackendUnavailableError, match="needs the onnx package"):
        trtb.load_engine(path, fp16, cache=tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_fp16_on_tensorrt_10_uses_the_builder_flag(trt, tmp_path):
    trtb.load_engine(_onnx(tmp_path), trtb.EngineOptions(fp16=True), cache=tmp_path / "c")
    assert trt.builds[0][0] == b"onnx model A" and "fp16" in trt.build_flags[0]
    assert trt.network_flags == [0]


def test_a_static_batch_input_is_refused(trt, tmp_path):
    trt.parsed_inputs = [("sample", (1, 3, 8, 8)), ("timestep", (-1,))]
    with pytest.raises(
        ValueError,
        match=r"input 'sample' has shape \(1, 3, 8, 8\); the batch \(dim 0\) "
        "must be dynamic",
    ):
        trtb.load_engine(_onnx(tmp_path), cache=tmp_path / "c")


def _base_model(trt, tmp_path):
    pkg = load_package(bundled_path("shapes"))
    return create_backend("tensorrt", pkg, cache_dir=tmp_path, max_batch=4, providers="cpu").model("base")


def _device_call(model, out_shape=(2, 3, 16, 16)):
    x, t = np.zeros((2, 3, 16, 16), np.float32), np.zeros(2, np.float32)
    cond = {
        "encoder_hidden_states": _CudaArray(np.zeros((2, 16, 384), np.float32)),
        "encoder_attention_mask": _CudaArray(np.zeros((2, 16), np.float32)),
    }
    return model.run_device(
        _CudaArray(x), _CudaArray(t), cond, out=_CudaArray(np.zeros(out_shape, np.float32)), stream=7
    )


def test_an_engine_with_other_dtypes_is_refused(trt, tmp_path):
    trt.dtypes = {"timestep": "HALF"}
    with pytest.raises(PackageError, match=r"the engine's 'timestep' is float16, pydiff binds float32"):
        _base_model(trt, tmp_path)
    trt.dtypes = {"out": "BF16"}
    with pytest.raises(PackageError, match=r"the engine's 'out' is BF16, pydiff binds float32"):
        _base_model(trt, tmp_path)


def test_a_refused_address_or_output_shape_raises(trt, tmp_path):
    model = _base_model(trt, tmp_path)
    trt.refused_addresses = {"encoder_hidden_states"}
    with pytest.raises(ValueError, match="TensorRT refuses the address of 'encoder_hidden_states'"):
        _device_call(model)
    trt.refused_addresses = set()
    n = len(trt.executions)
    trt.output_shape = (2, 6, 16, 16)  # e.g. a learned-variance network: 2C channels
    with pytest.raises(ValueError, match=r"output has shape \(2, 6, 16, 16\), not the sample's"):
        _device_call(model)
    assert len(trt.executions) == n  # nothing was enqueued
    trt.output_shape = None
    _device_call(model)
    assert len(trt.executions) == n + 1
