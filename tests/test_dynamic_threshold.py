"""The dynamic threshold's selection against torch.quantile, bit for bit, on every path it takes.

The fused step settles a sample by its counts when the quantile clamps to 1 or sample_max_value and
otherwise selects among the values in (1, sample_max_value) alone (a radix pass over their bits, then
nth_element on one bucket; the smallest value >= sample_max_value when the lerp's upper end is one).
These tests sweep the quantile's rank across those regions, with ties, bucket edges, few and many
candidates, so that each branch must give torch's value.
"""

from __future__ import annotations

import numpy as np
import pytest

from pydiff import ops

torch = pytest.importorskip("torch")


def torch_threshold(x0: np.ndarray, q: float, smax: float) -> np.ndarray:
    a = torch.from_numpy(np.abs(x0.reshape(x0.shape[0], -1)))
    return torch.quantile(a, q, dim=1).clamp(1.0, smax).numpy()


def torch_abs_quantile(x: np.ndarray, q: float) -> np.ndarray:
    return torch.quantile(torch.from_numpy(np.abs(x.reshape(x.shape[0], -1))), q, dim=1).numpy()


def samples(kind: str, B: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":  # about 5% of |x0| in (1, 1.5), as a guided model's x0 near the middle of a chain
        x = 0.5 * rng.standard_normal((B, n))
    elif kind == "wide":  # most values above the clamp, many candidates
        x = 1.0 + 0.6 * rng.random((B, n))
    elif kind == "ties":  # few distinct values, all of them at bucket edges and the clamp bounds
        x = rng.choice(np.array([0.5, 1.0, 1.0 + 2**-23, 1.125, 1.25, 1.375, 1.5, 2.0]), (B, n))
    elif kind == "quantised":  # many ties inside the candidates' range
        x = np.round(rng.uniform(0.0, 1.7, (B, n)) * 64) / 64
    else:
        raise ValueError(kind)
    sign = np.where(rng.random((B, n)) < 0.5, -1.0, 1.0)
    return (sign * x).astype(np.float32)


@pytest.mark.parametrize("kind", ["normal", "wide", "ties", "quantised"])
@pytest.mark.parametrize("n", [1, 2, 5, 64, 65, 300, 4097, 12288, 40000])
def test_fused_threshold_equals_torch_quantile_over_ranks(kind, n):
    x0 = samples(kind, 3, n, seed=n)
    qs = np.unique(np.concatenate([np.linspace(0.0, 1.0, 41)[1:], 1 - np.geomspace(1e-4, 0.2, 25)]))
    for q in qs.astype(np.float32):
        for smax in (1.5, 1.25, 3.0):
            _, s = ops.dynamic_threshold(x0, float(q), smax)
            want = torch_threshold(x0, float(q), smax)
            assert np.array_equal(s, want), (kind, n, float(q), smax, s, want)


def test_many_candidates_take_the_four_histogram_path():
    # > 8 * 2048 values in (1, smax): the radix pass interleaves four histograms
    x0 = samples("wide", 2, 200_000, seed=3)
    for q in (0.001, 0.3, 0.5, 0.77, 0.995, 0.99999, 1.0):
        _, s = ops.dynamic_threshold(x0, q, 1.6)
        assert np.array_equal(s, torch_threshold(x0, q, 1.6)), q


@pytest.mark.parametrize("n", [1, 3, 64, 65, 1000, 100_003])
def test_abs_quantile_equals_torch(n):
    x = samples("normal", 2, n, seed=11) * 3
    for q in (0.001, 0.25, 0.5, 0.9, 0.995, 1.0):
        assert np.array_equal(ops.abs_quantile(x, q), torch_abs_quantile(x, q)), q


def test_fused_step_thresholds_equal_torch_on_its_own_x0():
    # the threshold the fused step selects is torch's quantile of the x0 that the step computes
    rng = np.random.default_rng(5)
    B, shape = 16, (3, 64, 64)
    eps = rng.standard_normal((B,) + shape)
    x = (0.7 * 0.5 * rng.standard_normal((B,) + shape) + 0.714 * eps).astype(np.float32)
    mo = (eps + 0.1 * rng.standard_normal((B,) + shape)).astype(np.float32)  # a good model's eps
    fields = dict(
        alpha=0.7,
        sigma=0.714,
        prediction_type=0,
        threshold_mode=2,
        dynamic_ratio=0.995,
        sample_max_value=1.5,
        c_x0=1.0,
    )
    thresholds = np.empty(B, np.float32)
    x0 = np.empty_like(x)
    ops.fused_step(x, mo, ops.step_params(**fields), thresholds=thresholds, x0_out=x0)
    raw_x0 = ops.predict_x0(x, mo, 0.7, 0.714)
    want = torch_threshold(raw_x0, 0.995, 1.5)
    assert ((want > 1) & (want < 1.5)).any()  # the selection really ran
    assert np.array_equal(thresholds, want)
