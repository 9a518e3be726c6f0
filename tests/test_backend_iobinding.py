"""ONNX Runtime IO binding (OrtStageModel.run_device) and provider selection, on the CPU provider.

The CUDA branch (binding to 'cuda' memory) runs for real only in tests/gpu/test_backends_gpu.py;
here a recording session checks what it would bind.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest

from pydiff import cli
from pydiff.backends import BackendUnavailableError, create_backend
from pydiff.backends import onnxruntime as ortb
from pydiff.backends import ort as ort_leaf
from pydiff.package import PackageError, load_package
from pydiff.pipeline import bundled_path

CPU, CUDA, TRT = ort_leaf.CPU, ort_leaf.CUDA, ort_leaf.TENSORRT


@pytest.fixture(scope="module")
def base():
    backend = create_backend("onnxruntime", load_package(bundled_path("shapes")), providers="cpu")
    return backend.model("base")


def _inputs(b=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, 3, 16, 16)).astype(np.float32)
    cond = {
        "encoder_hidden_states": rng.standard_normal((b, 16, 384)).astype(np.float32),
        "encoder_attention_mask": (rng.random((b, 16)) < 0.7).astype(np.float32),
    }
    return x, np.array([900.0, 40.0][:b], np.float32), cond


def _session_run(model, x, t, cond):
    feeds = {"sample": x, "timestep": t, **cond}
    return model.session.run([model.stage.output], feeds)[0]


def test_run_device_ortvalues_match_session_run(base):
    x, t, cond = _inputs()
    want = _session_run(base, x, t, cond)
    vals = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in cond.items()}
    got = base.run_device(ort.OrtValue.ortvalue_from_numpy(x), ort.OrtValue.ortvalue_from_numpy(t), vals)
    assert isinstance(got, ort.OrtValue) and got.device_name().lower() == "cpu"
    assert tuple(got.shape()) == x.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    assert np.abs(want).max() > 0.1  # a real output, not zeros that any binding would match


def test_run_device_writes_into_out(base):
    x, t, cond = _inputs()
    want = _session_run(base, x, t, cond)
    out = np.full_like(x, np.nan)
    assert base.run_device(x, t, cond, out=out) is out  # host arrays, bound by pointer
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    ov = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), np.float32, "cpu", 0)
    assert base.run_device(x, t, cond, out=ov) is ov
    np.testing.assert_allclose(ov.numpy(), want, rtol=1e-6, atol=1e-6)


def test_run_device_scalar_timestep_is_broadcast(base):
    x, _, cond = _inputs()
    want = _session_run(base, x, np.full(2, 250.0, np.float32), cond)
    np.testing.assert_allclose(base.run_device(x, 250.0, cond).numpy(), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(base(x, 250.0, cond), want, rtol=1e-6, atol=1e-6)  # __call__ too


def test_run_device_int64_class_labels(tmp_path):
    pytest.importorskip("onnx")
    from pydiff.tools.testing import make_tiny_package

    pkg = load_package(make_tiny_package(tmp_path / "cls", conditioning="class"))
    model = create_backend("onnxruntime", pkg, providers="cpu").model(pkg.stages[0].name)
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    labels = np.array([0, 3, 1], np.int64)
    want = model(x, 10.0, {"class_labels": labels})
    got = model.run_device(x, 10.0, {"class_labels": ort.OrtValue.ortvalue_from_numpy(labels)})
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="class_labels.*tensor\\(int64\\)"):
        model.run_device(
            x, 10.0, {"class_labels": ort.OrtValue.ortvalue_from_numpy(labels.astype(np.float32))}
        )


class _FakeCudaArray:
    def __init__(self, a, index=None, strides=None):
        self.a = a
        self.device = type("Dev", (), {"index": index})()
        self.__cuda_array_interface__ = {
            "shape": a.shape,
            "typestr": a.dtype.str,
            "strides": strides,
            "data": (a.ctypes.data, False),
            "version": 3,
        }


def test_run_device_errors_name_the_argument(base):
    x, t, cond = _inputs()
    with pytest.raises(
        TypeError, match=r"sample: expected an OrtValue of tensor\(float\), got tensor\(double\)"
    ):
        base.run_device(ort.OrtValue.ortvalue_from_numpy(x.astype(np.float64)), t, cond)
    with pytest.raises(ValueError, match="out: shape"):
        base.run_device(x, t, cond, out=np.empty((1, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="out: must be C-contiguous"):
        base.run_device(x, t, cond, out=np.empty((2, 3, 16, 32), np.float32)[..., ::2])
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out: is read-only"):
        base.run_device(x, t, cond, out=ro)
    with pytest.raises(ValueError, match="sample: a CUDA array.*providers='cuda'"):
        base.run_device(_FakeCudaArray(x), t, cond)
    with pytest.raises(ValueError, match="needs the input 'encoder_attention_mask'"):
        base.run_device(x, t, {"encoder_hidden_states": cond["encoder_hidden_states"]})


class _RecordingSession:
    """An InferenceSession stand-in on the CUDA provider (device 1): records the IO binding."""

    def __init__(self, real, **cuda_options):
        self.real, self.calls = real, []
        self.cuda_options = {"device_id": "1", **cuda_options}  # ORT reports option values as strings

    def get_provider_options(self):
        return {CUDA: dict(self.cuda_options), CPU: {}}

    def get_providers(self):
        return [CUDA, CPU]

    def io_binding(self):
        sess = self

        class Binding:
            def bind_input(self, *a):
                sess.calls.append(("in", *a))

            def bind_output(self, *a):
                sess.calls.append(("out", *a))

            def get_outputs(self):
                return [ort.OrtValue.ortvalue_from_numpy(np.zeros((2, 3, 16, 16), np.float32))]

        return Binding()

    def run_with_iobinding(self, binding, run_options=None):
        key = "disable_synchronize_execution_providers"
        self.calls.append(
            ("run",) if run_options is None else ("run", key, run_options.get_run_config_entry(key))
        )


def test_cuda_session_binds_device_pointers_on_its_device(base):
    sess = _RecordingSession(base.session)
    model = ortb.OrtStageModel(base.stage, sess)
    assert (model.device, model.device_id) == ("cuda", 1)
    x, t, cond = _inputs()
    dx = _FakeCudaArray(x, index=1)
    model.run_device(dx, t, cond)
    ins = {c[1]: c[2:] for c in sess.calls if c[0] == "in"}
    assert ins["sample"] == ("cuda", 1, np.float32, [2, 3, 16, 16], x.ctypes.data)
    assert ins["timestep"][:2] == ("cpu", 0)  # host data: ORT copies it in
    assert sess.calls[-2:] == [("out", "out", "cuda", 1), ("run",)]  # output allocated on the GPU
    sess.calls.clear()
    out = np.empty_like(x)
    model.run_device(dx, t, cond, out=_FakeCudaArray(out, index=1))
    assert sess.calls[-2] == ("out", "out", "cuda", 1, np.float32, [2, 3, 16, 16], out.ctypes.data)
    with pytest.raises(ValueError, match="sample: on CUDA device 0, the session on 1"):
        model.run_device(_FakeCudaArray(x, index=0), t, cond)
    with pytest.raises(TypeError, match="sample: expected float32, got float64"):  # never converted
        model.run_device(_FakeCudaArray(x.astype(np.float64), index=1), t, cond)
    with pytest.raises(ValueError, match="sample: must be C-contiguous"):
        model.run_device(_FakeCudaArray(x, index=1, strides=(4, 8, 16, 32)), t, cond)


def test_session_on_the_callers_stream_enqueues_without_synchronising(base):
    sess = _RecordingSession(base.session, user_compute_stream=str(0x5A00), has_user_compute_stream="1")
    model = ortb.OrtStageModel(base.stage, sess)
    assert model.stream == 0x5A00
    x, t, cond = _inputs()
    dx, out = _FakeCudaArray(x, index=1), _FakeCudaArray(np.empty_like(x), index=1)
    stream = type("Stream", (), {"cuda_stream": 0x5A00})()  # a torch.cuda.Stream stand-in
    assert model.run_device(dx, t, cond, out=out, stream=stream) is out
    assert sess.calls[-1] == ("run", "disable_synchronize_execution_providers", "1")
    model.run_device(dx, t, cond, out=out)  # no stream: ORT synchronises, as before
    assert sess.calls[-1] == ("run",)
    sess.calls.clear()
    with pytest.raises(ValueError, match="computes on stream 0x5a00, not 0x77"):
        model.run_device(dx, t, cond, out=out, stream=0x77)
    with pytest.raises(TypeError, match="stream must be an integer handle or a stream object"):
        model.run_device(dx, t, cond, out=out, stream="0x5a00")
    assert sess.calls == []  # refused before anything was bound or run
    plain = ortb.OrtStageModel(base.stage, _RecordingSession(base.session))
    assert plain.stream is None
    with pytest.raises(ValueError, match="ONNX Runtime's own stream.*providers='cuda', stream="):
        plain.run_device(dx, t, cond, out=out, stream=0x5A00)
    with pytest.raises(ValueError, match="own stream"):  # the CPU session has no stream at all
        base.run_device(x, t, cond, stream=0x5A00)


def test_stream_becomes_the_cuda_providers_user_compute_stream(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    on = {"has_user_compute_stream": "1"}
    fp32 = {"use_tf32": "0"}
    want = [(CUDA, {"device_id": 0, **fp32, **on, "user_compute_stream": str(0x5A00)}), CPU]
    assert ort_leaf.resolve_providers("cuda", stream=0x5A00) == want
    assert ort_leaf.resolve_providers(None, stream=type("S", (), {"cuda_stream": 0x5A00})()) == want
    assert ort_leaf.resolve_providers([CUDA, CPU], device_id=3, stream=7) == [
        (CUDA, {"device_id": 3, **on, "user_compute_stream": "7"}),
        CPU,
    ]
    assert ort_leaf.resolve_providers("tensorrt", stream=7)[1] == (
        CUDA,
        {"device_id": 0, **fp32, **on, "user_compute_stream": "7"},
    )
    # ORT takes a device's streams from its first provider: TensorRT computes on the stream too
    # (its option parser has no has_user_compute_stream)
    trt_opts = ort_leaf.resolve_providers("tensorrt", stream=7)[0][1]
    assert (
        ort_leaf.resolve_providers("tensorrt", stream=7)[0][0] == TRT
        and trt_opts["user_compute_stream"] == "7"
    )
    assert "has_user_compute_stream" not in trt_opts
    with pytest.raises(ValueError, match="only the CUDA provider.*providers='cuda'"):
        ort_leaf.resolve_providers("cpu", stream=7)
    with pytest.raises(ValueError, match="stream 0 .*legacy default stream"):
        ort_leaf.resolve_providers("cuda", stream=0)
    with pytest.raises(TypeError, match="stream must be an integer handle"):
        ort_leaf.resolve_providers("cuda", stream=1.5)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(BackendUnavailableError, match="lacks"):  # the missing provider is named first
        ort_leaf.resolve_providers(None, stream=7)


def test_provider_choices(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    assert ort_leaf.resolve_providers("cpu") == [CPU]
    fp32 = {"use_tf32": "0"}  # the CUDA provider pydiff picks: TF32 off (the CPU provider's images)
    assert ort_leaf.resolve_providers("cuda", device_id=2) == [(CUDA, {"device_id": 2, **fp32}), CPU]
    trt = ort_leaf.resolve_providers(
        "TensorRT"
    )  # its engine-cache options: test_ort_tensorrt_engines_are_cached
    assert (
        trt[0][0] == TRT
        and trt[0][1]["device_id"] == 0
        and trt[1:] == [(CUDA, {"device_id": 0, **fp32}), CPU]
    )
    assert ort_leaf.resolve_providers("auto") == [(CUDA, {"device_id": 0, **fp32}), CPU]
    assert ort_leaf.resolve_providers(None) == [(CUDA, {"device_id": 0, **fp32}), CPU]
    assert ort_leaf.resolve_providers([CPU]) == [CPU]
    assert ort_leaf.resolve_providers([CUDA, CPU]) == [CUDA, CPU]  # a caller's list keeps ORT's defaults
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    assert ort_leaf.resolve_providers(None) == [CPU]
    with pytest.raises(ValueError, match="unknown provider 'gpu'.*'cuda'"):
        ort_leaf.resolve_providers("gpu")


def test_missing_cuda_provider_is_a_clear_error_or_an_auto_fallback(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    for choice in ("cuda", "tensorrt", [CUDA, CPU]):
        with pytest.raises(
            BackendUnavailableError, match="lacks.*CUDAExecutionProvider.*pip install onnxruntime-gpu"
        ):
            ort_leaf.resolve_providers(choice)
    with pytest.warns(RuntimeWarning, match="no CUDAExecutionProvider.*running on the CPU"):
        assert ort_leaf.resolve_providers("auto") == [CPU]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default (None) stays silent, as before
        assert ort_leaf.resolve_providers(None) == [CPU]


def test_cli_provider_flag(tmp_path, capsys):
    args = [
        "generate",
        "a red circle",
        "--steps",
        "2",
        "--seed",
        "1",
        "--json",
        "-q",
        "--out",
        str(tmp_path / "x.png"),
    ]
    assert cli.main(args + ["--provider", "cpu"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["backend"] == {"backend": "onnxruntime", "providers": [CPU]}
    if CUDA not in ort.get_available_providers():
        assert cli.main(args + ["--provider", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pip install onnxruntime-gpu" in err[0], err


def test_ort_tensorrt_engines_are_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setenv("PYDIFF_TRT_CACHE", str(tmp_path))
    trt, cuda, cpu = ort_leaf.resolve_providers("tensorrt")
    # ORT's Python parser takes "True"/"False" for TensorRT's booleans (not "1")
    assert trt == (
        TRT,
        {"device_id": 0, "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(tmp_path / "ort")},
    )
    assert cuda == (CUDA, {"device_id": 0, "use_tf32": "0"}) and cpu == CPU


def test_a_gpu_provider_that_does_not_start_is_not_a_silent_cpu_run(monkeypatch):
    # this onnxruntime has no CUDA provider: asked for it anyway, ORT starts the session on the CPU
    # with a log line, as onnxruntime-gpu does on a machine without a usable GPU
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    path = bundled_path("shapes") / "base.onnx"
    with pytest.warns(UserWarning):  # ORT's own "not in available provider names"
        with pytest.raises(BackendUnavailableError, match=r"could not start \['CUDAExecutionProvider'\]"):
            ort_leaf.create_session(path, [(CUDA, {"use_tf32": "0"}), CPU])
        assert ort_leaf.create_session(path, [(CUDA, {}), CPU], required=()).get_providers() == [CPU]
    pkg = load_package(bundled_path("shapes"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(BackendUnavailableError, match="could not start"):
            create_backend("onnxruntime", pkg, providers="cuda")
        with pytest.warns(RuntimeWarning, match="providers='auto': ONNX Runtime could not start"):
            assert create_backend("onnxruntime", pkg, providers="auto").describe()["providers"] == [CPU]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # None: the CPU, silently, as documented
            assert create_backend("onnxruntime", pkg).describe()["providers"] == [CPU]


def test_a_provider_that_fails_to_start_is_told_from_a_bad_model(monkeypatch, tmp_path):
    real = ort.InferenceSession
    calls = []

    def session(path, sess_options=None, providers=None, **kw):
        calls.append((providers, kw.get("enable_fallback")))
        if any((p if isinstance(p, str) else p[0]) == TRT for p in providers):
            raise RuntimeError("RegisterTensorRTPluginsAsCustomOps: Please install TensorRT libraries")
        return real(path, sess_options=sess_options, providers=providers, **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)
    path = bundled_path("shapes") / "base.onnx"
    with pytest.raises(
        BackendUnavailableError, match="could not start.*TensorrtExecutionProvider.*Please install TensorRT"
    ):
        ort_leaf.create_session(path, [(TRT, {}), CPU])
    assert calls[0][1] == 0  # ORT's own retry (without the provider options) is off
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(PackageError, match="ONNX Runtime cannot load this model"):
        ort_leaf.create_session(bad, [(TRT, {}), CPU])
