"""Typed wrappers over the native step kernels (pydiff._C), with shapes in the docstrings.

Arrays are float32 and C-contiguous: NumPy arrays, or anything that exports DLPack on the CPU
(a torch CPU tensor, say), taken zero-copy. Nothing is cast: a wrong dtype is a TypeError, a wrong
shape or layout a ValueError, each naming the argument. Results go into ``out=`` when given.
The NumPy oracles with the same names live in pydiff.reference.
"""

from __future__ import annotations

import os

import numpy as np

from pydiff import cuda
from pydiff.step_params import PredictionType, Thresholding

# How long idle OpenMP threads spin before they sleep. libgomp's default (300,000 spins) made a
# 2-thread (16,3,64,64) step take 5-28 ms instead of 0.2-0.35 ms on this project's 2-vCPU VMs, quiet
# or busy (a spinning vCPU is descheduled by the hypervisor, and spinning fights the network's own
# thread pool); sleeping at once (OMP_WAIT_POLICY=PASSIVE) lost all the speedup of a second thread.
# A short spin keeps both (benchmarks/README). Set OMP_WAIT_POLICY or GOMP_SPINCOUNT to choose.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"

_IMPORT_ERROR: ImportError | None = None
try:
    from pydiff import _C
except ImportError as e:  # pragma: no cover - only without a build
    _C = None
    _IMPORT_ERROR = e

# StepParams as a NumPy structured dtype (its fields at the struct's offsets): fused_step_rows' table.
STEP_PARAMS_DTYPE = None if _C is None else _C.STEP_PARAMS_DTYPE

EPSILON, SAMPLE, V_PREDICTION = PredictionType
NO_THRESHOLD, STATIC_CLIP, DYNAMIC = Thresholding
PREDICTION_CODES = {p.setting: p for p in PredictionType}


def native_available() -> bool:
    """Whether the compiled CPU kernels are importable."""
    return _C is not None


def cuda_available() -> bool:
    """Whether the CUDA twin is built and a GPU is visible (asks the CUDA runtime; see pydiff.cuda)."""
    return cuda.available()


def _native():
    if _C is None:
        raise ImportError(f"pydiff's native module is not built: {_IMPORT_ERROR or 'not loaded'}")
    return _C


def as_array(obj, name: str) -> np.ndarray:
    """A NumPy view of obj: an ndarray as is, a DLPack CPU tensor zero-copy; anything else is a TypeError."""
    if isinstance(obj, np.ndarray):
        return obj
    if hasattr(obj, "__dlpack__"):
        try:
            return np.from_dlpack(obj)
        except (RuntimeError, BufferError, TypeError) as e:
            raise TypeError(
                f"{name}: cannot view this {type(obj).__name__} on the CPU via DLPack ({e})"
            ) from None
    raise TypeError(
        f"{name} must be a float32 numpy.ndarray or a DLPack CPU tensor, got {type(obj).__name__}"
    )


def _out(out, like: np.ndarray, shape=None) -> np.ndarray:
    if out is None:
        return np.empty(like.shape if shape is None else shape, np.float32)
    return as_array(out, "out")


def _scales(scale):
    """(scalar, per-sample array or None) from a guidance scale given as a number or [B] values."""
    if np.ndim(scale) == 0:
        s = float(scale)
        if not np.isfinite(s):
            raise ValueError(f"guidance scale must be finite, got {s}")
        return s, None
    arr = (
        as_array(scale, "guidance_scale")
        if not isinstance(scale, (list, tuple))
        else np.asarray(scale, np.float32)
    )
    if not np.all(np.isfinite(arr)):
        raise ValueError("guidance scales must be finite")
    return 1.0, arr


def set_num_threads(n: int) -> None:
    """Threads the CPU kernels use: 1 to MAX_NUM_THREADS (1024), or 0 for OpenMP's default
    (OMP_NUM_THREADS or the core count, capped likewise). Anything else is a ValueError."""
    _native().set_num_threads(int(n))


def get_num_threads() -> int:
    return _native().get_num_threads()


def cfg_mix(cond, uncond, scale=1.0, *, out=None) -> np.ndarray:
    """Classifier-free guidance: uncond + scale * (cond - uncond). cond, uncond [B, ...]; scale a number or [B]."""
    cond, uncond = as_array(cond, "cond"), as_array(uncond, "uncond")
    s, scales = _scales(scale)
    res = _out(out, cond)
    _native().cfg_mix(cond, uncond, res, s, scales)
    return res


def abs_quantile(x, q: float, *, out=None) -> np.ndarray:
    """Per-sample q-quantile of |x|, exactly torch.quantile(|x|.flatten(1), q, dim=1) (linear). x [B, ...] -> [B]."""
    x = as_array(x, "x")
    res = _out(out, x, (x.shape[0],) if x.ndim else ())
    _native().abs_quantile(x, res, float(q), 1.0, False)
    return res


def dynamic_threshold(x0, ratio: float = 0.995, sample_max_value: float = 1.0, *, out=None):
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3), as diffusers' ``_threshold_sample``.

    s = clamp(quantile(|x0|, ratio), 1, sample_max_value) per sample; returns
    (clip(x0, -s, s) / s  [B, ...], s  [B]).
    """
    x0 = as_array(x0, "x0")
    res = _out(out, x0)
    s = np.empty(x0.shape[0] if x0.ndim else 0, np.float32)
    p = step_params(
        threshold_mode=DYNAMIC,
        dynamic_ratio=ratio,
        sample_max_value=sample_max_value,
        prediction_type=SAMPLE,
        alpha=1.0,
        sigma=1.0,
        c_x0=1.0,
    )
    _native().fused_step(x0, x0, res, p, thresholds=s)
    return res, s


def predict_x0(x, model_output, alpha: float, sigma: float, prediction_type: str = "epsilon", *, out=None):
    """x0 from a network output, with x_t = alpha x0 + sigma eps (alpha = sqrt(abar_t)). x, model_output [B, ...]."""
    x, mo = as_array(x, "x"), as_array(model_output, "model_output")
    res = _out(out, x)
    p = step_params(prediction_type=_prediction_code(prediction_type), alpha=alpha, sigma=sigma, c_x0=1.0)
    _native().fused_step(x, mo, res, p)
    return res


def randn(shape, seed: int, step: int = 0, *, offset: int = 0, out=None) -> np.ndarray:
    """Standard normals of the in-kernel noise stream (seed, step): Philox4x32-10 + Box-Muller.

    Element e (C order) is the same whatever the thread count, offset or device. seed: an integer in
    [0, 2**64); step in [0, 2**32); offset >= 0 with offset + count <= 2**63 - 4 (else a ValueError).
    """
    res = np.empty(shape, np.float32) if out is None else as_array(out, "out")
    _native().randn(res, seed, step, offset)
    return res


def _prediction_code(prediction_type) -> int:
    if isinstance(prediction_type, str):
        if prediction_type not in PREDICTION_CODES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_CODES)}"
            )
        return PREDICTION_CODES[prediction_type]
    return int(prediction_type)


def step_params(**fields):
    """A pydiff._C.StepParams with the given fields (the rest: identity update, no threshold)."""
    p = _native().StepParams()
    for k, v in fields.items():
        setattr(p, k, v)
    return p


def fused_step(
    x,
    model_output,
    params,
    *,
    guidance_scale=None,
    x0_prev=None,
    x0_out=None,
    thresholds=None,
    out=None,
    x0_prev2=None,
    x0_prev3=None,
) -> tuple[np.ndarray, int]:
    """One fused denoising step (guidance mix, conversion, thresholding, update, noise).

    x [B, ...]; model_output [B, ...], or [2B, ...] = [cond; uncond] when guidance_scale is given
    (a number or [B]); x0_prev/x0_out [B, ...] for multistep solvers (x0_out receives the step's
    history value: x0, or the guided network output when params.history_output), x0_prev2/x0_prev3 [B, ...] the older history
    of a deep step (params c_d2, c_d3; see csrc/include/pydiff/step_params.h); thresholds [B] receives the
    dynamic threshold. Returns (x_prev [B, ...], number of non-finite inputs/outputs). A NaN in a
    sample's x0 makes its dynamic threshold differ from torch.quantile's NaN (it counts in the
    sample's size but is never selected); the returned count says it is there, and pydiff.sample
    raises NonFiniteError on it.
    """
    deep = {k: as_array(v, k) for k, v in (("x0_prev2", x0_prev2), ("x0_prev3", x0_prev3)) if v is not None}
    return _step(
        _native().fused_step,
        x,
        model_output,
        params,
        guidance_scale,
        x0_prev,
        x0_out,
        thresholds,
        out,
        **deep,
    )


def _step(op, x, model_output, params, guidance_scale, x0_prev, x0_out, thresholds, out, **deep):
    """fused_step's and fused_step_rows' shared call: arrays viewed, out made, scales split."""
    x, mo = as_array(x, "x"), as_array(model_output, "model_output")
    res = _out(out, x)
    guided = guidance_scale is not None
    s, scales = _scales(guidance_scale if guided else 1.0)
    bad = op(
        x,
        mo,
        res,
        params,
        guided=guided,
        guidance_scale=s,
        scales=scales,
        x0_prev=None if x0_prev is None else as_array(x0_prev, "x0_prev"),
        x0_out=None if x0_out is None else as_array(x0_out, "x0_out"),
        thresholds=None if thresholds is None else as_array(thresholds, "thresholds"),
        **deep,
    )
    return res, bad


def step_params_table(rows) -> np.ndarray:
    """fused_step_rows' table: a [B] array of STEP_PARAMS_DTYPE from B pydiff._C.StepParams or field
    dicts (step_params' keywords), each row checked as fused_step checks its params. Its columns are
    the fields by name (``table["c_noise"][b]``), to fill in place from one step to the next."""
    native = _native()
    params = []
    for b, r in enumerate(rows):
        try:
            p = r if isinstance(r, native.StepParams) else step_params(**r)
            native.validate_step_params(p)
        except (TypeError, ValueError) as e:
            raise type(e)(f"params[{b}]: {e}") from None
        params.append(p)
    return np.frombuffer(native.pack_step_params(params), STEP_PARAMS_DTYPE).copy()


def fused_step_rows(
    x, model_output, params, *, guidance_scale=None, x0_prev=None, x0_out=None, thresholds=None, out=None
) -> tuple[np.ndarray, int]:
    """fused_step with every row at a step of its own (step-level batching across requests).

    x [B, ...]; model_output [B, ...], or [2B, ...] = [cond; uncond] when guidance_scale is given (a
    number or [B]); params: B pydiff._C.StepParams or a [B] STEP_PARAMS_DTYPE array (step_params_table),
    row b's coefficients, prediction type, thresholding and noise key. Row b's noise is element i of the
    stream (params[b].seed, params[b].noise_step) for element i of the sample, so row b's result is
    fused_step's on row b alone (x0_prev given when its c_d != 0), bit for bit, at any position and beside
    any neighbours. x0_prev [B, ...] is read only for the rows with c_d != 0; x0_out [B, ...]; thresholds
    [B] receives the dynamic threshold of the rows with dynamic thresholding (the others are left as
    they are). Returns (x_prev [B, ...], number of non-finite inputs/outputs).
    """
    return _step(
        _native().fused_step_rows, x, model_output, params, guidance_scale, x0_prev, x0_out, thresholds, out
    )
