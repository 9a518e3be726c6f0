"""``pydiff.sample``: the reverse process over any NumPy model, with the fused native step."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any, Callable

import numpy as np

from pydiff import guidance as _guidance
from pydiff import ops, reference
from pydiff.errors import CallbackError
from pydiff.samplers import NonFiniteError, make_sampler
from pydiff.schedules import Schedule


def random_seed() -> int:
    """A fresh seed for a run that gives none: 53 bits, exact in JSON readers that use doubles (jq,
    JavaScript), so that a reported seed remakes the run."""
    return secrets.randbits(53)


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
    """A network output as float32 [shape]: its dtype and shape checked, cast once, explicitly,
    here (never in the kernels). Its finiteness is the fused step's check, which names it."""
    if hasattr(out, "__dlpack__") and not isinstance(out, np.ndarray):
        out = np.from_dlpack(out)
    out = np.asarray(out)
    if out.dtype.kind != "f":
        raise TypeError(f"step {i} (t={t}): {what} returned dtype {out.dtype}; expected floating point")
    if out.shape != tuple(shape):
        raise ValueError(f"step {i} (t={t}): {what} returned shape {out.shape}; expected {tuple(shape)}")
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: Inf, which the step names
        return np.ascontiguousarray(out, dtype=np.float32)


def _from_function(out, shape, i: int, t: int, what: str, source: str) -> np.ndarray:
    """What a caller's function (callback, noise, guidance) returned, as a new float32 array of
    `shape`, finite in float32; else a CallbackError naming `what` and the step."""
    if hasattr(out, "__dlpack__") and not isinstance(out, np.ndarray):
        out = np.from_dlpack(out)
    out = np.asarray(out)
    if out.dtype.kind != "f":
        raise CallbackError(
            f"step {i} (t={t}): {what} returned dtype {out.dtype}; expected floating point", source
        )
    if out.shape != tuple(shape):
        raise CallbackError(
            f"step {i} (t={t}): {what} returned shape {out.shape}; expected {tuple(shape)}", source
        )
    # a float64 value beyond float32's range is Inf once cast: checked after the cast
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.array(out, dtype=np.float32, order="C", copy=True)
    _check_finite(out, i, t, f"{what} returned NaN or Inf (in float32)", source)
    return out


def _check_finite(a: np.ndarray, i: int, t: int, what: str, source: str) -> None:
    if not np.all(np.isfinite(a)):
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise CallbackError(f"step {i} (t={t}): {what} ({bad} of {a.size} values)", source)


def sample(
    model: Callable[..., Any],
    x_T,
    *,
    schedule: Schedule,
    sampler: str = "dpmpp_2m",
    steps: int = 25,
    eta: float = 0.0,
    guidance_scale=1.0,
    guidance_interval=None,
    cond=None,
    uncond=None,
    seed: int | None = None,
    noise: Callable[[int, tuple], np.ndarray] | None = None,
    callback: Callable[[int, int, np.ndarray], Any] | None = None,
    progress: bool = False,
    start_step: int = 0,
    batch_cond_uncond: bool = True,
    use_clipped_model_output: bool | None = None,
    guidance_fn: Callable[[np.ndarray, np.ndarray], Any] | None = None,
    backend: str = "native",
    **threshold_overrides,
) -> np.ndarray:
    """Run the reverse diffusion process from x_T [B, C, H, W] (or any [B, ...]) and return x_0 (float32).

    model: ``model(x_t, t)`` or, when ``cond`` is given, ``model(x_t, t, cond)``, on NumPy arrays;
    t is a float32 [B] array of training timesteps; it returns the schedule's prediction type.
    guidance_scale: classifier-free guidance scale s (diffusers' convention; the lecture's w = s - 1),
    a number or [B] per-sample scales; used when ``uncond`` is given. The model is then called once
    on the stacked batch [x; x], [t; t], [cond; uncond] (twice if ``batch_cond_uncond=False``).
    guidance_interval: (sigma_lo, sigma_hi) applies that guidance only at steps whose noise level
    sigma_t = sqrt((1 - abar_t) / abar_t) is in (sigma_lo, sigma_hi] (Kynkaanniemi et al. 2024); the
    other steps call the model on [x], [t], [cond] alone. None: every step.
    seed: key of the in-kernel noise (and nothing else); ``noise(i, shape)`` replaces it (floating
    point normals of that shape, finite in float32).
    callback(i, t, x) runs after step i; an array it returns replaces x (heun and pndm chain the
    evaluations within a step, so an x edited between them loses their order; floating point, x's
    shape, finite in float32; so must x be if the callback edits it in place). What a callback,
    ``noise`` or ``guidance_fn`` returns that breaks these rules is a `CallbackError` naming it.
    Arrays handed out are never written again: the model, the callback and guidance_fn may keep
    every x, t and cond they are given (cond is the same array at every step; pydiff only reads it).
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
    opts = SamplingOptions(
        schedule=schedule,
        sampler=sampler,
        steps=steps,
        eta=eta,
        guidance_scale=guidance_scale,
        guidance_interval=guidance_interval,
        cond=cond,
        uncond=uncond,
        seed=seed,
        callback=callback,
        progress=progress,
        batch_cond_uncond=batch_cond_uncond,
        use_clipped_model_output=use_clipped_model_output,
        guidance_fn=guidance_fn,
        backend=backend,
        threshold_overrides=threshold_overrides,
    )
    smp = opts.make_sampler()
    run = _Run(model, x_T, smp, opts)
    n_steps = len(smp.timesteps)
    if (
        isinstance(start_step, bool)
        or not isinstance(start_step, (int, np.integer))
        or not 0 <= start_step < n_steps
    ):
        raise ValueError(f"start_step must be an integer in [0, {n_steps - 1}], got {start_step!r}")

    def draw(i, x):
        if noise is None:
            return None
        t = int(smp.timesteps[i])
        return _from_function(noise(i, x.shape), x.shape, i, t, "the noise function", "noise")

    steps_plan = [("step", i) for i in range(start_step, n_steps)]
    return _loop(run, steps_plan, opts, desc=f"{sampler} sampling", noise=draw)


def repaint_schedule(steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[tuple]:
    """RePaint's resampling plan (Lugmayr et al. 2022, Sec. 4.2; diffusers' RePaintScheduler).

    A list of ``("step", i)`` (run sampler step i) and ``("jump", k, j)`` (re-noise x from the level
    after step k - 1 back to the level before step j = k - jump_length). Counting remaining steps,
    every ``jump_length`` steps (at 0, L, 2L, ... below ``steps - jump_length``) the last L steps
    are redone ``jump_n_sample - 1`` more times; ``jump_n_sample=1`` is plain replacement.
    """
    for name, v in (("steps", steps), ("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if jump_n_sample > 1 and jump_length >= steps:  # diffusers would silently not resample
        raise ValueError(
            f"jump_length {jump_length} must be less than steps {steps} to resample "
            f"(jump_n_sample {jump_n_sample}); shorten the jumps or use jump_n_sample=1"
        )
    jumps = {r: jump_n_sample - 1 for r in range(0, steps - jump_length, jump_length)}
    plan: list[tuple] = []
    done = 0  # steps completed in the current pass
    while done < steps:
        plan.append(("step", done))
        done += 1
        remaining = steps - done
        if jumps.get(remaining, 0) > 0:
            jumps[remaining] -= 1
            plan.append(("jump", done, done - jump_length))
            done -= jump_length
            # the steps just undone are taken again, and each is a jump target only once
    return plan


def check_repaint_sampler(smp) -> None:
    """RePaint edits x between steps; a sampler whose next evaluation takes x as the previous
    step left it (Heun's correction, PLMS's second evaluation) cannot run under it: ValueError."""
    if smp.network_evals_per_step > 1 or smp.history_output:
        raise ValueError(
            f"sampler {smp.name!r} cannot inpaint by RePaint: its evaluations within a step take x "
            f"as the previous one left it, and RePaint replaces the kept region in between; use "
            f"ddpm, ddim, dpmpp_2m, euler or euler_ancestral"
        )


def repaint(
    model: Callable[..., Any],
    x_T,
    image,
    mask,
    *,
    schedule: Schedule,
    sampler: str = "ddpm",
    steps: int = 25,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    eta: float = 0.0,
    guidance_scale=1.0,
    guidance_interval=None,
    cond=None,
    uncond=None,
    seed: int | None = None,
    callback: Callable[[int, int, np.ndarray], Any] | None = None,
    progress: bool = False,
    batch_cond_uncond: bool = True,
    use_clipped_model_output: bool | None = None,
    guidance_fn: Callable[[np.ndarray, np.ndarray], Any] | None = None,
    backend: str = "native",
    **threshold_overrides,
) -> np.ndarray:
    r"""Inpainting by RePaint (Lugmayr et al. 2022): regenerate where ``mask`` is 1, keep ``image``.

    After every step the kept region is replaced by ``image`` noised to the level x is now at (the
    exact ``image`` after the last step), and, per :func:`repaint_schedule`, the last
    ``jump_length`` steps are redone ``jump_n_sample - 1`` more times from x re-noised by the
    forward process, which lets the generated region settle into the kept one
    (``jump_n_sample=1``: plain replacement, one pass). Any sampler works; DPM-Solver++ restarts
    its multistep history (one first-order step) after each jump.

    image: float32 [B or 1, ...] in the network's space (x_T's shape but the batch); mask: [B or 1,
    1 or C, ...] in [0, 1] (float or bool), 1 = generate (a soft mask blends; diffusers' RePaint
    pipeline takes the opposite, 1 = keep). A jump re-noises by the exact q(x_{t_j} | x_{t_k}) in
    one draw (diffusers composes one-train-step betas). Other arguments as in
    :func:`sample`; ``callback(i, t, x)`` runs after every step (passes included), after the merge.
    Noise streams (seed, key): the step of pass-wide index c uses key c, the kept region's noise
    0x80000000 + c, the jump after it 0xC0000000 + c, all generated by the kernels' Philox.
    """
    for name in ("noise", "start_step"):
        if name in threshold_overrides:
            raise TypeError(
                f"repaint() does not take {name}: RePaint runs every step with its own noise streams"
            )
    opts = SamplingOptions(
        schedule=schedule,
        sampler=sampler,
        steps=steps,
        eta=eta,
        guidance_scale=guidance_scale,
        guidance_interval=guidance_interval,
        cond=cond,
        uncond=uncond,
        seed=seed,
        callback=callback,
        progress=progress,
        batch_cond_uncond=batch_cond_uncond,
        use_clipped_model_output=use_clipped_model_output,
        guidance_fn=guidance_fn,
        backend=backend,
        threshold_overrides=threshold_overrides,
    )
    smp = opts.make_sampler()
    check_repaint_sampler(smp)
    plan = repaint_schedule(len(smp.timesteps), jump_length, jump_n_sample)
    run = _Run(model, x_T, smp, opts)
    shape = run.x.shape
    known = _image_like(image, shape, "image")
    gen = _image_like(mask, shape, "mask", channels_may_be_one=True)
    if not np.all((gen >= 0) & (gen <= 1)):
        raise ValueError("mask values must be in [0, 1] (1 = generate, 0 = keep)")
    keep = (1.0 - gen).astype(np.float32)
    randn = reference.randn if backend == "reference" else None

    def diffuse(v, a: float, s: float, key: int) -> np.ndarray:
        """a v + s z, z the normals of noise stream (seed, key): a forward-process draw."""
        z = randn(run.seed, key, v.size).reshape(shape) if randn else ops.randn(shape, run.seed, key)
        return (np.float32(a) * v + np.float32(s) * z).astype(np.float32)

    def merge(x, i, c):
        """The kept region: the image noised to the level x is now at (exact after the last step)."""
        co = smp.coefficients(i)
        if i + 1 < len(smp.timesteps) and co.sigma_next > 0.0:
            noised = diffuse(known, co.alpha_next, co.sigma_next, 0x80000000 + c)
        else:
            noised = known
        return (keep * noised + gen * x).astype(np.float32)

    def jump(x, k, j, c):
        """Re-noise x from the level after step k - 1 to the level before step j: q(x_{t_j} | x_{t_k})."""
        ratio = min((smp.coefficients(j).alpha / smp.coefficients(k - 1).alpha_next) ** 2, 1.0)
        x = diffuse(x, ratio**0.5, (1.0 - ratio) ** 0.5, 0xC0000000 + c - 1)
        if smp.uses_x0_history:
            smp.reset()
        return x

    return _loop(run, plan, opts, desc=f"RePaint {sampler}", after_step=merge, on_jump=jump, count_steps=True)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """The settings `sample` and `repaint` share (their keyword arguments of the same names)."""

    schedule: Schedule
    sampler: str = "dpmpp_2m"
    steps: int = 25
    eta: float = 0.0
    guidance_scale: Any = 1.0
    guidance_interval: Any = None
    cond: Any = None
    uncond: Any = None
    seed: int | None = None
    callback: Callable[[int, int, np.ndarray], Any] | None = None
    progress: bool = False
    batch_cond_uncond: bool = True
    use_clipped_model_output: bool | None = None
    guidance_fn: Callable[[np.ndarray, np.ndarray], Any] | None = None
    backend: str = "native"
    threshold_overrides: dict = dataclasses.field(default_factory=dict)

    def make_sampler(self):
        # None: on with a guidance_fn (see sample's docstring), off otherwise (diffusers)
        clipped = (
            self.guidance_fn is not None
            if self.use_clipped_model_output is None
            else self.use_clipped_model_output
        )
        return make_sampler(
            self.sampler,
            self.schedule,
            self.steps,
            eta=self.eta,
            use_clipped_model_output=clipped,
            backend=self.backend,
            **self.threshold_overrides,
        )


def _loop(
    run: "_Run",
    plan: list[tuple],
    opts: SamplingOptions,
    *,
    desc: str,
    noise=None,
    after_step=None,
    on_jump=None,
    count_steps: bool = False,
) -> np.ndarray:
    """The one step loop: ("step", i) runs sampler step i, ("jump", k, j) hands x to `on_jump`.

    Step ops are counted c = 0, 1, ...; with `count_steps` the c-th step draws the noise stream
    of key c (RePaint's passes), else of key i. `after_step(x, i, c)` edits x after a step, before
    the callback; `noise(i, x)` gives a step's own normals (or None)."""
    smp, x, callback = run.smp, run.x, opts.callback
    bar = None
    if opts.progress:
        from tqdm.auto import tqdm  # lazily: only with progress=True, so `import pydiff` stays light

        bar = tqdm(total=sum(op[0] == "step" for op in plan), desc=desc, unit="step")
    c = 0
    try:
        for op in plan:
            if op[0] == "jump":
                x = on_jump(x, op[1], op[2], c)
                continue
            i = op[1]
            z = noise(i, x) if noise is not None else None
            x = run.step(x, i, noise=z, noise_step=c if count_steps else None)
            if after_step is not None:
                x = after_step(x, i, c)
            c += 1
            if bar is not None:
                bar.update(1)
            if callback is not None:
                t = int(smp.timesteps[i])
                r = callback(i, t, x)
                if r is not None:
                    x = _from_function(r, x.shape, i, t, "the callback", "callback")
                else:  # x as the callback may have left it, edited in place
                    _check_finite(x, i, t, "the callback left NaN or Inf in x", "callback")
    finally:
        if bar is not None:
            bar.close()
    return x


def _image_like(a, shape, what: str, channels_may_be_one: bool = False) -> np.ndarray:
    """A float32 array broadcastable to `shape` from batch 1 or B (and channels 1, for masks)."""
    if len(shape) < 2:
        raise ValueError(f"repaint needs x_T of shape [B, C, ...], got {tuple(shape)}")
    if hasattr(a, "__dlpack__") and not isinstance(a, np.ndarray):
        a = np.from_dlpack(a)
    a = np.asarray(a)
    if a.dtype == np.bool_ and channels_may_be_one:
        a = a.astype(np.float32)
    if a.dtype.kind != "f":
        raise TypeError(
            f"{what} must be floating point{' or bool' if channels_may_be_one else ''}, got {a.dtype}"
        )
    ok = (
        a.ndim == len(shape)
        and a.shape[0] in (1, shape[0])
        and a.shape[2:] == tuple(shape[2:])
        and (a.shape[1] == shape[1] or (channels_may_be_one and a.shape[1] == 1))
    )
    if not ok:
        allowed = "1 or C" if channels_may_be_one else "C"
        raise ValueError(
            f"{what} must have shape [1 or B, {allowed}, ...] matching x_T {tuple(shape)}, got {a.shape}"
        )
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contains NaN or Inf")
    return np.broadcast_to(a.astype(np.float32, copy=False), shape)


class _Run:
    """The validated inputs of one sampling run and its denoising step: the network call (one
    stacked call for classifier-free guidance), guidance models, then the fused step."""

    def __init__(self, model, x_T, smp, opts: SamplingOptions):
        guidance_scale, cond, uncond, seed = opts.guidance_scale, opts.cond, opts.uncond, opts.seed
        batch_cond_uncond, guidance_fn = opts.batch_cond_uncond, opts.guidance_fn
        if hasattr(x_T, "__dlpack__") and not isinstance(x_T, np.ndarray):
            x_T = np.from_dlpack(x_T)
        x = np.asarray(x_T)
        if x.dtype != np.float32:
            raise TypeError(f"x_T must be float32, got {x.dtype}")
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"x_T must have a non-empty batch dimension, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("x_T contains NaN or Inf")
        self.x = np.array(x, np.float32, order="C", copy=True)
        B = x.shape[0]
        self.guided = uncond is not None and not (
            np.ndim(guidance_scale) == 0 and float(guidance_scale) == 1.0
        )
        if np.ndim(guidance_scale) == 0:
            if not np.isfinite(float(guidance_scale)):
                raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
            self.scale = float(guidance_scale)
        else:
            self.scale = np.ascontiguousarray(guidance_scale, dtype=np.float32)
            if self.scale.shape != (B,):
                raise ValueError(f"per-sample guidance_scale must have shape ({B},), got {self.scale.shape}")
            if not np.all(np.isfinite(self.scale)):
                raise ValueError("guidance_scale contains NaN or Inf")
        if cond is not None:
            _check_batch(cond, B, "cond")
        if uncond is not None:
            if cond is None:
                raise ValueError("uncond needs cond: classifier-free guidance mixes the two")
            _check_batch(uncond, B, "uncond")
        self.model, self.smp, self.cond, self.uncond = model, smp, cond, uncond
        self.batch_cond_uncond, self.guidance_fn = batch_cond_uncond, guidance_fn
        self.both = _stack(cond, uncond) if self.guided and batch_cond_uncond else None
        self.interval = _guidance.check_interval(opts.guidance_interval)
        if seed is None:
            seed = random_seed()
        self.seed = seed
        # No buffer is reused across steps: a model or callback may keep any array it was handed
        # (one allocation of x per step is noise beside a network call).

    def guided_at(self, i: int) -> bool:
        """Whether step i mixes the conditional and unconditional outputs (its interval's test)."""
        if not self.guided or self.interval is None:  # no interval: no per-step work
            return self.guided
        c = self.smp.coefficients(i)
        return _guidance.in_interval(self.interval, c.alpha, c.sigma)

    def _call(self, xb, tb, c):
        return self.model(xb, tb) if c is None else self.model(xb, tb, c)

    def step(
        self, x: np.ndarray, i: int, noise: np.ndarray | None = None, noise_step: int | None = None
    ) -> np.ndarray:
        """x after step i of the sampler (the network evaluated at its timestep t_i)."""
        smp, B = self.smp, x.shape[0]
        t = int(smp.timesteps[i])
        tn = smp.timesteps[i]  # the network's timestep: fractional for the Euler family's sigmas
        guided = self.guided_at(i)
        if guided:
            if self.batch_cond_uncond:
                x2 = np.concatenate([x, x])
                out = _as_output(self._call(x2, np.full(2 * B, tn, np.float32), self.both), x2.shape, i, t)
            else:
                tt = np.full(B, tn, np.float32)
                oc = _as_output(self._call(x, tt, self.cond), x.shape, i, t)
                ou = _as_output(self._call(x, tt, self.uncond), x.shape, i, t)
                out = np.concatenate([oc, ou])
        else:
            out = _as_output(self._call(x, np.full(B, tn, np.float32), self.cond), x.shape, i, t)
        mean_shift = None
        if self.guidance_fn is not None:
            out, mean_shift = _apply_guidance(self.guidance_fn, smp, i, t, x, out)
        new = smp.step(
            out,
            x,
            i,
            guidance_scale=self.scale if guided else None,
            seed=self.seed,
            noise=noise,
            noise_step=noise_step,
        )
        if mean_shift is not None:
            new += mean_shift
            _check_finite(
                new, i, t, "x overflows float32 after the guidance function's mean shift", "guidance_fn"
            )
        elif noise is not None:
            _check_finite(new, i, t, "x overflows float32 with the noise function's normals", "noise")
        return new


def _apply_guidance(guidance_fn, smp, i: int, t: int, x: np.ndarray, out: np.ndarray):
    """(network output with the eps-form terms folded in, DDPM mean shift or None)."""
    # collect checks each term's dtype, shape and finiteness (in its own dtype); float32 below
    grad, eps = _guidance.collect(guidance_fn(x, np.full(x.shape[0], smp.timesteps[i], np.float32)), x.shape)
    what = "the guidance function's terms overflow float32"
    c = smp.coefficients(i)
    mean_shift = None
    with np.errstate(over="ignore", invalid="ignore"):
        if grad is not None:
            _check_finite(grad, i, t, what, "guidance_fn")
            if smp.name == "ddpm":  # mu <- mu + Sigma * grad, Sigma the step's variance (zero at t = 0)
                mean_shift = (np.float32(c.c_noise**2) * grad).astype(np.float32)
                _check_finite(mean_shift, i, t, what, "guidance_fn")
            else:  # score form: eps <- eps - sqrt(1 - abar_t) * grad
                d = (-np.float32(c.sigma) * grad).astype(np.float32)
                eps = d if eps is None else eps + d
        if eps is not None:
            _check_finite(eps, i, t, what, "guidance_fn")
            delta = _guidance.eps_to_output_delta(eps, smp.schedule.prediction_type, c.alpha, c.sigma)
            # Both halves of a guided batch move alike, so the CFG mix moves eps by exactly delta.
            reps = out.shape[0] // x.shape[0]
            if np.all(np.isfinite(out)):  # else the step names the network's output
                out = out + (np.concatenate([delta] * reps) if reps > 1 else delta)
                _check_finite(
                    out,
                    i,
                    t,
                    "the guidance function's correction overflows float32 beside the network's output",
                    "guidance_fn",
                )
    return out, mean_shift


__all__ = [
    "sample",
    "repaint",
    "repaint_schedule",
    "SamplingOptions",
    "NonFiniteError",
    "CallbackError",
    "random_seed",
]
