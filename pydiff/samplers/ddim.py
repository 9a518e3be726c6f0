"""DDIM sampling."""

from __future__ import annotations

from pydiff.samplers.base import Sampler, StepCoefficients, sqrt


class DDIM(Sampler):
    """Implements eq. 12 of Song et al. (2021), "Denoising Diffusion Implicit Models", with eta, as diffusers' DDIMScheduler.

    x_{t'} = sqrt(abar_{t'}) x0 + sqrt(1 - abar_{t'} - s^2) eps + s z,
    s = eta sqrt((1 - abar_{t'}) / (1 - abar_t) (1 - abar_t / abar_{t'})), t' = t - T // steps.
    """

    name = "ddim"

    def __init__(self, schedule, steps, *, eta: float = 0.0, **kwargs):
        if not 0.0 <= float(eta) <= 1e6 or eta != eta:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        super().__init__(schedule, steps, **kwargs)
        if self.eta > 1.0:  # refuse now, not in the middle of a run
            for i in range(len(self.timesteps)):
                self.coefficients(i)

    def coefficients(self, i: int) -> StepCoefficients:
        abar = self.alphas_cumprod
        T = self.schedule.num_train_timesteps
        t = int(self.timesteps[i])
        prev = t - T // self.steps  # diffusers' rule, whatever the spacing
        a_t = abar[t]
        if prev >= 0:
            a_prev = abar[prev]
        else:
            a_prev = 1.0 if self.schedule.set_alpha_to_one else abar[0]
        variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
        std = self.eta * sqrt(variance)
        rest = 1.0 - a_prev - std * std
        if rest < -1e-12:  # eta > 1 can ask for more noise than x_{t'} has (diffusers: NaN)
            raise ValueError(
                f"eta={self.eta:g}: the noise (std {std:.4g}) exceeds what x_{{t'}} holds at "
                f"t={t} -> {prev}; eta <= 1 always fits"
            )
        return StepCoefficients(
            t=t,
            alpha=sqrt(a_t),
            sigma=sqrt(1.0 - a_t),
            c_x0=sqrt(a_prev),
            c_eps=sqrt(max(rest, 0.0)),
            c_noise=std if self.eta > 0 else 0.0,
            alpha_next=sqrt(a_prev),
            sigma_next=sqrt(1.0 - a_prev),
        )
