"""Guidance by separate models: the hook ``pydiff.sample(..., guidance_fn=...)``.

Classifier-free guidance stays in the fused kernel. Any other guidance is a callable
``guidance_fn(x_t, t) -> term`` called once per step on the current x_t [B, ...] and t [B]; a term is

- an array: a scaled gradient ``s * grad_x log p(y | x_t)`` (classifier guidance, Dhariwal &
  Nichol 2021; CLIP guidance with ``grad (f(x_t) . g(c))``, GLIDE). DDPM shifts its mean by
  ``Sigma * term`` (the lecture's Algorithm 1 of classifier guidance); DDIM and DPM-Solver++ use the
  score form ``eps <- eps - sqrt(1 - abar_t) * term`` (Dhariwal & Nichol, eq. 14);
- ``EpsCorrection(delta)``: added to the predicted eps as it is, by every sampler;
- a list of terms: their sum (several guidance terms in one step).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

GuidanceFn = Callable[[np.ndarray, np.ndarray], object]


@dataclasses.dataclass(frozen=True)
class EpsCorrection:
    """A correction added to the predicted eps (all samplers alike)."""

    delta: np.ndarray


def collect(terms, shape) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(gradient sum, eps-correction sum) of what a guidance_fn returned; None where absent."""
    if not isinstance(terms, (list, tuple)):
        terms = [terms]
    grad = eps = None
    for term in terms:
        if isinstance(term, EpsCorrection):
            d = _check(term.delta, shape, "EpsCorrection.delta")
            eps = d if eps is None else eps + d
        else:
            g = _check(term, shape, "guidance gradient")
            grad = g if grad is None else grad + g
    return grad, eps


def _check(a, shape, what) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise TypeError(f"{what} must be floating point, got {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contains NaN or Inf")
    return a.astype(np.float32, copy=False)


def eps_to_output_delta(
    delta_eps: np.ndarray, prediction_type: str, alpha: float, sigma: float
) -> np.ndarray:
    """The change of the network output that changes eps by delta_eps at fixed x_t
    (x_t = alpha x0 + sigma eps; v = alpha eps - sigma x0)."""
    if prediction_type == "epsilon":
        return delta_eps
    if prediction_type == "v_prediction":  # eps = alpha v + sigma x
        return (delta_eps / np.float32(alpha)).astype(np.float32)
    return (-np.float32(sigma / alpha) * delta_eps).astype(np.float32)  # sample: x0 = (x - sigma eps) / alpha


def combine(fns: Sequence[GuidanceFn]) -> GuidanceFn:
    """One guidance_fn from several: their terms are added in the same step."""
    return lambda x, t: [
        term for fn in fns for term in (lambda r: r if isinstance(r, (list, tuple)) else [r])(fn(x, t))
    ]


# -- classifier-free guidance in an interval (Kynkaanniemi et al. 2024) ---------------------------
# Guidance is applied only at steps whose noise level sigma = sqrt((1 - abar_t) / abar_t) (EDM's
# sigma, x_t / alpha = x0 + sigma eps) lies in (lo, hi]; the other steps run the conditional
# network alone, one pass instead of two. Their EDM2 ImageNet-512 interval is (0.28, 5.42].

FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_interval(value, what: str = "guidance_interval") -> tuple[float, float] | None:
    """None (guidance at every step; also for "all") or (lo, hi) with 0 <= lo < hi, finite in
    float32; else a TypeError / ValueError naming `what`."""
    if value is None or (isinstance(value, str) and value == "all"):
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)) or len(value) != 2:
        raise TypeError(f"{what}: expected a pair (sigma_lo, sigma_hi), 'all' or None, got {value!r}")
    lo, hi = value
    for name, v in (("sigma_lo", lo), ("sigma_hi", hi)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"{what}: {name} must be a number, got {v!r}")
        if not (np.isfinite(float(v)) and 0.0 <= float(v) <= FLOAT32_MAX):
            raise ValueError(f"{what}: {name} must be >= 0 and finite in float32, got {v!r}")
    lo, hi = float(lo), float(hi)
    if not lo < hi:
        raise ValueError(f"{what}: sigma_lo must be below sigma_hi, got ({lo}, {hi})")
    return lo, hi


def in_interval(interval: tuple[float, float] | None, alpha: float, sigma: float) -> bool:
    """Whether a step at x_t = alpha x0 + sigma eps is guided: its noise level sigma / alpha in (lo, hi]."""
    if interval is None:
        return True
    level = sigma / alpha if alpha > 0.0 else float("inf")
    return interval[0] < level <= interval[1]
