"""Whole runs on the GPU (pydiff.cuda_graph): eager and CUDA-graph replay against the CPU twin's plan."""

from __future__ import annotations

import numpy as np
import pytest

import pydiff
from pydiff.cuda_graph import GraphSampler, StepPlan

pytestmark = pytest.mark.gpu


def _cpu_model(x, t):
    B = x.shape[0]
    shift = np.where(np.arange(B) < B // 2, 0.2, -0.1).astype(np.float32).reshape((B,) + (1,) * (x.ndim - 1))
    return (np.float32(0.3) * x + shift + np.float32(1e-4) * t.reshape(shift.shape)).astype(np.float32)


def _gpu_model(x, t):
    import torch

    B = x.shape[0]
    shift = torch.where(torch.arange(B, device=x.device) < B // 2, 0.2, -0.1).to(torch.float32)
    shape = (B,) + (1,) * (x.dim() - 1)
    return 0.3 * x + shift.reshape(shape) + 1e-4 * t.reshape(shape)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("thr", [{}, {"clip_sample": True}, {"thresholding": True, "sample_max_value": 1.5}])
@pytest.mark.parametrize("scale", [None, 4.0])
def test_graph_replay_equals_eager_and_the_cpu_twin(name, thr, scale):
    import torch

    sched = pydiff.Schedule(beta_schedule="squaredcos_cap_v2", **thr)
    plan = StepPlan.from_sampler(pydiff.make_sampler(name, sched, 10), seed=3)
    x_T = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    want = plan.run_cpu(_cpu_model, x_T, guidance_scale=scale)
    xt = torch.from_numpy(x_T).cuda()
    eager = GraphSampler(_gpu_model, plan, shape=x_T.shape, guidance_scale=scale, graph=False).run(xt)
    runner = GraphSampler(_gpu_model, plan, shape=x_T.shape, guidance_scale=scale, graph=True)
    replay = runner.run(xt)
    assert runner.captured
    assert torch.equal(eager, replay)  # the same kernels, replayed
    again = runner.run(xt)  # a second run replays the same graph from a reset state
    assert torch.equal(again, replay)
    np.testing.assert_allclose(replay.cpu().numpy(), want, rtol=1e-5, atol=1e-5)


def test_graph_run_reports_non_finite_output():
    import torch

    plan = StepPlan.from_sampler(pydiff.make_sampler("ddim", pydiff.Schedule(), 4), seed=0)
    runner = GraphSampler(lambda x, t: x * float("nan"), plan, shape=(2, 4), graph=True)
    with pytest.raises(pydiff.NonFiniteError):
        runner.run(torch.zeros(2, 4, device="cuda"))
