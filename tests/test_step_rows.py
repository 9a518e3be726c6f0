"""fused_step_rows, the fused step with a step per row (step-level batching): every row equals, bit for
bit, fused_step on that row alone, at any position and beside any neighbours, for every sampler and
thresholding mode; the CPU twin equals the NumPy oracle; the arguments are checked as fused_step's.
The CUDA twin against the CPU twin: ctest (test_cuda_emu, on the emulator) and, on a GPU, the gpu test
at the end."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pydiff
from pydiff import _C, cuda, ops, reference

F32 = np.float32
STEPS = 20
SAMPLERS = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("dpmpp_2m", 0.0)]
MODES = ["none", "static", "dynamic"]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]


def schedule(prediction_type="epsilon", mode="none"):
    return pydiff.Schedule(
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=mode == "static",
        thresholding=mode == "dynamic",
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.5,
    )


def row_fields(sampler="ddpm", eta=0.0, mode="none", pred="epsilon", i=5, seed=0, clipped=False):
    """The StepParams fields of step i of a real sampler run (pydiff.make_sampler(...).params)."""
    s = pydiff.make_sampler(sampler, schedule(pred, mode), STEPS, eta=eta, use_clipped_model_output=clipped)
    return s.params(i, seed=seed)


def inputs(fields, shape, rng, guided):
    """One row's x_t and network output(s) for its step: x0 ~ 0.55 N(0, 1), so that with guidance the
    0.995-quantile of |x0| falls inside (1, 1.5) and the dynamic threshold is really selected."""
    a, s = fields["alpha"], fields["sigma"]
    x0, eps = 0.55 * rng.standard_normal(shape), rng.standard_normal(shape)
    x = a * x0 + s * eps
    target = {0: eps, 1: x0, 2: a * eps - s * x0}[fields["prediction_type"]]
    outs = [target + 0.05 * rng.standard_normal(shape) for _ in range(2 if guided else 1)]
    return x.astype(F32), [o.astype(F32) for o in outs]


def batch(rows, shape, guided, seed=0):
    """x [B, ...], model_output [2B or B, ...], x0_prev [B, ...], scales [B] for the rows' fields."""
    rng = np.random.default_rng(seed)
    xs, conds, unconds = [], [], []
    for f in rows:
        x, outs = inputs(f, shape, rng, guided)
        xs.append(x)
        conds.append(outs[0])
        unconds.append(outs[-1])
    x = np.stack(xs)
    mo = np.concatenate([np.stack(conds), np.stack(unconds)]) if guided else np.stack(conds)
    prev = (0.55 * rng.standard_normal(x.shape)).astype(F32)
    scales = (1.5 + 5 * rng.random(len(rows))).astype(F32)
    return x, mo, prev, scales


def bits(a):
    return np.ascontiguousarray(a, F32).view(np.uint32)


def single_row(x, mo, fields, b, guided, scales, prev):
    """fused_step on row b alone (B = 1), x0_prev given when its c_d != 0: what a row must equal."""
    B = x.shape[0]
    mo_b = np.concatenate([mo[b : b + 1], mo[B + b : B + b + 1]]) if guided else mo[b : b + 1]
    x0 = np.empty_like(x[b : b + 1])
    thr = np.full(1, -7.0, F32)
    out, bad = ops.fused_step(
        x[b : b + 1],
        mo_b,
        ops.step_params(**fields),
        guidance_scale=scales[b : b + 1] if guided else None,
        x0_prev=prev[b : b + 1] if fields["c_d"] else None,
        x0_out=x0,
        thresholds=thr,
    )
    return out[0], x0[0], thr[0], bad


def run_rows(x, mo, rows, guided, scales, prev, *, table=False):
    x0 = np.full_like(x, np.nan)
    thr = np.full(x.shape[0], -7.0, F32)
    params = ops.step_params_table(rows) if table else [ops.step_params(**f) for f in rows]
    out, bad = ops.fused_step_rows(
        x,
        mo,
        params,
        guidance_scale=scales if guided else None,
        x0_prev=prev if any(f["c_d"] for f in rows) else None,
        x0_out=x0,
        thresholds=thr,
    )
    return out, x0, thr, bad


def assert_rows_equal_single(x, mo, rows, guided, scales, prev, got):
    out, x0, thr, bad = got
    total_bad = 0
    for b, f in enumerate(rows):
        w_out, w_x0, w_thr, w_bad = single_row(x, mo, f, b, guided, scales, prev)
        assert np.array_equal(bits(out[b]), bits(w_out)), f"row {b}: x_prev differs from the single-row call"
        assert np.array_equal(bits(x0[b]), bits(w_x0)), f"row {b}: x0 differs from the single-row call"
        assert bits(thr[b]) == bits(w_thr), f"row {b}: threshold {thr[b]} vs {w_thr}"  # -7: left as it was
        total_bad += w_bad
    assert bad == total_bad


# ---------------------------------------------------------------- bit identity with the single-row call
@pytest.mark.parametrize("sampler,eta", SAMPLERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("guided", [True, False])
def test_each_row_equals_its_single_row_call(sampler, eta, mode, guided):
    # each row at another step with another seed; step 0 (no history) and the last step included
    steps = [0, 3, 9, STEPS - 1, 14]
    rows = [row_fields(sampler, eta, mode, "epsilon", i, seed=100 + i) for i, _ in zip(steps, range(5))]
    x, mo, prev, scales = batch(rows, (3, 8, 9), guided, seed=1)
    got = run_rows(x, mo, rows, guided, scales, prev)
    assert_rows_equal_single(x, mo, rows, guided, scales, prev, got)
    for b, f in enumerate(rows):  # and the rows op on one row is the same again
        one = run_rows(
            x[b : b + 1], _rows_of(mo, [b], guided), [f], guided, scales[b : b + 1], prev[b : b + 1]
        )
        assert np.array_equal(bits(one[0][0]), bits(got[0][b]))
    if mode == "dynamic" and guided:
        assert np.any((got[2] > 1) & (got[2] < 1.5)), "no threshold was selected inside (1, 1.5)"
    if mode != "dynamic":
        assert np.all(got[2] == -7.0)  # thresholds of rows without dynamic thresholding: untouched


def _rows_of(mo, idx, guided):
    """The model output of the rows idx, in that order (both halves when guided)."""
    B = mo.shape[0] // 2 if guided else mo.shape[0]
    idx = np.asarray(idx)
    return np.ascontiguousarray(np.concatenate([mo[idx], mo[B + idx]]) if guided else mo[idx])


def mixed_rows():
    """Every sampler, thresholding mode and prediction type in one batch, each at its own step and seed."""
    rows, k = [], 0
    for sampler, eta in SAMPLERS:
        for mode in MODES:
            pred = PREDICTIONS[k % 3]
            rows.append(row_fields(sampler, eta, mode, pred, i=(3 * k + 1) % STEPS, seed=1000 + 7 * k))
            k += 1
    rows.append(row_fields("ddim", 0.0, "static", "sample", i=4, seed=5, clipped=True))
    rows.append(row_fields("ddpm", 0.0, "dynamic", "epsilon", i=2, seed=2**64 - 1))
    return rows


@pytest.mark.parametrize("shape", [(3, 8, 9), (5, 7), (2, 80, 100)])  # n % 4 != 0; n > one work item
def test_mixed_rows_any_position_any_neighbours(shape):
    rows = mixed_rows()
    B = len(rows)
    x, mo, prev, scales = batch(rows, shape, True, seed=2)
    got = run_rows(x, mo, rows, True, scales, prev)
    assert_rows_equal_single(x, mo, rows, True, scales, prev, got)
    # permuted: each row moves with its inputs and keeps its result
    perm = np.random.default_rng(3).permutation(B)
    p_rows = [rows[i] for i in perm]
    moved = run_rows(x[perm], _rows_of(mo, perm, True), p_rows, True, scales[perm], prev[perm], table=True)
    for j, i in enumerate(perm):
        assert np.array_equal(bits(moved[0][j]), bits(got[0][i])), f"row {i} at position {j}"
        assert np.array_equal(bits(moved[1][j]), bits(got[1][i]))
        assert bits(moved[2][j]) == bits(got[2][i])
    # other neighbours (other inputs, other steps, other seeds): row 4 keeps its result
    others = [row_fields("ddpm", 0.0, "dynamic", "v_prediction", i=j, seed=9 + j) for j in range(3)]
    ox, omo, oprev, oscales = batch(others, shape, True, seed=4)
    keep = 4
    nx = np.concatenate([ox[:2], x[keep : keep + 1], ox[2:]])
    nmo = np.concatenate(
        [omo[:2], mo[keep : keep + 1], omo[2:3], omo[3:5], mo[B + keep : B + keep + 1], omo[5:]]
    )
    nprev = np.concatenate([oprev[:2], prev[keep : keep + 1], oprev[2:]])
    nscales = np.concatenate([oscales[:2], scales[keep : keep + 1], oscales[2:]])
    mixed = run_rows(nx, nmo, others[:2] + [rows[keep]] + others[2:], True, nscales, nprev)
    assert np.array_equal(bits(mixed[0][2]), bits(got[0][keep]))
    assert np.array_equal(bits(mixed[1][2]), bits(got[1][keep]))


def test_a_rows_noise_is_keyed_by_its_own_seed_step_and_element_within_the_sample():
    # x_prev = z: the in-kernel noise itself
    n = 3 * 37
    keys = [(0, 0), (7, 3), (7, 4), (2**64 - 1, 2**32 - 1), (7, 3)]
    rows = [ops.step_params(c_noise=1.0, seed=s, noise_step=t) for s, t in keys]
    x = np.ones((len(keys), 3, 37), F32)
    out, bad = ops.fused_step_rows(x, x, rows)
    assert bad == 0
    for b, (s, t) in enumerate(keys):
        assert np.array_equal(bits(out[b].reshape(-1)), bits(ops.randn(n, s, t)))
        assert np.array_equal(bits(out[b].reshape(-1)), bits(reference.randn(s, t, n)))
    assert np.array_equal(out[1], out[4])  # same key, same noise, whatever the position
    assert not np.array_equal(out[1], out[2])
    # fused_step numbers its noise over the batch: row 1 there is the stream's elements n .. 2n - 1
    whole, _ = ops.fused_step(x[:2], x[:2], rows[1])
    assert np.array_equal(bits(whole[1].reshape(-1)), bits(ops.randn(2 * n, 7, 3)[n:]))


def test_same_at_any_thread_count():
    rows = mixed_rows()
    x, mo, prev, scales = batch(rows, (3, 64, 64), True, seed=5)
    outs = []
    try:
        for nt in (1, 2, 3):
            ops.set_num_threads(nt)
            outs.append(run_rows(x, mo, rows, True, scales, prev))
    finally:
        ops.set_num_threads(0)
    for o in outs[1:]:
        assert all(np.array_equal(bits(a), bits(b)) for a, b in zip(o[:3], outs[0][:3]))


# ---------------------------------------------------------------- the CPU twin against the oracle
@pytest.mark.parametrize("guided", [True, False])
def test_cpu_twin_equals_the_reference(guided):
    rows = mixed_rows()
    x, mo, prev, scales = batch(rows, (3, 8, 9), guided, seed=6)
    out, x0, thr, bad = run_rows(x, mo, rows, guided, scales, prev)
    w_out, w_x0, w_thr = reference.fused_step_rows(
        x, mo, rows, guided=guided, guidance_scale=scales if guided else 1.0, x0_prev=prev
    )
    assert bad == 0
    np.testing.assert_allclose(out, w_out, rtol=1e-5, atol=1e-6)  # the house rule for fp32 ...
    np.testing.assert_allclose(x0, w_x0, rtol=1e-5, atol=1e-6)
    assert np.array_equal(bits(out), bits(w_out))  # ... and in fact bit for bit
    assert np.array_equal(bits(x0), bits(w_x0))
    dynamic = np.array([f["threshold_mode"] == ops.DYNAMIC for f in rows])
    assert np.array_equal(thr[dynamic], w_thr[dynamic])  # the selection is exact
    assert np.all(np.isnan(w_thr[~dynamic])) and np.all(thr[~dynamic] == -7.0)
    # the oracle takes the table's records too
    w2 = reference.fused_step_rows(
        x,
        mo,
        ops.step_params_table(rows),
        guided=guided,
        guidance_scale=scales if guided else 1.0,
        x0_prev=prev,
    )
    assert np.array_equal(bits(w2[0]), bits(w_out))


def test_rows_without_history_do_not_read_x0_prev():
    rows = mixed_rows()
    x, mo, prev, scales = batch(rows, (5, 7), True, seed=7)
    got = run_rows(x, mo, rows, True, scales, prev)
    poisoned = prev.copy()
    for b, f in enumerate(rows):
        if f["c_d"] == 0:
            poisoned[b] = np.nan
    again = run_rows(x, mo, rows, True, scales, poisoned)
    assert again[3] == 0
    assert np.array_equal(bits(again[0]), bits(got[0]))


def test_in_place_empty_and_non_finite():
    rows = [row_fields("ddpm", mode="static", i=i, seed=i) for i in range(3)]
    x, mo, prev, scales = batch(rows, (4, 5), False)
    want, _ = ops.fused_step_rows(x, mo, [ops.step_params(**f) for f in rows])
    xx = x.copy()
    ops.fused_step_rows(xx, mo, [ops.step_params(**f) for f in rows], out=xx)
    assert np.array_equal(bits(xx), bits(want))
    empty = np.zeros((0, 4, 5), F32)
    out, bad = ops.fused_step_rows(empty, empty, [])
    assert out.shape == empty.shape and bad == 0
    mo[1, 2, 3] = np.inf  # hidden by the clip in x0, still counted
    _, bad = ops.fused_step_rows(x, mo, [ops.step_params(**f) for f in rows])
    assert bad >= 1


# ---------------------------------------------------------------- random row mixes
@st.composite
def row_mixes(draw):
    B = draw(st.integers(1, 6))
    rows = []
    for _ in range(B):
        sampler, eta = draw(st.sampled_from(SAMPLERS))
        rows.append(
            row_fields(
                sampler,
                eta,
                draw(st.sampled_from(MODES)),
                draw(st.sampled_from(PREDICTIONS)),
                i=draw(st.integers(0, STEPS - 1)),
                seed=draw(st.integers(0, 2**64 - 1)),
                clipped=draw(st.booleans()),
            )
        )
    shape = draw(st.sampled_from([(1,), (7,), (2, 3, 5), (3, 8, 8)]))
    return rows, shape, draw(st.booleans()), draw(st.integers(0, 2**32 - 1)), draw(st.permutations(range(B)))


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row_mixes())
def test_fuzz_row_mixes(mix):
    rows, shape, guided, seed, perm = mix
    x, mo, prev, scales = batch(rows, shape, guided, seed=seed)
    got = run_rows(x, mo, rows, guided, scales, prev)
    assert_rows_equal_single(x, mo, rows, guided, scales, prev, got)
    w_out, w_x0, _ = reference.fused_step_rows(
        x, mo, rows, guided=guided, guidance_scale=scales if guided else 1.0, x0_prev=prev
    )
    np.testing.assert_allclose(got[0], w_out, rtol=1e-5, atol=1e-6)
    perm = np.asarray(perm)
    moved = run_rows(
        x[perm],
        _rows_of(mo, perm, guided),
        [rows[i] for i in perm],
        guided,
        scales[perm],
        prev[perm],
        table=True,
    )
    assert np.array_equal(bits(moved[0]), bits(got[0][perm]))


# ---------------------------------------------------------------- the arguments' checks
def _args(B=3, shape=(4, 5)):
    rows = [row_fields("ddpm", mode="dynamic", i=i, seed=i) for i in range(B)]
    x, mo, prev, scales = batch(rows, shape, True)
    return rows, x, mo, prev, scales


def test_table_types_and_shapes_are_checked():
    rows, x, mo, prev, scales = _args()
    params = [ops.step_params(**f) for f in rows]
    with pytest.raises(TypeError, match="params must have dtype pydiff._C.STEP_PARAMS_DTYPE"):
        ops.fused_step_rows(x, mo, np.zeros(3, np.float64), guidance_scale=scales)
    with pytest.raises(ValueError, match=r"params must have shape \(3,\)"):
        ops.fused_step_rows(x, mo, ops.step_params_table(rows[:2]), guidance_scale=scales)
    with pytest.raises(ValueError, match="params must hold 3 StepParams"):
        ops.fused_step_rows(x, mo, params[:2], guidance_scale=scales)
    with pytest.raises(TypeError, match=r"params\[1\] must be a pydiff._C.StepParams, got dict"):
        ops.fused_step_rows(x, mo, [params[0], rows[1], params[2]], guidance_scale=scales)
    with pytest.raises(TypeError, match="params must be a numpy array"):
        ops.fused_step_rows(x, mo, 3, guidance_scale=scales)
    with pytest.raises(ValueError, match="params must be C-contiguous"):
        ops.fused_step_rows(x, mo, ops.step_params_table(rows * 2)[::2], guidance_scale=scales)
    with pytest.raises(ValueError, match="guidance scales must be finite"):
        ops.fused_step_rows(x, mo, params, guidance_scale=np.array([1, np.nan, 2], F32))
    with pytest.raises(ValueError, match=r"model_output must have shape \(6, 4, 5\)"):
        ops.fused_step_rows(x, mo[:3], params, guidance_scale=scales)
    t = ops.step_params_table(rows)
    assert (
        t.dtype == _C.STEP_PARAMS_DTYPE == ops.STEP_PARAMS_DTYPE and t.dtype.itemsize == _C.STEP_PARAMS_BYTES
    )
    assert list(t["noise_step"]) == [0, 1, 2] and t["threshold_mode"][0] == ops.DYNAMIC


@pytest.mark.parametrize(
    "field,bad,what",
    [
        ("alpha", np.inf, "alpha must be finite in float32"),
        ("c_noise", np.nan, "c_noise must be finite in float32"),
        ("c_x", 1e39, "c_x must be finite in float32"),
        ("prediction_type", 3, "prediction_type must be 0"),
        ("threshold_mode", -1, "threshold_mode must be 0"),
        ("dynamic_ratio", 0.0, r"dynamic_thresholding_ratio must be in \(0, 1\]"),
        ("sample_max_value", 0.5, "sample_max_value must be >= 1"),
        ("use_clipped_eps", 2, "use_clipped_eps must be 0 or 1"),
    ],
)
def test_every_row_is_checked_and_named(field, bad, what):
    rows, x, mo, prev, scales = _args()
    out = np.full_like(x, 5.0)
    t = ops.step_params_table(rows)
    with np.errstate(over="ignore", invalid="ignore"):
        t[field][2] = bad
    with pytest.raises(ValueError, match=rf"params\[2\]: {what}"):
        ops.fused_step_rows(x, mo, t, guidance_scale=scales, out=out)
    assert np.all(out == 5.0)  # refused before any work
    with pytest.raises((TypeError, ValueError), match=r"params\[2\]"):
        ops.step_params_table(rows[:2] + [{**rows[2], field: bad}])


@pytest.mark.parametrize(
    "field,bad,what",
    [
        ("seed", -1, r"seed must be an integer in \[0, 2\*\*64\)"),
        ("seed", 2**64, r"seed must be an integer in \[0, 2\*\*64\)"),
        ("noise_step", 2**32, r"noise_step must be an integer in \[0, 2\*\*32\)"),
        ("noise_step", 1.5, "noise_step must be an integer"),
    ],
)
def test_noise_keys_have_ranges(field, bad, what):
    rows, *_ = _args()
    with pytest.raises((TypeError, ValueError), match=rf"params\[1\]: {what}"):
        ops.step_params_table([rows[0], {**rows[1], field: bad}, rows[2]])
    # a table's columns hold exactly these ranges: uint64 seeds, uint32 steps
    t = ops.step_params_table(rows)
    assert t.dtype["seed"] == np.uint64 and t.dtype["noise_step"] == np.uint32


def test_multistep_rows_need_x0_prev():
    rows = [row_fields("ddpm", i=3), row_fields("dpmpp_2m", i=5, seed=1)]
    assert rows[1]["c_d"] != 0
    x, mo, prev, _ = batch(rows, (4, 5), False)
    with pytest.raises(ValueError, match=r"params\[1\]: x0_prev is required when c_d != 0"):
        ops.fused_step_rows(x, mo, [ops.step_params(**f) for f in rows])
    ops.fused_step_rows(x, mo, [ops.step_params(**f) for f in rows], x0_prev=prev)


def test_outputs_may_not_overlap_the_inputs_or_the_table():
    rows, x, mo, prev, scales = _args()
    params = ops.step_params_table(rows)
    nbytes = x.nbytes
    buf = np.zeros(nbytes + params.nbytes + 64, np.uint8)
    out = buf[:nbytes].view(F32).reshape(x.shape)
    table = buf[nbytes - 64 : nbytes - 64 + params.nbytes].view(_C.STEP_PARAMS_DTYPE)
    table[:] = params
    with pytest.raises(ValueError, match="out overlaps params"):
        ops.fused_step_rows(x, mo, table, guidance_scale=scales, out=out)
    tbuf = np.zeros(params.nbytes + 16, np.uint8)
    t2 = tbuf[: params.nbytes].view(_C.STEP_PARAMS_DTYPE)
    t2[:] = params
    thr = tbuf[8:20].view(F32)  # inside the table
    with pytest.raises(ValueError, match="thresholds overlaps params"):
        ops.fused_step_rows(x, mo, t2, guidance_scale=scales, thresholds=thr)
    shifted = np.zeros(x.size + 1, F32)
    with pytest.raises(ValueError, match="out partially overlaps x"):
        ops.fused_step_rows(
            shifted[:-1].reshape(x.shape), mo, params, guidance_scale=scales, out=shifted[1:].reshape(x.shape)
        )
    with pytest.raises(ValueError, match="out partially overlaps x0_prev"):
        big = np.zeros(x.size + 1, F32)
        dpm = [row_fields("dpmpp_2m", i=5)] * 3
        ops.fused_step_rows(
            x,
            mo,
            [ops.step_params(**f) for f in dpm],
            guidance_scale=scales,
            x0_prev=big[:-1].reshape(x.shape),
            out=big[1:].reshape(x.shape),
        )
    with pytest.raises(ValueError, match="x0_out overlaps out"):
        o = np.empty_like(x)
        ops.fused_step_rows(x, mo, params, guidance_scale=scales, out=o, x0_out=o)


# ---------------------------------------------------------------- the CUDA twin's host side (no GPU)
class FakeCudaModule:
    def __init__(self):
        self.launches, self.waits = [], []

    @staticmethod
    def pointer_device(ptr):
        return 0

    def fused_step_rows(self, *args):
        self.launches.append(args)

    def stream_wait(self, consumer, producer, device):
        self.waits.append((consumer, producer, device))


class CaiArray:
    def __init__(self, shape, dtype=np.float32, *, stream=None, base=None, ptr=None):
        self.a = base if base is not None else np.zeros(shape, dtype)
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": np.dtype(dtype).str,
            "strides": None,
            "version": 3,
            "data": (ptr if ptr is not None else self.a.ctypes.data, False),
            "stream": stream,
        }


def test_the_cuda_wrapper_checks_rows_before_it_queues_anything(monkeypatch):
    fake = FakeCudaModule()
    monkeypatch.setattr(cuda, "_C_cuda", fake)
    B = 3
    rows = [ops.step_params(**row_fields("ddpm", mode="dynamic", i=i, seed=i)) for i in range(B)]
    x, mo, out = CaiArray((B, 4, 5), stream=0x51), CaiArray((2 * B, 4, 5)), CaiArray((B, 4, 5))
    bad = ops.step_params_table(rows)
    bad["alpha"][1] = np.inf
    with pytest.raises(ValueError, match=r"params\[1\]: alpha must be finite"):
        cuda.fused_step_rows(x, mo, bad, out=out, guidance_scale=2.0, stream=0x77)
    with pytest.raises(ValueError, match=r"params\[0\]: x0_prev is required"):
        dpm = [ops.step_params(**row_fields("dpmpp_2m", i=4))] * B
        cuda.fused_step_rows(x, mo, dpm, out=out, guidance_scale=2.0, stream=0x77)
    with pytest.raises(ValueError, match="params must hold 3 StepParams"):
        cuda.fused_step_rows(x, mo, rows[:2], out=out, guidance_scale=2.0, stream=0x77)
    assert fake.launches == [] and fake.waits == []
    cuda.fused_step_rows(x, mo, rows, out=out, guidance_scale=2.0, stream=0x77)
    assert fake.waits == [(0x77, 0x51, 0)]
    (args,) = fake.launches
    assert args[3:5] == (B, 20) and args[6] is rows and args[7] is True and args[-1] == 0


def _cuda_module():
    """pydiff._C_cuda when built, or the build at $PYDIFF_CUDA_EXT (a compile here, no GPU)."""
    path = os.environ.get("PYDIFF_CUDA_EXT")
    if path:
        spec = importlib.util.spec_from_file_location("pydiff._C_cuda", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    if not cuda.built():
        pytest.skip("the CUDA twin is not built (set PYDIFF_CUDA_EXT to a build's _C_cuda)")
    return cuda._C_cuda


def test_cuda_binding_refuses_rows_with_the_cpu_twins_words():
    m = _cuda_module()
    ok = [ops.step_params(), ops.step_params()]
    good, t = ops.step_params_table(ok), ops.step_params_table(ok)
    t["c_eps"][1] = np.inf
    dpm = [ops.step_params(), ops.step_params(c_d=0.5)]
    # x 2 x 4 floats at 4096, model_output at 8192, out at 12288 (never dereferenced: refused first)
    cases = [
        (
            lambda: m.fused_step_rows(4096, 8192, 12288, 2, 4, 0, t, False, 1.0, 0, 0, 0, 0, 0, 0),
            r"params\[1\]: c_eps must be finite in float32",
        ),
        (
            lambda: m.fused_step_rows(4096, 8192, 12288, 2, 4, 0, dpm, False, 1.0, 0, 0, 0, 0, 0, 0),
            r"params\[1\]: x0_prev is required",
        ),
        (
            lambda: m.fused_step_rows(4096, 8192, 12288, 2, 4, 0, ok[:1], False, 1.0, 0, 0, 0, 0, 0, 0),
            "params must hold 2 StepParams",
        ),
        (
            lambda: m.fused_step_rows(4096, 8192, 12288, 2, 4, 0, ok, True, 1.0, 12288 + 4, 0, 0, 0, 0, 0),
            "out overlaps guidance_scale",
        ),
        (
            lambda: m.fused_step_rows(4096, 8192, 12288, 2, 4, 0, ok, False, 1e39, 0, 0, 0, 0, 0, 0),
            "guidance_scale must be finite in float32",
        ),
        (
            lambda: m.fused_step_rows(4096, 8192, 12288, 2, 4, 0, ok, False, 1.0, 0, 0, 0, 0, 12288, 0),
            "nonfinite overlaps out",
        ),
        (
            lambda: m.fused_step_rows(4096, 8192, 12288, -1, 4, 0, ok, False, 1.0, 0, 0, 0, 0, 0, 0),
            "batch must be >= 0",
        ),
        (
            lambda: m.fused_step_rows(
                good.ctypes.data, 8192, good.ctypes.data, 2, 4, 0, good, False, 1.0, 0, 0, 0, 0, 0, 0
            ),
            "out overlaps params",
        ),
    ]
    for call, what in cases:
        with pytest.raises(ValueError, match=what):
            call()
    with pytest.raises(TypeError, match="params must have dtype"):
        m.fused_step_rows(4096, 8192, 12288, 2, 4, 0, np.zeros(2), False, 1.0, 0, 0, 0, 0, 0, 0)


# ---------------------------------------------------------------- the CUDA twin on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_twin_equals_the_cpu_twin(dtype):
    import torch

    rows = mixed_rows() * 3  # 44 rows: two launches of the rows kernels
    x, mo, prev, scales = batch(rows, (3, 9, 13), True, seed=8)
    if dtype == "float16":  # the CPU twin on the values the device arrays hold
        x, mo, prev = (a.astype(np.float16).astype(F32) for a in (x, mo, prev))
    want = run_rows(x, mo, rows, True, scales, prev)
    dt = getattr(torch, dtype)
    dev = {k: torch.from_numpy(v).to("cuda", dt) for k, v in dict(x=x, mo=mo, prev=prev).items()}
    out, x0 = torch.empty_like(dev["x"]), torch.empty_like(dev["x"])
    thr = torch.full((len(rows),), -7.0, device="cuda")
    nonfinite = torch.zeros(1, dtype=torch.int64, device="cuda")
    stream = torch.cuda.current_stream()
    cuda.fused_step_rows(
        dev["x"],
        dev["mo"],
        ops.step_params_table(rows),
        out=out,
        guidance_scale=torch.from_numpy(scales).cuda(),
        x0_prev=dev["prev"],
        x0_out=x0,
        thresholds=thr,
        nonfinite=nonfinite,
        stream=stream,
    )
    torch.cuda.synchronize()
    got_out, got_x0 = out.float().cpu().numpy(), x0.float().cpu().numpy()
    w_out = want[0].astype(np.float16).astype(F32) if dtype == "float16" else want[0]
    w_x0 = want[1].astype(np.float16).astype(F32) if dtype == "float16" else want[1]
    assert np.array_equal(bits(got_out), bits(w_out))
    assert np.array_equal(bits(got_x0), bits(w_x0))
    assert np.array_equal(bits(thr.cpu().numpy()), bits(want[2]))
    assert int(nonfinite.item()) == want[3]
