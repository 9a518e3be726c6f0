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
