"""DDPM ancestral sampling."""

from __future__ import annotations

from pydiff.samplers.base import Sampler, StepCoefficients, sqrt


class DDPM(Sampler):
    """Implements Algorithm 2 (ancestral sampling) of Ho et al. (2020), on strided timesteps as diffusers' DDPMScheduler.

    x_{t'} = c0 x0 + c1 x_t + sigma z with the posterior q(x_{t'} | x_t, x0) of eq. 6-7 between
    consecutive visited timesteps t > t'; z is drawn only while t > 0.
    """

    name = "ddpm"

    def coefficients(self, i: int) -> StepCoefficients:
        ts, abar = self.timesteps, self.alphas_cumprod
        t = int(ts[i])
        prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        a_t = abar[t]
        a_prev = abar[prev] if prev >= 0 else 1.0
        beta_prod_t, beta_prod_prev = 1.0 - a_t, 1.0 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1.0 - cur_alpha
        if self.schedule.variance_type == "fixed_small":
            var = max(beta_prod_prev / beta_prod_t * cur_beta, 1e-20)
        else:  # fixed_large
            var = cur_beta
        return StepCoefficients(
            t=t,
            alpha=sqrt(a_t),
            sigma=sqrt(beta_prod_t),
            c_x0=sqrt(a_prev) * cur_beta / beta_prod_t,
            c_x=sqrt(cur_alpha) * beta_prod_prev / beta_prod_t,
            c_noise=sqrt(var) if t > 0 else 0.0,
            alpha_next=sqrt(a_prev),
            sigma_next=sqrt(beta_prod_prev),
        )
