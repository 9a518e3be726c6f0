"""Every native op against its NumPy oracle (pydiff.reference), on awkward shapes."""

from __future__ import annotations

import numpy as np
import pytest

from pydiff import ops, reference

SHAPES = [(1, 1), (1, 7), (3, 5), (2, 3, 8, 8), (5, 3, 17, 13), (1, 4, 128, 129), (16, 3, 64, 64)]


def rand(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_cfg_mix(shape):
    c, u = rand(shape, 1), rand(shape, 2)
    for scale in [1.0, 7.5, rand(shape[0], 3)]:
        np.testing.assert_allclose(
            ops.cfg_mix(c, u, scale), reference.cfg_mix(c, u, scale), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("q", [0.5, 0.9, 0.995, 1.0])
def test_abs_quantile_exact(shape, q):
    x = rand(shape, 4, 2.0)
    assert np.array_equal(ops.abs_quantile(x, q), reference.abs_quantile(x, q))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smax", [1.0, 1.5, 3.0])
def test_dynamic_threshold(shape, smax):
    x0 = rand(shape, 5, 1.3)
    got, s = ops.dynamic_threshold(x0, 0.995, smax)
    want, ws = reference.dynamic_threshold(x0, 0.995, smax)
    assert np.array_equal(s, ws)  # the selection is exact
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_dynamic_threshold_shortcuts_and_ties():
    # All |x0| <= 1: s = 1. All >= max: s = max. Many ties at the clamp bounds.
    B, n = 6, 1001
    x = np.zeros((B, n), np.float32)
    x[0] = 0.5
    x[1] = 9.0
    x[2, :500] = 1.0
    x[2, 500:] = 1.5
    x[3, :] = np.linspace(-3, 3, n, dtype=np.float32)
    x[4, :-3] = 0.25
    x[4, -3:] = 2.0
    x[5] = -1.5
    got, s = ops.dynamic_threshold(x, 0.995, 1.5)
    want, ws = reference.dynamic_threshold(x, 0.995, 1.5)
    assert np.array_equal(s, ws), (s, ws)
    assert s[0] == 1.0 and s[1] == 1.5
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_abs_quantile_over_2_24_elements_exact():
    n = 2**24 + 3
    x = rand((1, n), 6, 1.5)
    got = ops.abs_quantile(x, 0.995)
    srt = np.sort(np.abs(x[0]))
    lo, hi, w = reference.quantile_rank(0.995, n)
    assert lo == int(0.995 * (n - 1))  # float64 rank above 2^24
    assert got[0] == reference.torch_lerp(srt[lo], srt[hi], w)
    _, s = ops.dynamic_threshold(x, 0.995, 10.0)
    assert s[0] == min(max(got[0], 1.0), 10.0)


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_predict_x0_matches_reference(pred):
    rng = np.random.default_rng(5)
    x, mo = (rng.standard_normal((3, 4, 5)).astype(np.float32) for _ in range(2))
    got = ops.predict_x0(x, mo, 0.6, 0.8, pred)
    np.testing.assert_allclose(got, reference.predict_x0(x, mo, 0.6, 0.8, pred), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("count,offset", [(0, 0), (1, 0), (5, 3), (1000, 0), (4097, 17), (100_003, 1)])
def test_randn_bit_identical_to_reference(count, offset):
    got = ops.randn((count,), seed=2**40 + 12345, step=9, offset=offset)
    want = reference.randn(2**40 + 12345, 9, count, offset)
    assert np.array_equal(got, want)


def test_randn_same_at_any_thread_count_and_split():
    full = ops.randn((300_001,), seed=3, step=1)
    try:
        for nt in (1, 2, 3):
            ops.set_num_threads(nt)
            assert np.array_equal(ops.randn((300_001,), seed=3, step=1), full)
    finally:
        ops.set_num_threads(0)
    parts = np.concatenate([ops.randn((1000,), 3, 1, offset=o) for o in range(0, 300_001, 1000)])
    assert np.array_equal(parts[:300_001], full)


def test_randn_statistics_and_streams():
    z = ops.randn((1 << 20,), seed=1, step=0).astype(np.float64)
    assert abs(z.mean()) < 5 / 1024 and abs(z.var() - 1) < 0.01
    assert abs(np.mean(z**4) - 3) < 0.05  # Gaussian kurtosis
    other = ops.randn((1 << 20,), seed=1, step=1)
    assert abs(np.corrcoef(z, other)[0, 1]) < 0.01
    assert not np.array_equal(ops.randn((8,), seed=2, step=0), ops.randn((8,), seed=1, step=0))


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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pred", [0, 1, 2])
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("guided", [False, True])
def test_fused_step_matches_reference(shape, pred, mode, guided):
    x = rand(shape, 7)
    B = shape[0]
    mo = rand((2 * B,) + shape[1:] if guided else shape, 8, 1.4)
    prev = rand(shape, 9)
    scale = rand(B, 10) + 3 if guided else 1.0
    for extra in (
        dict(),
        dict(c_noise=0.5),
        dict(c_d=-0.25, c_noise=0.0),
        dict(use_clipped_eps=1, c_noise=0.1),
    ):
        fields = _params(prediction_type=pred, threshold_mode=mode, **extra)
        x0_out = np.empty_like(x)
        got, bad = ops.fused_step(
            x,
            mo,
            ops.step_params(**fields),
            guidance_scale=scale if guided else None,
            x0_prev=prev if fields["c_d"] else None,
            x0_out=x0_out,
        )
        want, want_x0, _ = reference.fused_step(
            x, mo, fields, guided=guided, guidance_scale=scale, x0_prev=prev if fields["c_d"] else None
        )
        assert bad == 0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x0_out, want_x0, rtol=1e-5, atol=1e-6)


def test_fused_step_same_at_any_thread_count():
    x, mo = rand((4, 3, 64, 64), 1), rand((8, 3, 64, 64), 2, 1.5)
    p = ops.step_params(**_params(threshold_mode=2, c_noise=0.7))
    outs = []
    try:
        for nt in (1, 2, 4):
            ops.set_num_threads(nt)
            outs.append(ops.fused_step(x, mo, p, guidance_scale=5.0)[0])
    finally:
        ops.set_num_threads(0)
    assert all(np.array_equal(o, outs[0]) for o in outs)


def test_fused_step_in_place_and_empty():
    x, mo = rand((2, 3, 4, 4), 1), rand((2, 3, 4, 4), 2)
    p = ops.step_params(**_params())
    want, _ = ops.fused_step(x, mo, p)
    ops.fused_step(x, mo, p, out=x)
    assert np.array_equal(x, want)
    empty = np.zeros((0, 3, 4, 4), np.float32)
    out, bad = ops.fused_step(empty, empty, p)
    assert out.shape == empty.shape and bad == 0


def test_fused_step_counts_non_finite():
    x, mo = rand((2, 8), 1), rand((2, 8), 2)
    mo[1, 3] = np.nan
    _, bad = ops.fused_step(x, mo, ops.step_params(**_params(threshold_mode=1)))
    assert bad == 1
    mo[1, 3] = np.inf  # static clipping would hide it in x0; it must still be reported
    _, bad = ops.fused_step(x, mo, ops.step_params(**_params(threshold_mode=1, c_eps=0.0)))
    assert bad == 1


def test_dlpack_torch_cpu_tensor_zero_copy():
    torch = pytest.importorskip("torch")
    c, u = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = torch.empty(2, 3, 4, 4)
    res = ops.cfg_mix(c, u, 2.0, out=out)
    assert np.shares_memory(res, out.numpy())
    np.testing.assert_allclose(out.numpy(), reference.cfg_mix(c.numpy(), u.numpy(), 2.0), rtol=1e-6)


class TestBadInput:
    def test_wrong_dtype_names_argument(self):
        x = np.zeros((2, 4), np.float64)
        with pytest.raises(TypeError, match="cond must have dtype float32"):
            ops.cfg_mix(x, x.astype(np.float32))
        with pytest.raises(TypeError, match="uncond must have dtype float32, got float16"):
            ops.cfg_mix(np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float16))

    def test_not_an_array(self):
        with pytest.raises(TypeError, match="cond must be a float32 numpy.ndarray"):
            ops.cfg_mix([[1.0]], np.zeros((1, 1), np.float32))

    def test_non_contiguous(self):
        a = np.zeros((4, 6), np.float32)[:, ::2]
        with pytest.raises(ValueError, match="cond must be C-contiguous"):
            ops.cfg_mix(a, np.zeros((4, 3), np.float32))

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"uncond must have shape \(2, 4\)"):
            ops.cfg_mix(np.zeros((2, 4), np.float32), np.zeros((2, 5), np.float32))
        p = ops.step_params(**_params())
        with pytest.raises(ValueError, match="model_output must have shape .*stacked"):
            ops.fused_step(np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32), p, guidance_scale=2.0)
        with pytest.raises(ValueError, match="guidance_scale must have shape"):
            ops.fused_step(
                np.zeros((2, 4), np.float32),
                np.zeros((4, 4), np.float32),
                p,
                guidance_scale=np.ones(3, np.float32),
            )

    def test_read_only_output(self):
        out = np.zeros((2, 4), np.float32)
        out.flags.writeable = False
        with pytest.raises(ValueError, match="out must be writeable"):
            ops.cfg_mix(np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32), out=out)

    def test_partial_overlap(self):
        buf = np.zeros(10, np.float32)
        a, b = buf[:8].reshape(2, 4), buf[2:].reshape(2, 4)
        with pytest.raises(ValueError, match="out partially overlaps cond"):
            ops.cfg_mix(a, np.zeros((2, 4), np.float32), out=b)

    def test_ratio_and_max_value(self):
        x = np.ones((1, 4), np.float32)
        for r in (0.0, -0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="ratio"):
                ops.dynamic_threshold(x, r, 1.5)
        with pytest.raises(ValueError, match="sample_max_value"):
            ops.dynamic_threshold(x, 0.9, 0.5)

    def test_nan_guidance_scale(self):
        with pytest.raises(ValueError, match="finite"):
            ops.cfg_mix(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32), float("nan"))

    def test_multistep_needs_history(self):
        p = ops.step_params(**_params(c_d=0.5))
        with pytest.raises(ValueError, match="x0_prev is required"):
            ops.fused_step(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32), p)

    def test_unknown_prediction_type(self):
        with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
            ops.predict_x0(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32), 0.5, 0.5, "x0")


class TestAliasingAndInputs:
    """Buffers the kernels would silently get wrong are refused; harmless inputs are taken."""

    def _step(self, **kw):
        p = ops.step_params(**_params(c_d=0.25))
        rng = np.random.default_rng(0)
        x, mo = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((2, 8)).astype(np.float32)
        prev = rng.standard_normal((2, 8)).astype(np.float32)
        args = dict(x0_prev=prev)
        args.update(kw)
        return ops.fused_step(x, mo, p, **args)

    def test_x0_out_may_not_be_out(self):
        out = np.empty((2, 8), np.float32)
        with pytest.raises(ValueError, match="x0_out overlaps out"):
            self._step(out=out, x0_out=out)

    def test_x0_out_may_not_straddle_an_input(self):
        p = ops.step_params(**_params())
        big = np.zeros(24, np.float32)
        x = big[:16].reshape(2, 8)
        with pytest.raises(ValueError, match="x0_out partially overlaps x"):
            ops.fused_step(x, np.zeros((2, 8), np.float32), p, x0_out=big[4:20].reshape(2, 8))

    def test_thresholds_may_not_touch_the_step_buffers(self):
        p = ops.step_params(**_params(threshold_mode=2, sample_max_value=1.5))
        mo = np.zeros((2, 8), np.float32)
        with pytest.raises(ValueError, match="thresholds overlaps model_output"):
            ops.fused_step(np.zeros((2, 8), np.float32), mo, p, thresholds=mo.reshape(-1)[:2])

    def test_read_only_and_equivalent_dtype_inputs_are_taken(self):
        import pickle

        a = np.frombuffer(np.arange(8, dtype=np.float32).tobytes(), np.float32).reshape(2, 4)  # read-only
        assert not a.flags.writeable
        np.testing.assert_array_equal(ops.cfg_mix(a, a, 3.0), a)
        b = np.zeros((2, 4), np.dtype("float32", metadata={"k": 1}))  # an equivalent dtype object
        assert b.dtype is not np.dtype(np.float32)
        ops.cfg_mix(b, b)
        c = pickle.loads(pickle.dumps(np.ones((2, 4), np.float32)))
        ops.cfg_mix(c, c)
        with pytest.raises(TypeError, match="must have dtype float32"):
            ops.cfg_mix(np.zeros((2, 4), ">f4"), np.zeros((2, 4), np.float32))

    def test_clip_range_and_empty_samples(self):
        p = ops.step_params(**_params(threshold_mode=1, clip_range=-1.0))
        with pytest.raises(ValueError, match="clip_sample_range"):
            ops.fused_step(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32), p)
        p = ops.step_params(**_params(threshold_mode=2, sample_max_value=1.5))
        with pytest.raises(ValueError, match="no elements per sample"):
            ops.fused_step(
                np.zeros((3, 0), np.float32),
                np.zeros((3, 0), np.float32),
                p,
                thresholds=np.full(3, 123.0, np.float32),
            )
