"""Readable NumPy oracles of the native ops, with the same names (see csrc/math/*.h).

They mirror the C++ formulas operation by operation in float32, so that the native kernels can
be checked against them to a few ulp (usually bit for bit). They are slow; use pydiff.ops.
"""

from __future__ import annotations

import numpy as np

from pydiff.step_params import PredictionType, Thresholding

F32 = np.float32
EPSILON, SAMPLE, V_PREDICTION = PredictionType
NO_THRESHOLD, STATIC_CLIP, DYNAMIC = Thresholding

# ---------------------------------------------------------------- Philox4x32-10 and normals
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)
_STREAM_TAG = 0x70796466  # "pydf"


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 (Salmon et al., SC'11) of counters (uint32 arrays) under key (k0, k1)."""
    c = [np.asarray(v, dtype=np.uint64) & _MASK32 for v in (c0, c1, c2, c3)]
    k0, k1 = int(k0) & 0xFFFFFFFF, int(k1) & 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = _M0 * c[0], _M1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return [v.astype(np.uint32) for v in c]


def log_unit(u: np.ndarray) -> np.ndarray:
    """ln(u) for float32 u in (0, 1], as csrc/math/philox.h computes it."""
    b = u.astype(F32).view(np.uint32)
    e = ((b >> 23) & 0xFF).astype(np.int32) - 127
    m = ((b & 0x007FFFFF) | 0x3F800000).view(F32)
    big = m > F32(1.41421356)
    m = np.where(big, m * F32(0.5), m)
    e = np.where(big, e + 1, e)
    f = m - F32(1)
    s = f / (F32(2) + f)
    s2 = s * s
    p = s2 * (F32(0.333333333) + s2 * (F32(0.2) + s2 * (F32(0.142857143) + s2 * F32(0.111111111))))
    log_m = F32(2) * s + F32(2) * s * p
    ef = e.astype(F32)
    return ef * F32(0.693145752) + (log_m + ef * F32(1.42860677e-06))


def sincos_2pi(u: np.ndarray):
    """(cos 2 pi u, sin 2 pi u) for float32 u in [0, 1), as csrc/math/philox.h computes them."""
    q = (u * F32(4) + F32(0.5)).astype(np.int32)
    r = u - q.astype(F32) * F32(0.25)
    t = r * F32(6.28318531)
    t2 = t * t
    sn = t * (
        F32(1)
        + t2
        * (
            F32(-1.66666667e-01)
            + t2 * (F32(8.33333333e-03) + t2 * (F32(-1.98412698e-04) + t2 * F32(2.75573192e-06)))
        )
    )
    cs = F32(1) + t2 * (
        F32(-0.5)
        + t2
        * (
            F32(4.16666667e-02)
            + t2 * (F32(-1.38888889e-03) + t2 * (F32(2.48015873e-05) + t2 * F32(-2.75573192e-07)))
        )
    )
    k = q & 3
    c = np.select([k == 0, k == 1, k == 2], [cs, -sn, -cs], sn)
    s = np.select([k == 0, k == 1, k == 2], [sn, cs, -sn], -cs)
    return c.astype(F32), s.astype(F32)


def randn(seed: int, step: int, count: int, offset: int = 0) -> np.ndarray:
    """Standard normals of noise stream (seed, step) for elements offset .. offset + count - 1.

    Element e is value e % 4 of Box-Muller on Philox block e // 4 with counter
    (e // 4 low word, e // 4 high word, step, "pydf") and key (seed low word, seed high word).
    """
    if count == 0:
        return np.zeros(0, F32)
    g0, g1 = offset // 4, (offset + count + 3) // 4
    g = np.arange(g0, g1, dtype=np.uint64)
    r = philox4x32_10(
        g & _MASK32,
        g >> np.uint64(32),
        np.full_like(g, step & 0xFFFFFFFF),
        np.full_like(g, _STREAM_TAG),
        seed & 0xFFFFFFFF,
        (seed >> 32) & 0xFFFFFFFF,
    )
    out = np.empty((len(g), 4), F32)
    for p in range(2):
        u1 = ((r[2 * p] >> 8) + 1).astype(F32) * F32(2.0**-24)
        u2 = (r[2 * p + 1] >> 8).astype(F32) * F32(2.0**-24)
        rad = np.sqrt(F32(-2) * log_unit(u1))
        c, s = sincos_2pi(u2)
        out[:, 2 * p], out[:, 2 * p + 1] = rad * c, rad * s
    flat = out.reshape(-1)
    return flat[offset - 4 * g0 : offset - 4 * g0 + count].copy()


# ---------------------------------------------------------------- per-element formulas
def cfg_mix(cond: np.ndarray, uncond: np.ndarray, scale) -> np.ndarray:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + s * (cond - uncond); scale scalar or [B]."""
    s = _per_sample(scale, cond)
    return uncond + s * (cond - uncond)


def predict_x0_eps(prediction_type: int, x, out, alpha, sigma):
    """(x0, eps) from a network output, x_t = alpha * x0 + sigma * eps (diffusers' formulas; divisions by
    alpha or sigma are multiplications by the float32 reciprocal, as in csrc/math/step.h)."""
    alpha, sigma = F32(alpha), F32(sigma)
    if prediction_type == EPSILON:
        return (x - sigma * out) * (F32(1) / alpha), out
    if prediction_type == SAMPLE:
        return out, (x - alpha * out) * (F32(1) / sigma)
    return alpha * x - sigma * out, alpha * out + sigma * x


def predict_x0(x, model_output, alpha: float, sigma: float, prediction_type: str = "epsilon"):
    """x0 from a network output (the oracle of pydiff.ops.predict_x0), x_t = alpha x0 + sigma eps."""
    codes = {"epsilon": EPSILON, "sample": SAMPLE, "v_prediction": V_PREDICTION}
    code = codes[prediction_type] if isinstance(prediction_type, str) else int(prediction_type)
    x0, _ = predict_x0_eps(code, np.asarray(x, F32), np.asarray(model_output, F32), alpha, sigma)
    return np.asarray(x0, F32)


def quantile_rank(q: float, n: int):
    """(lo, hi, w): the rank q (n - 1) as torch.quantile computes it (float32 below 2^24 elements)."""
    if n - 1 < 2**24:
        rank = F32(q) * F32(n - 1)
        lo = int(rank)
        w = F32(rank - F32(lo))
    else:
        rank = float(F32(q)) * float(n - 1)
        lo = int(rank)
        w = F32(rank - lo)
    hi = min(lo + 1 if w > 0 else lo, n - 1)
    return lo, hi, w


def fma32(a, b, c) -> np.float32:
    """a * b + c rounded once to float32 (a fused multiply-add), for float32 a, b, c.

    a * b is exact in float64; the float64 sum is rounded once, and its exact error (TwoSum)
    settles the one case where rounding that to float32 again would differ: a float32 midpoint."""
    a, b, c = float(F32(a)), float(F32(b)), float(F32(c))
    p = a * b
    s = p + c
    c_in_s = s - p  # TwoSum (Knuth): e = (p + c) - s exactly
    p_in_s = s - c_in_s
    e = (p - p_in_s) + (c - c_in_s)
    r = F32(s)
    if e != 0.0 and float(r) != s:
        other = np.nextafter(r, F32(np.inf) if s > float(r) else F32(-np.inf))
        if s == (float(r) + float(other)) / 2:  # a midpoint: the exact sum is off it
            s = float(np.nextafter(s, np.inf if e > 0 else -np.inf))
            r = F32(s)
    return r


def torch_lerp(a, b, w):
    """torch.lerp's formula, the interpolation torch.quantile uses (multiply-add fused, as torch's
    compiled kernels have it)."""
    a, b, w = F32(a), F32(b), F32(w)
    return fma32(w, b - a, a) if w < F32(0.5) else fma32(-(b - a), F32(1) - w, b)


def abs_quantile(x: np.ndarray, q: float, max_value: float = 1.0, clamp: bool = False) -> np.ndarray:
    """Per-sample q-quantile of |x| (torch.quantile, linear), optionally clamped to [1, max_value]. x [B, ...] -> [B]."""
    flat = np.abs(x.reshape(x.shape[0], int(np.prod(x.shape[1:]))).astype(F32))
    out = np.empty(x.shape[0], F32)
    for b, row in enumerate(flat):
        srt = np.sort(row)
        lo, hi, w = quantile_rank(q, row.size)
        s = torch_lerp(srt[lo], srt[hi], w)
        out[b] = min(max(s, F32(1)), F32(max_value)) if clamp else s
    return out


def dynamic_threshold(x0: np.ndarray, ratio: float, sample_max_value: float):
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): (clip(x0, -s, s) / s, s [B])."""
    s = abs_quantile(x0, ratio, sample_max_value, clamp=True)
    sb = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return np.clip(x0, -sb, sb) * (F32(1) / sb), s


def _per_sample(v, like):
    v = np.asarray(v, F32)
    return v.reshape((-1,) + (1,) * (like.ndim - 1)) if v.ndim == 1 else v


def fused_step(
    x,
    model_output,
    params: dict,
    *,
    guided=False,
    guidance_scale=1.0,
    x0_prev=None,
    noise=None,
    x0_prev2=None,
    x0_prev3=None,
):
    """One denoising step exactly as the native fused step computes it.

    x [B, ...]; model_output [B, ...] or, when guided, [2B, ...] = [cond; uncond];
    params: the fields of pydiff._C.StepParams; noise: [B, ...] standard normals or None
    (then the in-kernel Philox stream (params seed, noise_step) is used when c_noise != 0).
    x0_prev2, x0_prev3: a deep step's older history values (params c_d2, c_d3, history_output).
    Returns (x_prev, x0 (or the guided output m when history_output: the step's history value), thresholds or None).
    """
    p = {k: (F32(v) if isinstance(v, float) else v) for k, v in params.items()}
    x = x.astype(F32)
    B = x.shape[0]
    m = model_output.astype(F32)
    if guided:
        m = cfg_mix(m[:B], m[B:], guidance_scale)
    x0, eps = predict_x0_eps(p["prediction_type"], x, m, p["alpha"], p["sigma"])
    s = None
    mode = p["threshold_mode"]
    if mode == STATIC_CLIP:
        x0 = np.clip(x0, -p["clip_range"], p["clip_range"]) * F32(1)
    elif mode == DYNAMIC:
        x0, s = dynamic_threshold(x0, p["dynamic_ratio"], p["sample_max_value"])
    if p["use_clipped_eps"] and mode != NO_THRESHOLD:
        eps = (x - F32(p["alpha"]) * x0) * (F32(1) / F32(p["sigma"]))
    # linear_update: terms with a zero coefficient add an exact +0.
    prev = x if x0_prev is None else x0_prev.astype(F32)  # c_d is 0 without history
    if p["c_noise"] != 0:
        z = noise if noise is not None else randn(p["seed"], p["noise_step"], x.size).reshape(x.shape)
    else:
        z = np.zeros_like(x)
    r = F32(p["c_x0"]) * x0 + F32(p["c_x"]) * x
    r = r + F32(p["c_eps"]) * eps
    c_d2, c_d3, hist_m = F32(p.get("c_d2", 0.0)), F32(p.get("c_d3", 0.0)), bool(p.get("history_output", 0))
    if c_d2 != 0 or c_d3 != 0 or hist_m:  # linear_update_deep
        h = m if hist_m else x0
        prev2 = x if x0_prev2 is None else x0_prev2.astype(F32)
        prev3 = x if x0_prev3 is None else x0_prev3.astype(F32)
        r = r + F32(p["c_d"]) * (h - prev)
        r = r + c_d2 * (prev - prev2)
        r = r + c_d3 * (prev2 - prev3)
        r = r + F32(p["c_noise"]) * z.astype(F32)
        return r.astype(F32), np.asarray(h, F32), s
    r = r + F32(p["c_d"]) * (x0 - prev)
    r = r + F32(p["c_noise"]) * z.astype(F32)
    return r.astype(F32), x0.astype(F32), s


_STEP_PARAMS_FIELDS = (
    "alpha",
    "sigma",
    "prediction_type",
    "threshold_mode",
    "clip_range",
    "dynamic_ratio",
    "sample_max_value",
    "use_clipped_eps",
    "c_x",
    "c_x0",
    "c_eps",
    "c_d",
    "c_noise",
    "seed",
    "noise_step",
    "c_d2",
    "c_d3",
    "history_output",
)


def _row_fields(row) -> dict:
    """The fields of one row: a dict as it is, a record of a STEP_PARAMS_DTYPE array, or a StepParams."""
    if isinstance(row, dict):
        return row
    if isinstance(row, np.void):
        return {k: row[k].item() for k in _STEP_PARAMS_FIELDS}
    return {k: getattr(row, k) for k in _STEP_PARAMS_FIELDS}


def fused_step_rows(x, model_output, params, *, guided=False, guidance_scale=1.0, x0_prev=None, noise=None):
    """fused_step with a step of its own per row, exactly as the native fused_step_rows computes it.

    Row b is fused_step on row b alone: x[b], its model output (the rows b and B + b when guided),
    params[b] (field dicts, StepParams or the records of a STEP_PARAMS_DTYPE array), its guidance scale
    (a number or [B]) and x0_prev[b] when its c_d != 0 (other rows do not read x0_prev). So its in-kernel
    noise is the stream (seed, noise_step) of params[b] numbered within the sample: elements 0 .. n - 1,
    whatever b is. noise: [B, ...] normals to use instead. Returns (x_prev [B, ...], x0 [B, ...],
    thresholds [B], NaN for the rows without dynamic thresholding).
    """
    x = np.asarray(x, F32)
    m = np.asarray(model_output, F32)
    B = x.shape[0]
    if len(params) != B:
        raise ValueError(f"params must hold {B} rows (one per row of x), got {len(params)}")
    scales = np.broadcast_to(np.asarray(guidance_scale, F32), (B,))
    x_prev, x0 = np.empty_like(x), np.empty_like(x)
    thresholds = np.full(B, np.nan, F32)
    for b in range(B):
        p = _row_fields(params[b])
        mo = np.concatenate([m[b : b + 1], m[B + b : B + b + 1]]) if guided else m[b : b + 1]
        history = x0_prev is not None and p["c_d"] != 0
        r, r_x0, s = fused_step(
            x[b : b + 1],
            mo,
            p,
            guided=guided,
            guidance_scale=scales[b],
            x0_prev=x0_prev[b : b + 1] if history else None,
            noise=None if noise is None else np.asarray(noise, F32)[b : b + 1],
        )
        x_prev[b], x0[b] = r[0], r_x0[0]
        if s is not None:
            thresholds[b] = s[0]
    return x_prev, x0, thresholds
