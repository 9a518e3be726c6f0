"""``pydiff.sample``: the reverse process over any NumPy model, with the fused native step."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pydiff import guidance as _guidance
from pydiff.samplers import NonFiniteError, make_sampler
from pydiff.schedules import Schedule


def _stack(cond, uncond, name="cond"):
    """[cond; uncond] along the batch axis, per key for dicts."""
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or set(cond) != set(uncond):
            raise ValueError("cond and uncond must be dicts with the same keys")
        return {k: np.concatenate([np.asarray(cond[k]), np.asarray(uncond[k])]) for k in cond}
    return np.concatenate([np.asarray(cond), np.asarray(uncond)])


def _check_batch(c, B: int, name: str):
    items = c.items() if isinstance(c, dict) else [(None, c)]
    for k, v in items:
        v = np.asarray(v)
        if v.ndim == 0 or v.shape[0] != B:
            label = f"{name}[{k!r}]" if k is not None else name
            raise ValueError(f"{label} must have batch size {B} (the batch of x_T), got shape {v.shape}")


def _as_output(out, shape, i: int, t: int, what: str = "the model") -> np.ndarray:
    if hasattr(out, "__dlpack__") and not isinstance(out, np.ndarray):
        out = np.from_dlpack(out)
    out = np.asarray(out)
    if out.dtype.kind != "f":
        raise TypeError(f"step {i} (t={t}): {what} returned dtype {out.dtype}; expected floating point")
    if out.shape != tuple(shape):
        raise ValueError(f"step {i} (t={t}): {what} returned shape {out.shape}; expected {tuple(shape)}")
    # Model outputs may be float16/float64: cast once, explicitly, here (never in the kernels).
    return np.ascontiguousarray(out, dtype=np.float32)


def sample(model: Callable[..., Any], x_T, *, schedule: Schedule, sampler: str = "dpmpp_2m", steps: int = 25,
           eta: float = 0.0, guidance_scale=1.0, cond=None, uncond=None, seed: int | None = None,
           noise: Callable[[int, tuple], np.ndarray] | None = None,
           callback: Callable[[int, int, np.ndarray], Any] | None = None, progress: bool = False,
           start_step: int = 0, batch_cond_uncond: bool = True, use_clipped_model_output: bool | None = None,
           guidance_fn: Callable[[np.ndarray, np.ndarray], Any] | None = None,
           backend: str = "native", **threshold_overrides) -> np.ndarray:
    """Run the reverse diffusion process from x_T [B, C, H, W] (or any [B, ...]) and return x_0 (float32).

    model: ``model(x_t, t)`` or, when ``cond`` is given, ``model(x_t, t, cond)``, on NumPy arrays;
    t is a float32 [B] array of training timesteps; it returns the schedule's prediction type.
    guidance_scale: classifier-free guidance scale s (diffusers' convention; the lecture's w = s - 1),
    a number or [B] per-sample scales; used when ``uncond`` is given. The model is then called once
    on the stacked batch [x; x], [t; t], [cond; uncond] (twice if ``batch_cond_uncond=False``).
    seed: key of the in-kernel noise (and nothing else); ``noise(i, shape)`` replaces it.
    callback(i, t, x) runs after step i; an array it returns replaces x (RePaint-style editing).
    start_step: skip the first timesteps (SDEdit / img2img starts part-way).
    guidance_fn(x_t, t): guidance by separate models (classifier, CLIP, your own), see pydiff.guidance:
    it returns a scaled gradient of log p(y | x_t), an EpsCorrection, or a list of them.
    use_clipped_model_output: re-derive eps from the thresholded x0 (DDIM, DPM-Solver++). Guidance
    is added to eps before the threshold (as classifier-free guidance; guided-diffusion clips first
    and adds the guidance after). None: on with a guidance_fn (a guided eps beside a clipped x0 undoes the guidance: digits, DDIM + dynamic
    thresholding, classifier scale 5: accuracy 0.11 without, 0.70 with), off otherwise (diffusers).
    threshold_overrides: thresholding, dynamic_thresholding_ratio, sample_max_value, clip_sample,
    clip_sample_range (diffusers' meaning), overriding the schedule's.
    """
    if use_clipped_model_output is None:
        use_clipped_model_output = guidance_fn is not None
    smp = make_sampler(sampler, schedule, steps, eta=eta, use_clipped_model_output=use_clipped_model_output,
                       backend=backend, **threshold_overrides)
    if hasattr(x_T, "__dlpack__") and not isinstance(x_T, np.ndarray):
        x_T = np.from_dlpack(x_T)
    x = np.asarray(x_T)
    if x.dtype != np.float32:
        raise TypeError(f"x_T must be float32, got {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x_T must have a non-empty batch dimension, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x_T contains NaN or Inf")
    x = np.array(x, np.float32, order="C", copy=True)
    B = x.shape[0]
    n_steps = len(smp.timesteps)
    if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) or not 0 <= start_step < n_steps:
        raise ValueError(f"start_step must be an integer in [0, {n_steps - 1}], got {start_step!r}")

    guided = uncond is not None and not (np.ndim(guidance_scale) == 0 and float(guidance_scale) == 1.0)
    if np.ndim(guidance_scale) == 0:
        if not np.isfinite(float(guidance_scale)):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        scale = float(guidance_scale)
    else:
        scale = np.ascontiguousarray(guidance_scale, dtype=np.float32)
        if scale.shape != (B,):
            raise ValueError(f"per-sample guidance_scale must have shape ({B},), got {scale.shape}")
        if not np.all(np.isfinite(scale)):
            raise ValueError("guidance_scale contains NaN or Inf")
    if cond is not None:
        _check_batch(cond, B, "cond")
    if uncond is not None:
        if cond is None:
            raise ValueError("uncond needs cond: classifier-free guidance mixes the two")
        _check_batch(uncond, B, "uncond")
    both = _stack(cond, uncond) if guided and batch_cond_uncond else None
    if seed is None:
        seed = int(np.random.SeedSequence().entropy) & (2**64 - 1)

    def call(xb, tb, c):
        return model(xb, tb) if c is None else model(xb, tb, c)

    # Preallocated buffers: the doubled network input, and two x buffers used in turn (only when
    # no callback could keep a reference to x).
    x2 = np.empty((2 * B,) + x.shape[1:], np.float32) if guided and batch_cond_uncond else None
    spare = np.empty_like(x) if callback is None else None
    steps_iter = range(start_step, n_steps)
    if progress:
        from tqdm.auto import tqdm

        steps_iter = tqdm(steps_iter, desc=f"{sampler} sampling", unit="step")
    for i in steps_iter:
        t = int(smp.timesteps[i])
        if guided:
            if batch_cond_uncond:
                x2[:B] = x
                x2[B:] = x
                out = _as_output(call(x2, np.full(2 * B, t, np.float32), both), x2.shape, i, t)
            else:
                tt = np.full(B, t, np.float32)
                oc = _as_output(call(x, tt, cond), x.shape, i, t)
                ou = _as_output(call(x, tt, uncond), x.shape, i, t)
                out = np.concatenate([oc, ou])
        else:
            out = _as_output(call(x, np.full(B, t, np.float32), cond), x.shape, i, t)
        z = None
        if noise is not None:
            z = np.asarray(noise(i, x.shape), dtype=np.float32)
            if z.shape != x.shape:
                raise ValueError(f"noise({i}, shape) returned shape {z.shape}; expected {x.shape}")
        mean_shift = None
        if guidance_fn is not None:
            out, mean_shift = _apply_guidance(guidance_fn, smp, i, t, x, out)
        new = smp.step(out, x, i, guidance_scale=scale if guided else None, seed=seed, noise=z, out=spare)
        if mean_shift is not None:
            new += mean_shift
        if spare is not None:
            spare, x = x, new
        else:
            x = new
        if callback is not None:
            r = callback(i, t, x)
            if r is not None:
                x = np.array(_as_output(r, x.shape, i, t, "callback"), copy=True)
    return x


def _apply_guidance(guidance_fn, smp, i: int, t: int, x: np.ndarray, out: np.ndarray):
    """(network output with the eps-form terms folded in, DDPM mean shift or None)."""
    grad, eps = _guidance.collect(guidance_fn(x, np.full(x.shape[0], t, np.float32)), x.shape)
    c = smp.coefficients(i)
    mean_shift = None
    if grad is not None:
        if smp.name == "ddpm":  # mu <- mu + Sigma * grad, Sigma the step's variance (zero at t = 0)
            mean_shift = (np.float32(c.c_noise**2) * grad).astype(np.float32)
        else:  # score form: eps <- eps - sqrt(1 - abar_t) * grad
            d = (-np.float32(c.sigma) * grad).astype(np.float32)
            eps = d if eps is None else eps + d
    if eps is not None:
        delta = _guidance.eps_to_output_delta(eps, smp.schedule.prediction_type, c.alpha, c.sigma)
        # Both halves of a guided batch move alike, so the CFG mix moves eps by exactly delta.
        reps = out.shape[0] // x.shape[0]
        out = out + (np.concatenate([delta] * reps) if reps > 1 else delta)
    return out, mean_shift


__all__ = ["sample", "NonFiniteError"]
