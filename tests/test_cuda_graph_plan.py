"""The host side of CUDA-graph replay (pydiff.cuda_graph), on the CPU: the step table and the plan."""

from __future__ import annotations

import numpy as np
import pytest

import pydiff
from pydiff import _C, ops
from pydiff.cuda_graph import GraphSampler, StepPlan

# The native struct, field by field (csrc/include/pydiff/step_params.h), to read a packed table back.
STEP_PARAMS_DTYPE = np.dtype(
    [
        ("alpha", "<f4"),
        ("sigma", "<f4"),
        ("prediction_type", "<i4"),
        ("threshold_mode", "<i4"),
        ("clip_range", "<f4"),
        ("dynamic_ratio", "<f4"),
        ("sample_max_value", "<f4"),
        ("use_clipped_eps", "<i4"),
        ("c_x", "<f4"),
        ("c_x0", "<f4"),
        ("c_eps", "<f4"),
        ("c_d", "<f4"),
        ("c_noise", "<f4"),
        ("_pad", "<u4"),
        ("seed", "<u8"),
        ("noise_step", "<u4"),
        ("c_d2", "<f4"),
        ("c_d3", "<f4"),
        ("history_output", "<i4"),
    ]
)


def _schedule(**kw):
    return pydiff.Schedule(beta_schedule="squaredcos_cap_v2", **kw)


def _model(x, t):
    """An elementwise network whose two halves differ (so guidance matters)."""
    B = x.shape[0]
    shift = np.where(np.arange(B) < B // 2, 0.2, -0.1).astype(np.float32).reshape((B,) + (1,) * (x.ndim - 1))
    return (np.float32(0.3) * x + shift + np.float32(1e-4) * t.reshape(shift.shape)).astype(np.float32)


def test_table_layout_is_the_native_struct():
    assert _C.STEP_PARAMS_BYTES == STEP_PARAMS_DTYPE.itemsize
    smp = pydiff.make_sampler("dpmpp_2m", _schedule(thresholding=True, sample_max_value=1.5), 10)
    plan = StepPlan.from_sampler(smp, seed=2**63 + 11)
    rows = np.frombuffer(plan.table(), STEP_PARAMS_DTYPE)
    assert len(rows) == len(plan) == 10
    for got, want in zip(rows, plan.rows):
        for k, v in want.items():
            assert got[k] == (np.float32(v) if isinstance(v, float) else v), k


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_plan_rows_are_the_samplers_steps(name):
    smp = pydiff.make_sampler(name, _schedule(), 12, eta=1.0 if name == "ddim" else 0.0)
    plan = StepPlan.from_sampler(smp, seed=5, start_step=3)
    assert len(plan) == 9
    np.testing.assert_array_equal(plan.timesteps, np.asarray(smp.timesteps[3:], np.float32))
    for j, row in enumerate(plan.rows):
        want = smp.params(3 + j, 5)
        if j == 0:
            assert row["c_d"] == 0.0  # no history at the first step of a run
            want["c_d"] = 0.0
        assert row == want
    assert plan.uses_history == (name == "dpmpp_2m")


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("thr", [{}, {"clip_sample": True}, {"thresholding": True, "sample_max_value": 1.5}])
@pytest.mark.parametrize("scale", [None, 4.0, "per-sample"])
def test_plan_on_the_cpu_twin_equals_pydiff_sample(name, thr, scale):
    sched = _schedule(**thr)
    x_T = np.random.default_rng(0).standard_normal((3, 2, 5, 5)).astype(np.float32)
    if scale == "per-sample":
        scale = np.array([1.5, 3.0, 7.0], np.float32)
    kw = dict(eta=1.0) if name == "ddim" else {}
    if scale is None:
        want = pydiff.sample(
            lambda x, t: _model(x, t), x_T, schedule=sched, sampler=name, steps=8, seed=9, **kw
        )
    else:
        c = np.zeros((3, 1)), np.ones((3, 1))  # the model ignores cond: the halves differ by position
        want = pydiff.sample(
            lambda x, t, cond: _model(x, t),
            x_T,
            schedule=sched,
            sampler=name,
            steps=8,
            seed=9,
            cond=c[0],
            uncond=c[1],
            guidance_scale=scale,
            **kw,
        )
    plan = StepPlan.from_sampler(pydiff.make_sampler(name, sched, 8, **kw), seed=9)
    got = plan.run_cpu(_model, x_T, guidance_scale=scale)
    np.testing.assert_array_equal(got, want)


def test_plan_rejects_a_bad_start():
    smp = pydiff.make_sampler("ddim", _schedule(), 5)
    with pytest.raises(ValueError, match="start_step"):
        StepPlan.from_sampler(smp, seed=0, start_step=5)


def test_plan_run_reports_non_finite_output():
    plan = StepPlan.from_sampler(pydiff.make_sampler("ddim", _schedule(), 4), seed=0)
    with pytest.raises(pydiff.NonFiniteError, match="NaN or Inf"):
        plan.run_cpu(lambda x, t: np.full_like(x, np.nan), np.zeros((1, 4), np.float32))


def test_graph_sampler_needs_a_gpu_and_says_so():
    from pydiff import cuda

    if cuda.available():
        pytest.skip("a GPU is present")
    plan = StepPlan.from_sampler(pydiff.make_sampler("ddim", _schedule(), 4), seed=0)
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        GraphSampler(lambda x, t: x, plan, shape=(1, 4))


def test_ops_constants_match_the_plan_modes():
    assert ops.DYNAMIC == 2 and ops.STATIC_CLIP == 1 and ops.NO_THRESHOLD == 0


class _FakeStage:
    """A backend stage model stand-in: records what StageNetwork enqueues."""

    def __init__(self):
        self.calls = []

    def run_device(self, x, t, cond, *, out, stream):
        self.calls.append((x, t, cond, out, stream))
        out.copy_(x * 2)
        return out


@pytest.fixture
def stream_1234(monkeypatch):
    """torch.cuda.current_stream answering a fake stream on this GPU-less machine."""
    torch = pytest.importorskip("torch")
    stream = type("Stream", (), {"cuda_stream": 0x1234})()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    return stream


def test_stage_network_binds_static_buffers_on_the_current_stream(stream_1234):
    import torch

    from pydiff.backends.stage_network import StageNetwork

    stage = _FakeStage()
    labels = np.array([3, 7], np.int64)
    states = torch.ones(2, 4, 8)
    net = StageNetwork(stage, {"class_labels": labels, "encoder_hidden_states": states}, device="cpu")
    assert net.cond["class_labels"].dtype == torch.int64 and net.cond["class_labels"].tolist() == [3, 7]
    assert net.cond["encoder_hidden_states"] is states  # device tensors are kept, not copied
    x, t = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4), torch.full((2,), 10.0)
    first = net(x, t)
    second = net(x + 1, t)
    assert second is first and first.data_ptr() == net.out.data_ptr()  # one buffer: what a graph replays
    assert torch.equal(second, (x + 1) * 2)
    assert [c[4] for c in stage.calls] == [stream_1234, stream_1234]
    assert all(c[2] is net.cond and c[3] is net.out for c in stage.calls)
    with pytest.raises(ValueError, match=r"serves shape \(2, 3, 4\), not \(2, 3, 5\)"):
        net(torch.zeros(2, 3, 5), t)


def test_stage_network_refuses_what_it_cannot_replay(stream_1234):
    import torch

    from pydiff.backends.stage_network import StageNetwork

    with pytest.raises(TypeError, match="backend's stage model.*run_device, got function"):
        StageNetwork(lambda x, t: x, device="cpu")
    net = StageNetwork(_FakeStage(), {"encoder_hidden_states": np.zeros((4, 2), np.float32)}, device="cpu")
    with pytest.raises(
        ValueError, match=r"cond\['encoder_hidden_states'\]: batch 4, the network input's is 2"
    ):
        net(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"cond\['s'\]: on meta, the network runs on cpu"):
        StageNetwork(_FakeStage(), {"s": torch.empty(2, device="meta")}, device="cpu")


def test_stage_network_over_a_cpu_onnx_session_names_the_fix(stream_1234):
    """ONNX Runtime without the caller's stream cannot join a captured step: the call is refused."""
    import torch

    from pydiff.backends import create_backend
    from pydiff.backends.stage_network import StageNetwork
    from pydiff.package import load_package
    from pydiff.pipeline import bundled_path

    model = create_backend("onnxruntime", load_package(bundled_path("shapes")), providers="cpu").model("base")
    cond = {
        "encoder_hidden_states": np.zeros((2, 16, 384), np.float32),
        "encoder_attention_mask": np.ones((2, 16), np.float32),
    }
    net = StageNetwork(model, cond, device="cpu")
    with pytest.raises(ValueError, match="ONNX Runtime's own stream.*providers='cuda', stream="):
        net(torch.zeros(2, 3, 16, 16), torch.full((2,), 500.0))
