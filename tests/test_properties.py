"""Property-based tests (hypothesis) of the native ops and pydiff.sample: on any input, the result
equals the NumPy oracle or a clear TypeError/ValueError names the problem; never a crash."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pydiff
from pydiff import ops, reference

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=9)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def arrays_for(draw, shape, elements=finite):
    return draw(hnp.arrays(np.float32, shape, elements=elements))


@SETTINGS
@given(data=st.data(), shape=shapes, q=st.floats(1e-6, 1.0), smax=st.floats(1.0, 50.0))
def test_dynamic_threshold_property(data, shape, q, smax):
    x = data.draw(arrays_for(shape))
    if x.shape[0] > 0 and x[0].size == 0:
        with pytest.raises(ValueError, match="no elements"):
            ops.abs_quantile(x, q)
        return
    if x.size == 0:
        assert ops.dynamic_threshold(x, q, smax)[0].shape == x.shape
        return
    got, s = ops.dynamic_threshold(x, q, smax)
    want, ws = reference.dynamic_threshold(x, q, smax)
    assert np.array_equal(s, ws)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert np.array_equal(ops.abs_quantile(x, q), reference.abs_quantile(x, q))


@SETTINGS
@given(
    data=st.data(),
    shape=shapes,
    pred=st.integers(0, 2),
    mode=st.integers(0, 2),
    guided=st.booleans(),
    scale=st.floats(-1e4, 1e4),
    coeffs=st.lists(st.floats(-1e3, 1e3, width=32), min_size=5, max_size=5),
    alpha=st.floats(1e-3, 1.0),
    clipped=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
)
def test_fused_step_property(data, shape, pred, mode, guided, scale, coeffs, alpha, clipped, seed):
    x = data.draw(arrays_for(shape))
    B = shape[0]
    mo = data.draw(arrays_for(((2 * B) if guided else B,) + shape[1:]))
    prev = data.draw(arrays_for(shape))
    fields = dict(
        alpha=alpha,
        sigma=float(np.sqrt(1 - alpha * alpha)) or 1e-3,
        prediction_type=pred,
        threshold_mode=mode,
        clip_range=1.0,
        dynamic_ratio=0.9,
        sample_max_value=2.0,
        use_clipped_eps=int(clipped),
        c_x=coeffs[0],
        c_x0=coeffs[1],
        c_eps=coeffs[2],
        c_d=coeffs[3],
        c_noise=coeffs[4],
        seed=seed,
        noise_step=3,
    )
    if B > 0 and x[0].size == 0 and mode == 2:
        return  # no elements per sample: nothing to threshold (covered above)
    with np.errstate(all="ignore"):
        got, bad = ops.fused_step(
            x, mo, ops.step_params(**fields), guidance_scale=scale if guided else None, x0_prev=prev
        )
        want, _, _ = reference.fused_step(x, mo, fields, guided=guided, guidance_scale=scale, x0_prev=prev)
    # Extreme coefficients overflow to inf in both; then the step reports it.
    assert bad == int(np.count_nonzero(~np.isfinite(want)))
    ok = np.isfinite(want)
    np.testing.assert_allclose(
        got[ok], want[ok], rtol=2e-5, atol=1e-5 * (1 + np.abs(want[ok]).max(initial=0))
    )


@SETTINGS
@given(
    shape=shapes,
    dtype=st.sampled_from([np.float64, np.float16, np.int32, np.uint8, np.complex64]),
    which=st.sampled_from(["cond", "uncond"]),
)
def test_wrong_dtype_is_a_type_error_naming_the_argument(shape, dtype, which):
    good = np.zeros(shape, np.float32)
    bad = np.zeros(shape, dtype)
    args = {"cond": good, "uncond": good, which: bad}
    with pytest.raises(TypeError, match=which):
        ops.cfg_mix(args["cond"], args["uncond"])


@SETTINGS
@given(data=st.data(), shape=hnp.array_shapes(min_dims=2, max_dims=4, min_side=2, max_side=6))
def test_non_contiguous_layouts_are_value_errors(data, shape):
    base = np.zeros(shape, np.float32)
    view = data.draw(st.sampled_from([base.T, base[:, ::2], np.asfortranarray(base)]))
    if view.flags.c_contiguous:
        return
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.cfg_mix(view, np.zeros(view.shape, np.float32))


@SETTINGS
@given(
    data=st.data(),
    n=st.integers(1, 40),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    sampler=st.sampled_from(["ddpm", "ddim", "dpmpp_2m"]),
    thr=st.booleans(),
)
def test_sample_reports_non_finite_model_output(data, n, bad, sampler, thr):
    where = data.draw(st.integers(0, n - 1))
    step = data.draw(st.integers(0, 4))

    def model(x, t):
        out = np.zeros_like(x)
        if int(t[0]) == int(pydiff.timesteps(sched, 5, sampler)[step]):
            out.reshape(-1)[where] = bad
        return out

    sched = pydiff.Schedule(clip_sample=True, thresholding=thr, sample_max_value=1.5)
    with pytest.raises(pydiff.NonFiniteError, match=rf"step {step} "):
        pydiff.sample(model, np.zeros((1, n), np.float32), schedule=sched, sampler=sampler, steps=5, seed=0)


def _exact_fma32(a, b, c) -> np.float32:
    """a * b + c in exact rational arithmetic, rounded once to float32 (to nearest, ties to even)."""
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    lo = np.float32(float(exact))  # within an ulp; settle the rounding on the exact value
    cands = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
    best = min(cands, key=lambda r: (abs(Fraction(float(r)) - exact), int(r.view(np.uint32)) & 1))
    return np.float32(best)


def test_fma32_rounds_once_where_a_tiny_addend_breaks_a_tie():
    # torch.quantile's lerp on [FLT_MIN, 341.96722 x3] at q = 0.125: w (b - a) is a float32 midpoint
    # and the addend FLT_MIN decides it upwards (torch: 128.23771667)
    a, b, w = np.float32(1.1754944e-38), np.float32(341.96722), np.float32(0.375)
    assert reference.fma32(w, b - a, a) == np.float32(128.2377166748047) == _exact_fma32(w, b - a, a)


@SETTINGS
@given(
    a=st.floats(-1e6, 1e6, width=32),
    b=st.floats(-1e6, 1e6, width=32),
    c=st.one_of(st.floats(-1e6, 1e6, width=32), st.sampled_from([1.1754944e-38, -1.1754944e-38, 1e-30])),
)
def test_fma32_is_one_rounding(a, b, c):
    assert reference.fma32(a, b, c) == _exact_fma32(np.float32(a), np.float32(b), np.float32(c))
