"""What every sampler shares: timesteps, thresholding settings, and driving the fused step."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pydiff import ops, reference
from pydiff.errors import NonFiniteError
from pydiff.schedules import Schedule, timesteps

THRESHOLD_KEYS = (
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "clip_sample",
    "clip_sample_range",
)


@dataclasses.dataclass
class StepCoefficients:
    """The scalars of one step (see csrc/include/pydiff/step_params.h), computed in float64."""

    t: int
    alpha: float
    sigma: float
    c_x: float = 0.0
    c_x0: float = 0.0
    c_eps: float = 0.0
    c_d: float = 0.0
    c_noise: float = 0.0
    c_d2: float = 0.0  # the older history terms: c_d2 (h_prev - h_prev2) + c_d3 (h_prev2 - h_prev3)
    c_d3: float = 0.0
    # The noise level the step moves x to: x_{t'} = alpha_next x0 + sigma_next eps (1, 0 at the end).
    alpha_next: float = 1.0
    sigma_next: float = 0.0


class Sampler:
    """A sampler over a schedule: ``timesteps``, then ``step`` once per timestep, in order.

    Multistep state (the previous x0) lives here; make a new sampler (or call ``reset``) for
    another run. ``backend="reference"`` runs the NumPy oracle instead of the native kernels.
    """

    name = "base"

    def __init__(
        self,
        schedule: Schedule,
        steps: int,
        *,
        use_clipped_model_output: bool = False,
        backend: str = "native",
        **threshold_overrides,
    ):
        unknown = set(threshold_overrides) - set(THRESHOLD_KEYS)
        if unknown:
            raise TypeError(f"unknown sampler option(s): {', '.join(sorted(unknown))}")
        if threshold_overrides:
            schedule = schedule.replace(**threshold_overrides)  # validated by Schedule
        if backend not in ("native", "reference"):
            raise ValueError(f"unknown backend {backend!r}; expected 'native' or 'reference'")
        self.schedule = schedule
        self.steps = steps
        self.timesteps = self.make_timesteps()
        self.use_clipped_model_output = bool(use_clipped_model_output)
        self.backend = backend
        self.alphas_cumprod = schedule.alphas_cumprod
        self.reset()

    def reset(self) -> None:
        self._history: list[np.ndarray] = []  # the kernel's history values of past steps, newest first
        self._spare: list[np.ndarray] = []  # native buffers to write the next one into

    # -- to be provided by each sampler
    def make_timesteps(self) -> np.ndarray:
        """The timesteps the network is evaluated at, one per step (set up any per-step tables here)."""
        return timesteps(self.schedule, self.steps, self.name)

    def coefficients(self, i: int, depth: int | None = None) -> StepCoefficients:
        """Step i's scalars, given `depth` previous history values (None: all of steps 0 .. i - 1)."""
        raise NotImplementedError

    uses_x0_history = False
    history_slots = 1  # how many past history values the update reads (x0_prev, x0_prev2, x0_prev3)
    history_output = False  # the history value is the guided network output, not x0 (PLMS)
    network_evals_per_step = 1

    def keeps_history(self, i: int) -> bool:
        """Whether step i's history value joins the history (PLMS drops its second evaluation's)."""
        return True

    # -- shared
    def _threshold_fields(self) -> dict:
        s = self.schedule
        if s.thresholding:
            mode = ops.DYNAMIC
        elif s.clip_sample:
            mode = ops.STATIC_CLIP
        else:
            mode = ops.NO_THRESHOLD
        return dict(
            threshold_mode=mode,
            clip_range=float(s.clip_sample_range),
            dynamic_ratio=float(s.dynamic_thresholding_ratio),
            sample_max_value=float(s.sample_max_value),
            use_clipped_eps=int(self.use_clipped_model_output),
        )

    def params(self, i: int, seed: int, noise_step: int | None = None, depth: int | None = None) -> dict:
        """The fields of the native StepParams for step i (noise stream (seed, noise_step), default i),
        with `depth` previous history values (None: a run from step 0)."""
        c = self.coefficients(i) if depth is None else self.coefficients(i, depth)
        extra = {k: getattr(c, k) for k in ("c_d2", "c_d3") if getattr(c, k) != 0.0}
        if self.history_output:
            extra["history_output"] = 1
        return dict(
            **extra,
            alpha=c.alpha,
            sigma=c.sigma,
            c_x=c.c_x,
            c_x0=c.c_x0,
            c_eps=c.c_eps,
            c_d=c.c_d,
            c_noise=c.c_noise,
            prediction_type=ops.PREDICTION_CODES[self.schedule.prediction_type],
            seed=int(seed) & (2**64 - 1),
            noise_step=(i if noise_step is None else int(noise_step)) & 0xFFFFFFFF,
            **self._threshold_fields(),
        )

    def step(
        self,
        model_output: np.ndarray,
        x: np.ndarray,
        i: int,
        *,
        guidance_scale=None,
        seed: int = 0,
        noise: np.ndarray | None = None,
        out: np.ndarray | None = None,
        noise_step: int | None = None,
    ) -> np.ndarray:
        """x_{t_{i+1}} from x_{t_i} and the network output at t_i.

        model_output [B, ...], or [2B, ...] = [cond; uncond] when guidance_scale is given.
        noise: standard normals [B, ...] to use instead of the in-kernel generator, whose stream is
        (seed, noise_step), noise_step defaulting to i.
        """
        hist = self._history if self.uses_x0_history else []
        fields = self.params(i, seed, noise_step, depth=len(hist) if self.uses_x0_history else None)
        c_noise = fields["c_noise"]
        if noise is not None:
            fields["c_noise"] = 0.0  # added below, last, exactly where the kernel would add it
        if not hist:
            fields["c_d"] = 0.0
        prevs = dict(zip(("x0_prev", "x0_prev2", "x0_prev3"), hist))
        if self.backend == "reference":
            res, x0, _ = reference.fused_step(
                x,
                model_output,
                fields,
                guided=guidance_scale is not None,
                guidance_scale=1.0 if guidance_scale is None else guidance_scale,
                **prevs,
            )
            bad = int(np.count_nonzero(~np.isfinite(res)))
            bad += int(np.count_nonzero(~np.isfinite(model_output)))
        else:
            x0 = None
            if self.uses_x0_history:
                while self._spare and self._spare[-1].shape != x.shape:
                    self._spare.pop()
                x0 = self._spare.pop() if self._spare else np.empty(x.shape, np.float32)
            res, bad = ops.fused_step(
                x,
                model_output,
                ops.step_params(**fields),
                guidance_scale=guidance_scale,
                x0_out=x0,
                out=out,
                **prevs,
            )
        if bad:
            where = (
                "the network's output"
                if not np.all(np.isfinite(model_output))
                else ("x_t" if not np.all(np.isfinite(x)) else "the update (overflow)")
            )
            raise NonFiniteError(f"{self.name} step {i} (t={int(self.timesteps[i])}): NaN or Inf in {where}")
        if noise is not None and c_noise != 0.0:
            res = (res + np.float32(c_noise) * np.asarray(noise, np.float32)).astype(np.float32, copy=False)
        if self.uses_x0_history and not self.keeps_history(i):
            self._spare.append(x0)
        elif self.uses_x0_history:
            self._history.insert(0, x0)
            while len(self._history) > self.history_slots:
                self._spare.append(self._history.pop())
        return res


def sqrt(v: float) -> float:
    return math.sqrt(max(v, 0.0))


def vp(s: float) -> tuple[float, float]:
    """(alpha, sigma) of x = alpha x0 + sigma eps at the noise level s = sigma / alpha.

    diffusers' Euler-family schedulers keep the sample X = x / alpha = x0 + s eps and feed the
    network X / sqrt(s^2 + 1) = x: pydiff steps x itself, so the network sees the same input.
    """
    s = float(s)
    alpha = 1.0 / math.sqrt(s * s + 1.0)
    return alpha, s * alpha
