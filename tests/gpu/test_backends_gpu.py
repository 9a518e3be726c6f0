"""ORT CUDA IO binding and TensorRT engines on the GPU, against the CPU provider (their oracle).

Skipped without a GPU (conftest), without onnxruntime-gpu's CUDA provider, or without tensorrt.
"""

from __future__ import annotations

import numpy as np
import pytest

from pydiff.backends import create_backend
from pydiff.package import load_package
from pydiff.pipeline import bundled_path

pytestmark = pytest.mark.gpu

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.fixture(scope="module")
def package():
    return load_package(bundled_path("shapes"))


@pytest.fixture(scope="module")
def cpu_base(package):
    return create_backend("onnxruntime", package, providers="cpu").model("base")


def _inputs(b=4):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, 3, 16, 16)).astype(np.float32)
    t = np.linspace(999, 1, b).astype(np.float32)
    cond = {
        "encoder_hidden_states": rng.standard_normal((b, 16, 384)).astype(np.float32),
        "encoder_attention_mask": (rng.random((b, 16)) < 0.7).astype(np.float32),
    }
    return x, t, cond


def _cuda(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


def test_ort_cuda_io_binding_matches_cpu_provider(package, cpu_base):
    ort = pytest.importorskip("onnxruntime")
    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    import torch

    # TF32 off: the comparison is fp32 against fp32
    providers = [(CUDA, {"device_id": 0, "use_tf32": 0}), CPU]
    model = create_backend("onnxruntime", package, providers=providers).model("base")
    assert model.device == "cuda"
    x, t, cond = _inputs()
    want = cpu_base(x, t, cond)

    on_gpu = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in cond.items()}
    got = model.run_device(
        ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0), ort.OrtValue.ortvalue_from_numpy(t, "cuda", 0), on_gpu
    )
    assert got.device_name().lower() == "cuda"  # the output stayed on the GPU
    np.testing.assert_allclose(got.numpy(), want, atol=1e-3, rtol=0)

    tx, out = _cuda(x), torch.full(x.shape, float("nan"), device="cuda")
    tcond = {k: _cuda(v) for k, v in cond.items()}
    torch.cuda.synchronize()  # ORT reads them on its own stream
    assert model.run_device(tx, _cuda(t), tcond, out=out) is out
    np.testing.assert_allclose(out.cpu().numpy(), want, atol=1e-3, rtol=0)
    np.testing.assert_allclose(model(x, t, cond), want, atol=1e-3, rtol=0)


def test_generate_on_the_cuda_provider_gives_the_cpu_image(package):
    """The whole cascade (base + super-resolution, 2 x 50 steps): the CUDA provider as pydiff picks it
    (TF32 off) gives the CPU provider's pixels. With ORT's default TF32 the trajectory drifts (the
    H200 run behind this test: up to 223/255 apart, against 1/255 with TF32 off)."""
    ort = pytest.importorskip("onnxruntime")
    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    import pydiff

    def images(providers):
        out = pydiff.load(providers=providers).generate(
            "a red circle on a blue background", seed=3, num_images=2
        )
        return np.stack([np.asarray(im, dtype=np.int16) for im in out])

    gpu, cpu = images("cuda"), images("cpu")
    assert gpu.shape == cpu.shape == (2, 64, 64, 3)
    assert np.abs(gpu - cpu).max() <= 2


def test_tensorrt_engine_matches_cpu_provider_and_is_cached(package, cpu_base, tmp_path):
    pytest.importorskip("tensorrt")
    import torch

    from pydiff.backends import tensorrt as trtb

    stage, options = package.stage("base"), trtb.EngineOptions(fp16=False, max_batch=8)
    engine, path, built = trtb.load_engine(stage.onnx, options, cache=tmp_path)
    assert built and path.is_file()
    x, t, cond = _inputs()
    want = cpu_base(x, t, cond)
    model = trtb.TrtStageModel(stage, engine)
    np.testing.assert_allclose(model(x, t, cond), want, atol=1e-2, rtol=0)

    stream = torch.cuda.Stream()  # device buffers on a side stream
    tx, tt, tcond = _cuda(x), _cuda(t), {k: _cuda(v) for k, v in cond.items()}
    stream.wait_stream(torch.cuda.current_stream())
    out = model.run_device(tx, tt, tcond, stream=stream)
    stream.synchronize()
    np.testing.assert_allclose(out.cpu().numpy(), want, atol=1e-2, rtol=0)

    mtime = path.stat().st_mtime_ns
    engine2, path2, built2 = trtb.load_engine(stage.onnx, options, cache=tmp_path)
    assert (path2, built2) == (path, False) and path.stat().st_mtime_ns == mtime
    np.testing.assert_allclose(trtb.TrtStageModel(stage, engine2)(x, t, cond), want, atol=1e-2, rtol=0)


def test_tensorrt_fp16_engine_is_close_to_the_float32_graph(package, cpu_base, tmp_path):
    """fp16=True: the FP16 builder flag on TensorRT 10, the float16 graph rewrite on 11. The rewrite
    gave 6.2-8.9e-4 of the output's largest value in NumPy float16 (tests/test_mixed_precision.py)."""
    pytest.importorskip("tensorrt")
    from pydiff.backends import tensorrt as trtb

    stage = package.stage("base")
    engine, path, built = trtb.load_engine(
        stage.onnx, trtb.EngineOptions(fp16=True, max_batch=8), cache=tmp_path
    )
    assert built and path.is_file()
    x, t, cond = _inputs()
    want = cpu_base(x, t, cond)
    got = trtb.TrtStageModel(stage, engine)(x, t, cond)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= 3e-3 * np.abs(want).max()


def test_tensorrt_backend_runs_the_pipeline(package, tmp_path):
    pytest.importorskip("tensorrt")
    import pydiff

    kw = dict(steps=3, seed=5, output_type="numpy", progress=False)  # [B, H, W, C] in [0, 1]
    ref = pydiff.load(package, providers="cpu").generate("a red circle on a blue background", **kw)
    img = pydiff.load(package, backend="tensorrt", cache_dir=tmp_path, providers="cpu").generate(
        "a red circle on a blue background", **kw
    )
    assert img.shape == ref.shape and np.isfinite(img).all()
    # same seed, networks within 1e-2 of each other: the images agree to a few grey levels
    assert np.abs(img - ref).mean() < 0.02


def _graph_runs(model, cpu_base, stream=None, B=2, steps=5):
    """The whole denoising step (network + fused step) on a backend's stage: eager, then captured,
    against the same plan with the CPU provider's network on the CPU twin."""

    import pydiff
    from pydiff.backends.stage_network import StageNetwork
    from pydiff.cuda_graph import GraphSampler, StepPlan

    rng = np.random.default_rng(1)
    cond = {
        "encoder_hidden_states": rng.standard_normal((2 * B, 16, 384)).astype(np.float32),
        "encoder_attention_mask": (rng.random((2 * B, 16)) < 0.7).astype(np.float32),
    }
    sched = pydiff.Schedule(beta_schedule="squaredcos_cap_v2", clip_sample=True)
    plan = StepPlan.from_sampler(pydiff.make_sampler("dpmpp_2m", sched, steps), seed=4)
    x_T = rng.standard_normal((B, 3, 16, 16)).astype(np.float32)
    want = plan.run_cpu(lambda x, t: cpu_base(x, t, cond), x_T, guidance_scale=3.0)
    got = {}
    for graph in (False, True):
        runner = GraphSampler(
            StageNetwork(model, cond), plan, shape=x_T.shape, guidance_scale=3.0, graph=graph, stream=stream
        )
        got[graph] = runner.run(_cuda(x_T)).cpu().numpy()
        assert runner.captured == graph
    np.testing.assert_allclose(got[True], got[False], atol=1e-4, rtol=0)  # the same kernels, replayed
    np.testing.assert_allclose(got[True], want, atol=2e-2, rtol=0)
    assert np.abs(want).max() > 0.1


def test_ort_cuda_network_and_step_captured_in_one_graph(package, cpu_base):
    ort = pytest.importorskip("onnxruntime")
    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    import torch

    stream = torch.cuda.Stream()
    providers = [(CUDA, {"device_id": 0, "use_tf32": 0}), CPU]
    model = create_backend("onnxruntime", package, providers=providers, stream=stream).model("base")
    assert model.stream == stream.cuda_stream
    _graph_runs(model, cpu_base, stream=stream)


def test_tensorrt_network_and_step_captured_in_one_graph(package, cpu_base, tmp_path):
    pytest.importorskip("tensorrt")
    from pydiff.backends import tensorrt as trtb

    stage, options = package.stage("base"), trtb.EngineOptions(fp16=False, max_batch=8)
    engine, _, _ = trtb.load_engine(stage.onnx, options, cache=tmp_path)
    _graph_runs(trtb.TrtStageModel(stage, engine), cpu_base)


def _memcpy_report(path, capfd) -> str:
    """ONNX Runtime's own warning about Memcpy nodes (stderr, WARNING level) for `path`."""
    ort = pytest.importorskip("onnxruntime")
    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    capfd.readouterr()
    so = ort.SessionOptions()
    so.log_severity_level = 2
    ort.InferenceSession(str(path), so, providers=[(CUDA, {"device_id": 0, "use_tf32": 0}), CPU])
    return capfd.readouterr().err


def test_the_frozen_stages_need_no_memcpy_on_the_cuda_provider(capfd):
    # pydiff.tools.export.ort_placement predicts 0 Memcpy and 0 CPU nodes for every bundled stage
    from pathlib import Path

    from pydiff.tools.export.ort_placement import predict_file

    for path in sorted(Path(bundled_path("shapes")).parent.glob("*/*.onnx")):
        assert predict_file(path).memcpy == 0
        err = _memcpy_report(path, capfd)
        assert "Memcpy nodes are added" not in err, (path.name, err[-400:])


def test_the_placement_model_predicts_the_text_encoders_memcpy(capfd):
    from pathlib import Path

    from pydiff.tools.export.ort_placement import predict_file

    path = Path(bundled_path("shapes")) / "text_encoder" / "model.onnx"
    err = _memcpy_report(path, capfd)
    assert f"{predict_file(path).memcpy} Memcpy nodes are added" in err, err[-400:]
