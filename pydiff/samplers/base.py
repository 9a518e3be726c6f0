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
        self.timesteps = timesteps(schedule, steps, self.name)
        self.use_clipped_model_output = bool(use_clipped_model_output)
        self.backend = backend
        self.alphas_cumprod = schedule.alphas_cumprod
        self.reset()

    def reset(self) -> None:
        self._x0_prev: np.ndarray | None = None
        self._x0_next: np.ndarray | None = None

    # -- to be provided by each sampler
    def coefficients(self, i: int) -> StepCoefficients:
        raise NotImplementedError

    uses_x0_history = False

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

    def params(self, i: int, seed: int, noise_step: int | None = None) -> dict:
        """The fields of the native StepParams for step i (noise stream (seed, noise_step), default i)."""
        c = self.coefficients(i)
        return dict(
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
        fields = self.params(i, seed, noise_step)
        c_noise = fields["c_noise"]
        if noise is not None:
            fields["c_noise"] = 0.0  # added below, last, exactly where the kernel would add it
        history = self.uses_x0_history and self._x0_prev is not None
        if not history:
            fields["c_d"] = 0.0
        if self.backend == "reference":
            res, x0, _ = reference.fused_step(
                x,
                model_output,
                fields,
                guided=guidance_scale is not None,
                guidance_scale=1.0 if guidance_scale is None else guidance_scale,
                x0_prev=self._x0_prev if history else None,
            )
            bad = int(np.count_nonzero(~np.isfinite(res)))
            bad += int(np.count_nonzero(~np.isfinite(model_output)))
        else:
            x0 = None
            if self.uses_x0_history:
                if self._x0_next is None or self._x0_next.shape != x.shape:
                    self._x0_next = np.empty(x.shape, np.float32)
                x0 = self._x0_next
            res, bad = ops.fused_step(
                x,
                model_output,
                ops.step_params(**fields),
                guidance_scale=guidance_scale,
                x0_prev=self._x0_prev if history else None,
                x0_out=x0,
                out=out,
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
        if self.uses_x0_history:
            self._x0_next, self._x0_prev = self._x0_prev, x0
        return res


def sqrt(v: float) -> float:
    return math.sqrt(max(v, 0.0))
