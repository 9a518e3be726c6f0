"""The CUDA twin against the CPU twin (its oracle), on torch CUDA tensors. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from pydiff import cuda, ops

pytestmark = pytest.mark.gpu

SHAPES = [(1, 7), (3, 5, 9), (16, 3, 64, 64), (2, 3, 257, 255)]


def _params(**kw):
    base = dict(
        alpha=0.6,
        sigma=0.8,
        prediction_type=0,
        threshold_mode=0,
        clip_range=1.0,
        dynamic_ratio=0.995,
        sample_max_value=1.5,
        use_clipped_eps=0,
        c_x=0.9,
        c_x0=0.3,
        c_eps=0.2,
        c_d=0.0,
        c_noise=0.0,
        seed=77,
        noise_step=4,
    )
    base.update(kw)
    return base


def _dev(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pred", [0, 1, 2])
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize(
    "extra", [{}, {"c_noise": 0.5}, {"c_d": -0.25}, {"use_clipped_eps": 1, "c_noise": 0.1}]
)
def test_fused_step_matches_cpu_twin(shape, pred, mode, extra):
    import torch

    rng = np.random.default_rng(0)
    B = shape[0]
    x = rng.standard_normal(shape).astype(np.float32)
    mo = (rng.standard_normal((2 * B,) + shape[1:]) * 1.4).astype(np.float32)
    prev = rng.standard_normal(shape).astype(np.float32)
    scales = (rng.standard_normal(B) + 3).astype(np.float32)
    fields = _params(prediction_type=pred, threshold_mode=mode, **extra)
    p = ops.step_params(**fields)
    use_prev = fields["c_d"] != 0
    x0_cpu, thr_cpu = np.empty_like(x), np.empty(B, np.float32)
    want, bad = ops.fused_step(
        x, mo, p, guidance_scale=scales, x0_prev=prev if use_prev else None, x0_out=x0_cpu, thresholds=thr_cpu
    )
    out, x0_gpu = torch.empty(shape, device="cuda"), torch.empty(shape, device="cuda")
    thr_gpu = torch.empty(B, device="cuda")
    counter = torch.zeros(1, dtype=torch.int64, device="cuda")
    cuda.fused_step(
        _dev(x),
        _dev(mo),
        p,
        out=out,
        guidance_scale=_dev(scales),
        x0_prev=_dev(prev) if use_prev else None,
        x0_out=x0_gpu,
        thresholds=thr_gpu,
        nonfinite=counter,
    )
    torch.cuda.synchronize()
    if mode == 2:
        assert np.array_equal(thr_gpu.cpu().numpy(), thr_cpu)  # the quantile is exact on both
    # Same formulas, no FMA contraction on either side: a few ulp at most.
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=4e-7 * 8, atol=1e-6)
    np.testing.assert_allclose(x0_gpu.cpu().numpy(), x0_cpu, rtol=4e-7 * 8, atol=1e-6)
    assert int(counter.item()) == bad


@pytest.mark.parametrize("count,offset", [(1, 0), (5, 3), (1 << 20, 0), (100_003, 17)])
def test_noise_bit_identical(count, offset):
    import torch

    out = torch.empty(count, device="cuda")
    cuda.randn(out, seed=2**40 + 5, step=3, offset=offset)
    assert np.array_equal(out.cpu().numpy(), ops.randn((count,), 2**40 + 5, 3, offset=offset))


def test_half_and_bfloat16_storage_within_twice_torch_error():
    import torch

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    mo = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    p = ops.step_params(**_params(threshold_mode=2))
    ref, _ = ops.fused_step(x, mo, p, guidance_scale=5.0)
    for dt in (torch.float16, torch.bfloat16):
        xd, md = _dev(x).to(dt), _dev(mo).to(dt)
        out = torch.empty(x.shape, device="cuda", dtype=dt)
        cuda.fused_step(xd, md, p, out=out, guidance_scale=5.0)
        # the same step done in torch at this precision, for the error budget (flash-attention's 2x rule)
        c, u = md.chunk(2)
        eps = u + 5.0 * (c - u)
        x0 = (xd - 0.8 * eps) / 0.6
        s = (
            torch.quantile(x0.float().abs().flatten(1), 0.995, dim=1)
            .clamp(1, 1.5)
            .to(dt)[:, None, None, None]
        )
        x0 = torch.clamp(x0, -s, s) / s
        torch_out = 0.3 * x0 + 0.9 * xd + 0.2 * eps
        ours = np.abs(out.float().cpu().numpy() - ref).max()
        theirs = np.abs(torch_out.float().cpu().numpy() - ref).max()
        assert ours <= 2 * theirs + 1e-6, (dt, ours, theirs)


def test_errors_for_host_device_mixups():
    import torch

    x = torch.zeros(2, 4, device="cuda")
    p = ops.step_params(**_params())
    with pytest.raises(TypeError, match="model_output is a host"):
        cuda.fused_step(x, np.zeros((2, 4), np.float32), p, out=torch.empty_like(x))
    with pytest.raises(TypeError, match="out is a CPU tensor"):
        cuda.fused_step(x, x, p, out=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="must be contiguous"):
        cuda.fused_step(x, torch.zeros(4, 2, device="cuda").t(), p, out=torch.empty_like(x))
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="is on GPU 1 but x is on GPU 0"):
            cuda.fused_step(x, x, p, out=torch.empty(2, 4, device="cuda:1"))


def test_cuda_array_interface_round_trip():
    import torch

    class CAI:  # a minimal foreign device array: only __cuda_array_interface__
        def __init__(self, t):
            self.t = t
            self.__cuda_array_interface__ = t.__cuda_array_interface__

    x = torch.randn(3, 16, device="cuda")
    mo = torch.randn(3, 16, device="cuda")
    p = ops.step_params(**_params())
    a, b = torch.empty_like(x), torch.empty_like(x)
    cuda.fused_step(x, mo, p, out=a)
    cuda.fused_step(CAI(x), CAI(mo), p, out=CAI(b))
    torch.cuda.synchronize()
    assert torch.equal(a, b)


def test_a_producer_stream_is_waited_for():
    # x is written on a side stream by a long chain of kernels; its __cuda_array_interface__ names
    # that stream, so the step (on the default stream) must wait for it on the device
    import torch

    side = torch.cuda.Stream()
    x = torch.zeros(1 << 22, device="cuda")
    mo = torch.randn(1 << 22, device="cuda").reshape(1, -1)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        for _ in range(200):
            x.add_(1.0)

    class CAI:
        def __init__(self, t, stream):
            iface = dict(t.__cuda_array_interface__)
            iface.update(version=3, stream=stream)
            self.__cuda_array_interface__ = iface

    p = ops.step_params(**_params(c_x=1.0, c_x0=0.0, c_eps=0.0))
    out = torch.empty_like(x).reshape(1, -1)
    cuda.fused_step(
        CAI(x.reshape(1, -1), side.cuda_stream),
        mo,
        p,
        out=out,
        stream=torch.cuda.current_stream().cuda_stream,
    )
    torch.cuda.synchronize()
    assert torch.all(out == 200.0)  # c_x = 1: x_prev = x, all 200 additions seen


def _realistic(shape, alpha=0.6, sigma=0.8, seed=0):
    """x_t and [cond; uncond] of a good model: with guidance 5 the 0.995-quantile of |x0| falls in
    (1, 1.5), so the dynamic threshold is really selected (not settled by its clamp)."""
    rng = np.random.default_rng(seed)
    x0 = 0.4 * rng.standard_normal(shape)
    eps = rng.standard_normal(shape)
    x = (alpha * x0 + sigma * eps).astype(np.float32)
    both = np.concatenate([eps + 0.02 * rng.standard_normal(shape), eps + 0.02 * rng.standard_normal(shape)])
    return x, both.astype(np.float32)


@pytest.mark.parametrize("shape", [(16, 3, 64, 64), (3, 1, 33, 17), (1, (1 << 24) + 7)])
def test_dynamic_threshold_selected_exactly(shape):
    import torch

    x, mo = _realistic(shape)
    p = ops.step_params(**_params(threshold_mode=2, c_noise=0.3))
    B = shape[0]
    thr_cpu = np.empty(B, np.float32)
    want, _ = ops.fused_step(x, mo, p, guidance_scale=5.0, thresholds=thr_cpu)
    assert np.mean((thr_cpu > 1) & (thr_cpu < 1.5)) == 1.0  # the radix select really ran
    out, thr = torch.empty(shape, device="cuda"), torch.empty(B, device="cuda")
    ws = torch.empty(cuda.workspace_bytes(B, int(np.prod(shape[1:]))), dtype=torch.uint8, device="cuda")
    for workspace in (None, ws):
        cuda.fused_step(
            _dev(x), _dev(mo), p, out=out, guidance_scale=5.0, thresholds=thr, workspace=workspace
        )
        torch.cuda.synchronize()
        assert np.array_equal(thr.cpu().numpy(), thr_cpu)
        np.testing.assert_allclose(out.cpu().numpy(), want, rtol=4e-7 * 8, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 3, 128, 128), (2, 3, 1024, 1024)])
def test_dynamic_threshold_selected_from_a_long_list(shape):
    """Most |x0| above 1 and the quantile still below sample_max_value: the select kernel's one block
    per sample streams a long compacted list (its slowest case)."""
    import torch

    rng = np.random.default_rng(7)
    x0 = 2.0 * rng.standard_normal(shape)
    eps = rng.standard_normal(shape)
    x = (0.6 * x0 + 0.8 * eps).astype(np.float32)
    mo = eps.astype(np.float32)  # the exact eps: raw x0 is 2 N(0, 1)
    p = ops.step_params(**_params(threshold_mode=2, sample_max_value=10.0))
    B = shape[0]
    thr_cpu = np.empty(B, np.float32)
    want, _ = ops.fused_step(x, mo, p, thresholds=thr_cpu)
    assert np.all((thr_cpu > 1) & (thr_cpu < 10))
    out, thr = torch.empty(shape, device="cuda"), torch.empty(B, device="cuda")
    cuda.fused_step(_dev(x), _dev(mo), p, out=out, thresholds=thr)
    torch.cuda.synchronize()
    assert np.array_equal(thr.cpu().numpy(), thr_cpu)
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=4e-7 * 8, atol=1e-6)


def test_param_table_rows_and_counter():
    import torch

    from pydiff import _C

    x, mo = _realistic((4, 3, 16, 16))
    rows = [
        _params(
            threshold_mode=2,
            alpha=0.5 + 0.1 * i,
            sigma=0.7,
            c_noise=0.1 * i,
            noise_step=i,
            c_x=0.8 + 0.05 * i,
        )
        for i in range(3)
    ]
    table = torch.frombuffer(
        bytearray(_C.pack_step_params([ops.step_params(**r) for r in rows])), dtype=torch.uint8
    ).cuda()
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.empty(x.shape, device="cuda")
    for i, r in enumerate(rows):
        want, _ = ops.fused_step(x, mo, ops.step_params(**r), guidance_scale=5.0)
        # the by-value params are a decoy: the step must read row counter[0] of the table
        cuda.fused_step(
            _dev(x),
            _dev(mo),
            ops.step_params(
                **rows[0],
            ),
            out=out,
            guidance_scale=5.0,
            param_table=table,
            step_counter=counter,
        )
        torch.cuda.synchronize()
        assert int(counter.item()) == i + 1
        np.testing.assert_allclose(out.cpu().numpy(), want, rtol=4e-7 * 8, atol=1e-6)


def test_dlpack_round_trip():
    import torch

    class DL:  # a foreign device array that speaks DLPack only
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, stream=None):
            return self.t.__dlpack__(stream=stream)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    x, mo = torch.randn(3, 16, device="cuda"), torch.randn(3, 16, device="cuda")
    p = ops.step_params(**_params())
    a, b = torch.empty_like(x), torch.empty_like(x)
    cuda.fused_step(x, mo, p, out=a)
    cuda.fused_step(DL(x), DL(mo), p, out=DL(b))
    torch.cuda.synchronize()
    assert torch.equal(a, b)


def test_cupy_arrays():
    cp = pytest.importorskip("cupy")
    x, mo = _realistic((2, 3, 8, 8))
    p = ops.step_params(**_params(threshold_mode=2))
    want, _ = ops.fused_step(x, mo, p, guidance_scale=5.0)
    out = cp.empty(x.shape, cp.float32)
    s = cp.cuda.Stream(non_blocking=True)
    cuda.fused_step(cp.asarray(x), cp.asarray(mo), p, out=out, guidance_scale=5.0, stream=s)
    s.synchronize()
    np.testing.assert_allclose(cp.asnumpy(out), want, rtol=4e-7 * 8, atol=1e-6)
