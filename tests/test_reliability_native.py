"""The native boundary checks every argument's range, not only its type and shape: thread counts,
the noise stream's seed, step and offset, float32-finite scalars, the domains the formulas need,
and overlaps between every output and every input. On any argument an op gives the NumPy oracle's
result, or a ValueError/TypeError that names the argument, before anything is written."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydiff import _C, ops, reference

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
F32_MAX = float(np.finfo(np.float32).max)
ERRORS = (ValueError, TypeError, OverflowError)

# any double: NaN, inf, float32-overflowing, float32's extremes, and ordinary values
any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([F32_MAX, -F32_MAX, 1e39, -1e39, 3.5e38, 0.0, 1.0, 0.5]),
    st.floats(-1e3, 1e3),
)
big_int = st.one_of(st.integers(-(2**70), 2**70), st.integers(-3, 3))


def f32_ok(v: float) -> bool:
    return abs(v) <= F32_MAX  # False for NaN


@pytest.fixture(autouse=True)
def default_threads():
    yield
    ops.set_num_threads(0)


# ------------------------------------------------------------------ threads
def test_a_million_threads_is_refused_and_the_next_large_op_runs():
    before = ops.get_num_threads()
    for n in (10**6, _C.MAX_NUM_THREADS + 1, -1, -(2**70), 2**70):
        with pytest.raises(ValueError, match=r"num_threads must be an integer in \[0, 1024\]"):
            ops.set_num_threads(n)
        assert ops.get_num_threads() == before
    z = ops.randn((40_000,), 7, 1)  # over 32,768 elements: the threaded path
    assert np.array_equal(z, reference.randn(7, 1, 40_000))


def test_zero_is_openmps_default_and_the_cap_runs():
    ops.set_num_threads(0)
    assert 1 <= ops.get_num_threads() <= _C.MAX_NUM_THREADS
    ops.set_num_threads(_C.MAX_NUM_THREADS)
    assert ops.get_num_threads() == _C.MAX_NUM_THREADS
    assert np.array_equal(ops.randn((40_000,), 3, 2), reference.randn(3, 2, 40_000))


@FUZZ
@given(n=st.one_of(big_int, st.integers(-5, 1100)))
def test_fuzz_set_num_threads(n):
    before = ops.get_num_threads()
    if 0 <= n <= _C.MAX_NUM_THREADS:
        ops.set_num_threads(n)
        assert ops.get_num_threads() == (n or ops.get_num_threads())
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        assert np.array_equal(ops.cfg_mix(x, x, 2.0), x)
    else:
        with pytest.raises(ValueError, match="num_threads"):
            ops.set_num_threads(n)
        assert ops.get_num_threads() == before
    ops.set_num_threads(0)


# ------------------------------------------------------------------ the noise stream
def test_offset_plus_count_may_not_overflow_and_nothing_is_written():
    out = np.full(4096, 123.0, np.float32)
    with pytest.raises(ValueError, match=r"offset \+ count must be at most 2\*\*63 - 4"):
        ops.randn((4096,), 0, offset=2**63 - 4, out=out)
    assert np.all(out == 123.0)
    last = 2**63 - 4 - 4096  # the last draw of 4096 that fits: the oracle's values
    assert np.array_equal(ops.randn((4096,), 0, offset=last), reference.randn(0, 0, 4096, last))


@pytest.mark.parametrize(
    "kw, what",
    [
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*64\)"),
        (dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*64\)"),
        (dict(seed=0, step=-1), r"step must be an integer in \[0, 2\*\*32\)"),
        (dict(seed=0, step=2**32), r"step must be an integer in \[0, 2\*\*32\)"),
        (dict(seed=0, offset=-1), r"offset must be an integer in \[0, 2\*\*63 - 4\]"),
        (dict(seed=0, offset=2**64 + 5), r"offset must be an integer"),
    ],
)
def test_seed_step_and_offset_ranges(kw, what):
    with pytest.raises(ValueError, match=what):
        ops.randn((8,), **kw)


def test_noise_coordinates_must_be_integers():
    for bad in (1.5, 2.0, "3", True, None):
        with pytest.raises(TypeError, match="seed must be an integer"):
            ops.randn((8,), bad)
    assert np.array_equal(
        ops.randn((8,), np.uint64(2**64 - 1), np.uint32(2**32 - 1)), reference.randn(2**64 - 1, 2**32 - 1, 8)
    )


@FUZZ
@given(
    seed=st.one_of(st.integers(0, 2**64 - 1), st.integers(-(2**66), 2**66)),
    step=st.one_of(st.integers(0, 2**32 - 1), st.integers(-(2**34), 2**34)),
    offset=st.one_of(
        st.integers(0, 1000), st.integers(2**63 - 6000, 2**63 + 10), st.integers(-(2**65), 2**65)
    ),
    count=st.integers(0, 70),
)
def test_fuzz_randn(seed, step, offset, count):
    out = np.full(count, 7.0, np.float32)
    bad = [
        name
        for name, ok in (
            ("seed", 0 <= seed < 2**64),
            ("step", 0 <= step < 2**32),
            ("offset", 0 <= offset <= 2**63 - 4),
        )
        if not ok
    ]
    if not bad and offset + count > 2**63 - 4:
        bad = ["offset + count"]
    if bad:
        with pytest.raises(ValueError) as e:
            ops.randn((count,), seed, step, offset=offset, out=out)
        assert str(e.value).startswith(bad[0])
        assert np.all(out == 7.0)
    else:
        ops.randn((count,), seed, step, offset=offset, out=out)
        assert np.array_equal(out, reference.randn(seed, step, count, offset))


# ------------------------------------------------------------------ scalars: finite in float32, and their domains
def test_a_float32_overflowing_scale_is_an_error_naming_it():
    c, u = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    out = np.full((2, 3), 5.0, np.float32)
    for v in (1e39, -1e39, 3.5e38):
        with pytest.raises(ValueError, match=r"scale must be finite in float32"):
            ops.cfg_mix(c, u, v, out=out)
    assert np.all(out == 5.0)
    assert np.all(ops.cfg_mix(c, u, F32_MAX) == np.float32(F32_MAX))
    with pytest.raises(ValueError, match="guidance_scale must be finite in float32"):
        ops.fused_step(
            np.ones((2, 3), np.float32), np.ones((4, 3), np.float32), ops.step_params(), guidance_scale=1e39
        )


@pytest.mark.parametrize(
    "field",
    [
        "alpha",
        "sigma",
        "clip_range",
        "dynamic_ratio",
        "sample_max_value",
        "c_x",
        "c_x0",
        "c_eps",
        "c_d",
        "c_noise",
    ],
)
def test_step_params_float_fields_are_finite_in_float32(field):
    for v in (1e39, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=rf"{field} must be finite in float32"):
            ops.step_params(**{field: v})
    with pytest.raises(TypeError, match=rf"{field} must be a real number"):
        ops.step_params(**{field: "1.0"})
    assert getattr(ops.step_params(**{field: F32_MAX}), field) == np.float32(F32_MAX)


@pytest.mark.parametrize(
    "field, bad, what",
    [
        ("seed", -1, r"seed must be an integer in \[0, 2\*\*64\)"),
        ("seed", 2**64, r"seed must be an integer in \[0, 2\*\*64\)"),
        ("noise_step", 2**32, r"noise_step must be an integer in \[0, 2\*\*32\)"),
        ("noise_step", -1, r"noise_step must be an integer in \[0, 2\*\*32\)"),
        ("prediction_type", 2**40, r"prediction_type must be an integer in \[-2147483648, 2147483647\]"),
    ],
)
def test_step_params_integer_fields_have_ranges(field, bad, what):
    with pytest.raises(ValueError, match=what):
        ops.step_params(**{field: bad})


@pytest.mark.parametrize(
    "field, bad, what",
    [
        (
            "prediction_type",
            3,
            r"prediction_type must be 0 \(epsilon\), 1 \(sample\) or 2 \(v_prediction\), got 3",
        ),
        ("prediction_type", -1, "prediction_type must be 0"),
        ("threshold_mode", 3, r"threshold_mode must be 0 \(none\), 1 \(static\) or 2 \(dynamic\), got 3"),
        ("use_clipped_eps", 2, r"use_clipped_eps must be 0 or 1, got 2"),
    ],
)
def test_enumerations_are_checked_before_any_work(field, bad, what):
    p = ops.step_params(**{field: bad})  # taken as an int32; every op and the step table refuse it
    out = np.full((1, 4), 5.0, np.float32)
    for call in (
        lambda: ops.fused_step(np.ones((1, 4), np.float32), np.ones((1, 4), np.float32), p, out=out),
        lambda: _C.validate_step_params(p),
        lambda: _C.pack_step_params([p]),
    ):
        with pytest.raises(ValueError, match=what):
            call()
    assert np.all(out == 5.0)


def test_valid_step_params_are_kept():
    p = ops.step_params(
        seed=2**64 - 1,
        noise_step=2**32 - 1,
        use_clipped_eps=True,
        prediction_type=2,
        threshold_mode=2,
        alpha=np.float32(0.5),
        sigma=1,
    )
    assert (p.seed, p.noise_step, p.use_clipped_eps, p.prediction_type, p.threshold_mode) == (
        2**64 - 1,
        2**32 - 1,
        1,
        2,
        2,
    )
    assert (p.alpha, p.sigma) == (0.5, 1.0)
    assert len(_C.pack_step_params([p])) == _C.STEP_PARAMS_BYTES


def test_quantile_domains():
    x = np.ones((1, 4), np.float32)
    for q in (0.0, -0.5, 1.5, float("nan"), 1e39):
        with pytest.raises(ValueError, match=r"^q must be"):
            ops.abs_quantile(x, q)
    with pytest.raises(ValueError, match=r"max_value must be >= 1"):
        _C.abs_quantile(x, np.empty(1, np.float32), 0.5, 0.5, True)
    with pytest.raises(ValueError, match=r"max_value must be finite in float32"):
        _C.abs_quantile(x, np.empty(1, np.float32), 0.5, 1e39, False)


# ------------------------------------------------------------------ overlaps: every output against every input
def test_out_may_not_overlap_the_per_sample_scales():
    rng = np.random.default_rng(0)
    c, u = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32)
    buf = np.zeros(10, np.float32)
    out, scales = buf[:8].reshape(2, 4), buf[6:8]
    scales[:] = 2.0
    before = buf.copy()
    with pytest.raises(ValueError, match="out overlaps scale"):
        ops.cfg_mix(c, u, scales, out=out)
    assert np.array_equal(buf, before)
    x, mo = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((4, 4)).astype(np.float32)
    p = ops.step_params(c_x0=1.0, sigma=0.5)
    for kw, what in (
        (dict(out=out), "out overlaps guidance_scale"),
        (dict(x0_out=out), "x0_out overlaps guidance_scale"),
    ):
        with pytest.raises(ValueError, match=what):
            ops.fused_step(x, mo, p, guidance_scale=scales, **kw)
        assert np.array_equal(buf, before)
    pd = ops.step_params(c_x0=1.0, sigma=0.5, threshold_mode=2, sample_max_value=1.5)
    with pytest.raises(ValueError, match="thresholds overlaps guidance_scale"):
        ops.fused_step(x, mo, pd, guidance_scale=scales, thresholds=buf[7:9])
    with pytest.raises(
        ValueError, match="guidance_scale must be finite, got nan at index 1"
    ):  # the native check
        _C.fused_step(x, mo, np.empty_like(x), p, guided=True, scales=np.array([1.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="scale must be finite, got inf at index 0"):
        _C.cfg_mix(c, u, np.empty_like(c), 1.0, np.array([np.inf, 1.0], np.float32))


def test_out_may_not_partly_overlap_x0_prev():
    buf = np.zeros(12, np.float32)
    p = ops.step_params(c_x0=1.0, c_d=0.5, sigma=0.5)
    with pytest.raises(ValueError, match="out partially overlaps x0_prev"):
        ops.fused_step(
            np.ones((2, 4), np.float32),
            np.ones((2, 4), np.float32),
            p,
            x0_prev=buf[:8].reshape(2, 4),
            out=buf[4:].reshape(2, 4),
        )


POOL = 40  # floats in the shared buffer the fuzz places arrays into


@st.composite
def placements(draw, names_sizes):
    """name -> element offset into the pool, or None (its own buffer)."""
    return {name: draw(st.one_of(st.none(), st.integers(0, POOL - size))) for name, size in names_sizes}


@FUZZ
@given(data=st.data(), B=st.integers(1, 3), n=st.integers(1, 5), per_sample=st.booleans())
def test_fuzz_cfg_mix_overlaps(data, B, n, per_sample):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    pool = rng.uniform(-2, 2, POOL).astype(np.float32)
    where = data.draw(
        placements(
            [("cond", B * n), ("uncond", B * n), ("out", B * n)] + ([("scale", B)] if per_sample else [])
        )
    )

    def arr(name, shape):
        k = int(np.prod(shape))
        if where[name] is None:
            return rng.uniform(-2, 2, k).astype(np.float32).reshape(shape)
        return pool[where[name] : where[name] + k].reshape(shape)

    c, u, out = arr("cond", (B, n)), arr("uncond", (B, n)), arr("out", (B, n))
    scale = arr("scale", (B,)) if per_sample else 1.5
    want = reference.cfg_mix(c.copy(), u.copy(), scale.copy() if per_sample else scale)
    before, out_before = pool.copy(), out.copy()
    try:
        got = ops.cfg_mix(c, u, scale, out=out)
    except ValueError as e:
        assert "overlaps" in str(e)
        assert np.array_equal(pool, before) and np.array_equal(out, out_before)
        return
    assert np.array_equal(got, want)


@FUZZ
@given(
    data=st.data(),
    B=st.integers(1, 3),
    n=st.integers(1, 4),
    guided=st.booleans(),
    per_sample=st.booleans(),
    dynamic=st.booleans(),
    with_prev=st.booleans(),
    with_x0=st.booleans(),
)
def test_fuzz_fused_step_overlaps(data, B, n, guided, per_sample, dynamic, with_prev, with_x0):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    pool = rng.uniform(-2, 2, POOL).astype(np.float32)
    sizes = [("x", B * n), ("model_output", (2 if guided else 1) * B * n), ("out", B * n)]
    sizes += [("guidance_scale", B)] if guided and per_sample else []
    sizes += [("x0_prev", B * n)] if with_prev else []
    sizes += [("x0_out", B * n)] if with_x0 else []
    sizes += [("thresholds", B)] if dynamic else []
    where = data.draw(placements(sizes))

    def arr(name, shape):
        k = int(np.prod(shape))
        if where[name] is None:
            return rng.uniform(-2, 2, k).astype(np.float32).reshape(shape)
        return pool[where[name] : where[name] + k].reshape(shape)

    x, out = arr("x", (B, n)), arr("out", (B, n))
    mo = arr("model_output", ((2 if guided else 1) * B, n))
    scale = (arr("guidance_scale", (B,)) if per_sample else 2.5) if guided else None
    prev = arr("x0_prev", (B, n)) if with_prev else None
    x0 = arr("x0_out", (B, n)) if with_x0 else None
    thr = arr("thresholds", (B,)) if dynamic else None
    fields = dict(
        alpha=0.8,
        sigma=0.6,
        prediction_type=0,
        threshold_mode=2 if dynamic else 0,
        clip_range=1.0,
        dynamic_ratio=0.9,
        sample_max_value=1.5,
        use_clipped_eps=0,
        c_x=0.7,
        c_x0=0.3,
        c_eps=0.2,
        c_d=0.25 if with_prev else 0.0,
        c_noise=0.1,
        seed=11,
        noise_step=4,
    )
    want, want_x0, want_s = reference.fused_step(
        x.copy(),
        mo.copy(),
        fields,
        guided=guided,
        guidance_scale=(scale.copy() if per_sample else scale) if guided else 1.0,
        x0_prev=None if prev is None else prev.copy(),
    )
    before = pool.copy()
    try:
        got, bad = ops.fused_step(
            x,
            mo,
            ops.step_params(**fields),
            guidance_scale=scale,
            x0_prev=prev,
            x0_out=x0,
            thresholds=thr,
            out=out,
        )
    except ValueError as e:
        assert "overlaps" in str(e)
        assert np.array_equal(pool, before)
        return
    assert bad == 0
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    if with_x0:
        np.testing.assert_allclose(x0, want_x0, rtol=2e-5, atol=1e-6)
    if dynamic:
        assert np.array_equal(thr, want_s)


# ------------------------------------------------------------------ fuzz of every scalar of every op
@FUZZ
@given(data=st.data(), B=st.integers(0, 2), n=st.integers(0, 5), scale=any_float)
def test_fuzz_cfg_mix_scale(data, B, n, scale):
    rng = np.random.default_rng(0)
    c, u = rng.standard_normal((B, n)).astype(np.float32), rng.standard_normal((B, n)).astype(np.float32)
    if not np.isfinite(scale) or not f32_ok(scale):
        with pytest.raises(ValueError, match="scale"):
            ops.cfg_mix(c, u, scale)
        return
    with np.errstate(all="ignore"):
        assert np.array_equal(ops.cfg_mix(c, u, scale), reference.cfg_mix(c, u, scale), equal_nan=True)


@FUZZ
@given(B=st.integers(0, 3), n=st.integers(0, 9), q=any_float, smax=any_float, clamp=st.booleans())
def test_fuzz_abs_quantile(B, n, q, smax, clamp):
    x = np.random.default_rng(B * 10 + n).normal(0, 2, (B, n)).astype(np.float32)
    out = np.full(B, 9.0, np.float32)
    q32 = np.float32(q) if f32_ok(q) else None
    ok = (
        f32_ok(q)
        and f32_ok(smax)
        and 0 < q32 <= 1
        and (not clamp or np.float32(smax) >= 1)
        and not (B and not n)
    )
    if not ok:
        with pytest.raises(ValueError, match=r"^(q|max_value|x) "):
            _C.abs_quantile(x, out, q, smax, clamp)
        assert np.all(out == 9.0)
        return
    _C.abs_quantile(x, out, q, smax, clamp)
    if B:
        assert np.array_equal(out, reference.abs_quantile(x, float(q32), float(np.float32(smax)), clamp))


@FUZZ
@given(B=st.integers(1, 3), n=st.integers(1, 9), ratio=any_float, smax=any_float)
def test_fuzz_dynamic_threshold(B, n, ratio, smax):
    x = np.random.default_rng(B * 10 + n).normal(0, 2, (B, n)).astype(np.float32)
    ok = f32_ok(ratio) and f32_ok(smax) and 0 < np.float32(ratio) <= 1 and np.float32(smax) >= 1
    if not ok:
        with pytest.raises(ValueError, match="ratio|sample_max_value"):
            ops.dynamic_threshold(x, ratio, smax)
        return
    got, s = ops.dynamic_threshold(x, ratio, smax)
    want, ws = reference.dynamic_threshold(x, float(np.float32(ratio)), float(np.float32(smax)))
    assert np.array_equal(s, ws)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


@FUZZ
@given(alpha=any_float, sigma=any_float, pred=st.sampled_from(["epsilon", "sample", "v_prediction"]))
def test_fuzz_predict_x0(alpha, sigma, pred):
    x = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    mo = np.random.default_rng(2).standard_normal((2, 5)).astype(np.float32)
    if not (f32_ok(alpha) and f32_ok(sigma)):
        with pytest.raises(ValueError, match="alpha|sigma"):
            ops.predict_x0(x, mo, alpha, sigma, pred)
        return
    with np.errstate(all="ignore"):
        got = ops.predict_x0(x, mo, alpha, sigma, pred)
        want = reference.predict_x0(x, mo, alpha, sigma, pred)
    # predict_x0 runs the fused step with c_eps = 0, and a zero divisor (alpha for epsilon, sigma for
    # sample) or a huge alpha or sigma makes eps infinite there: 0 * inf = NaN where the oracle has no eps
    # term. No sampler passes such values; only a clean run is asked of them.
    if all(1e-3 <= abs(v) <= 1e3 for v in (alpha, sigma)):
        assert np.array_equal(got, want, equal_nan=True)
    assert got.shape == x.shape


DOMAIN = "prediction_type|threshold_mode|use_clipped_eps|ratio|sample_max_value|clip_sample_range"
FLOAT_FIELDS = (
    "alpha",
    "sigma",
    "clip_range",
    "dynamic_ratio",
    "sample_max_value",
    "c_x",
    "c_x0",
    "c_eps",
    "c_d",
    "c_noise",
)


@FUZZ
@given(data=st.data(), guided=st.booleans(), scale=any_float)
def test_fuzz_fused_step_params(data, guided, scale):
    normal = st.floats(-2.0, 2.0)
    fields = {k: data.draw(st.one_of(normal, normal, any_float), label=k) for k in FLOAT_FIELDS}
    fields["alpha"] = data.draw(st.one_of(st.floats(0.1, 1.0), any_float), label="alpha'")
    fields["sigma"] = data.draw(st.one_of(st.floats(0.1, 1.0), any_float), label="sigma'")
    fields["clip_range"] = data.draw(st.one_of(st.floats(0.5, 3.0), any_float), label="clip_range'")
    fields["dynamic_ratio"] = data.draw(st.one_of(st.floats(0.5, 1.0), any_float), label="dynamic_ratio'")
    fields["sample_max_value"] = data.draw(
        st.one_of(st.floats(1.0, 3.0), any_float), label="sample_max_value'"
    )
    fields["prediction_type"] = data.draw(st.one_of(st.integers(0, 2), st.integers(-3, 5)))
    fields["threshold_mode"] = data.draw(st.one_of(st.integers(0, 2), st.integers(-3, 5)))
    fields["use_clipped_eps"] = data.draw(st.one_of(st.booleans(), st.integers(-1, 2)))
    fields["seed"] = data.draw(st.one_of(st.integers(0, 2**64 - 1), big_int))
    fields["noise_step"] = data.draw(st.one_of(st.integers(0, 2**32 - 1), big_int))
    bad_fields = [k for k in FLOAT_FIELDS if not f32_ok(fields[k])]
    bad_fields += [
        k for k, hi in (("seed", 2**64 - 1), ("noise_step", 2**32 - 1)) if not 0 <= fields[k] <= hi
    ]
    if bad_fields:
        with pytest.raises(ValueError) as e:
            ops.step_params(**fields)
        assert any(str(e.value).startswith(k) for k in bad_fields), (str(e.value), bad_fields)
        return
    p = ops.step_params(**fields)
    f32 = {k: np.float32(fields[k]) for k in FLOAT_FIELDS}
    mode = fields["threshold_mode"]
    domain_ok = (
        0 <= fields["prediction_type"] <= 2
        and 0 <= mode <= 2
        and 0 <= fields["use_clipped_eps"] <= 1
        and (mode != 2 or (0 < f32["dynamic_ratio"] <= 1 and f32["sample_max_value"] >= 1))
        and (mode != 1 or 0 < f32["clip_range"] <= np.float32(3e38))
    )
    rng = np.random.default_rng(3)
    x, prev = rng.standard_normal((2, 6)).astype(np.float32), rng.standard_normal((2, 6)).astype(np.float32)
    mo = rng.standard_normal(((4 if guided else 2), 6)).astype(np.float32)
    out = np.full((2, 6), 5.0, np.float32)
    scale_ok = not guided or (np.isfinite(scale) and f32_ok(scale))
    # the CUDA path's host-side rules are these (pack_step_params, validate_step_params)
    if not domain_ok:
        for call in (lambda: _C.validate_step_params(p), lambda: _C.pack_step_params([p])):
            with pytest.raises(ValueError, match=DOMAIN):
                call()
    else:
        _C.validate_step_params(p)
    if not (domain_ok and scale_ok):
        with pytest.raises(ValueError, match=DOMAIN + "|guidance"):
            ops.fused_step(x, mo, p, guidance_scale=scale if guided else None, x0_prev=prev, out=out)
        assert np.all(out == 5.0)
        return
    with np.errstate(all="ignore"):
        got, bad = ops.fused_step(x, mo, p, guidance_scale=scale if guided else None, x0_prev=prev, out=out)
        want, _, _ = reference.fused_step(
            x,
            mo,
            {**fields, "use_clipped_eps": int(fields["use_clipped_eps"])},
            guided=guided,
            guidance_scale=scale,
            x0_prev=prev,
        )
    assert 0 <= bad <= 2 * x.size
    ordinary = (
        all(abs(float(f32[k])) <= 4 for k in FLOAT_FIELDS)
        and f32["alpha"] >= 0.1
        and f32["sigma"] >= 0.1
        and abs(scale if guided else 0) <= 1e3
    )
    if (
        ordinary
    ):  # extreme but valid values: only a clean run is asked of them (rounding differs near overflow)
        assert bad == int(np.count_nonzero(~np.isfinite(want)))
        ok = np.isfinite(want)
        np.testing.assert_allclose(
            got[ok], want[ok], rtol=2e-5, atol=1e-5 * (1 + np.abs(want[ok]).max(initial=0))
        )


# ------------------------------------------------------------------ the CUDA twin's bindings (no GPU needed)
def _cuda_module():
    """pydiff._C_cuda when built; or the build at $PYDIFF_CUDA_EXT (a compile here, no GPU): every check
    below refuses before the module touches the CUDA runtime."""
    path = os.environ.get("PYDIFF_CUDA_EXT")
    if path:
        spec = importlib.util.spec_from_file_location("pydiff._C_cuda", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    from pydiff import cuda

    if not cuda.built():
        pytest.skip("the CUDA twin is not built")
    return cuda._C_cuda


def test_cuda_bindings_refuse_with_the_cpu_twins_words():
    m = _cuda_module()
    p = ops.step_params()
    cases = [
        (lambda: m.randn(4096, 4096, 0, 0, 2**63 - 4, 0), r"offset \+ count must be at most 2\*\*63 - 4"),
        (lambda: m.randn(4096, 4, -1, 0, 0, 0), r"seed must be an integer in \[0, 2\*\*64\)"),
        (lambda: m.randn(4096, 4, 0, 2**32, 0, 0), r"step must be an integer in \[0, 2\*\*32\)"),
        (lambda: m.randn(4096, 4, 0, 0, -1, 0), r"offset must be an integer in \[0, 2\*\*63 - 4\]"),
        (lambda: m.randn(4096, -1, 0, 0, 0, 0), r"count must be >= 0"),
        (lambda: m.cfg_mix(4096, 8192, 4096 + 4, 2, 2, 1.0, 0, 0), "out partially overlaps cond"),
        (lambda: m.cfg_mix(4096, 8192, 12288, 2, 2, 1e39, 0, 0), "scale must be finite in float32"),
        (lambda: m.cfg_mix(4096, 8192, 12288, 2, 2, 1.0, 12288 + 12, 0), "out overlaps scale"),
        (
            lambda: m.fused_step(4096, 8192, 12288, 2, 4, 0, p, False, 1e39, 0, 0, 0, 0, 0, 0),
            "guidance_scale must be finite in float32",
        ),
        (
            lambda: m.fused_step(4096, 8192, 12288, 2, 4, 0, p, True, 1.0, 12288 + 4, 0, 0, 0, 0, 0),
            "out overlaps guidance_scale",
        ),
        (
            lambda: m.fused_step(4096, 8192, 12288, 2, 4, 0, p, False, 1.0, 0, 12288 + 8, 0, 0, 0, 0),
            "out partially overlaps x0_prev",
        ),
        (
            lambda: m.fused_step(4096, 8192, 12288, 2, 4, 0, p, False, 1.0, 0, 0, 0, 0, 12288, 0),
            "nonfinite overlaps out",
        ),
        (
            lambda: m.fused_step(4096, 8192, 12288, -1, 4, 0, p, False, 1.0, 0, 0, 0, 0, 0, 0),
            "batch must be >= 0",
        ),
        (
            lambda: m.fused_step(
                4096,
                8192,
                12288,
                2,
                4,
                0,
                ops.step_params(threshold_mode=2, dynamic_ratio=0.0),
                False,
                1.0,
                0,
                0,
                0,
                0,
                0,
                0,
            ),
            r"dynamic_thresholding_ratio must be in \(0, 1\]",
        ),
        (lambda: m.workspace_bytes(2**31, 2**31), r"batch \* n must be at most 2\*\*60"),
    ]
    for call, what in cases:
        with pytest.raises(ValueError, match=what):
            call()
