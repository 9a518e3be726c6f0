"""The guidance_fn hook: classifier guidance with the exact classifier of a Gaussian mixture equals
classifier-free guidance on the exact conditional/unconditional predictions (score form), and the
DDPM mean-shift form raises class purity."""

from __future__ import annotations

import numpy as np
import pytest
from test_sampling import SCHEDULE, mixture_eps

import pydiff
from pydiff.guidance import EpsCorrection, combine

MEANS = np.array([[-0.3, 0.0], [0.3, 0.0]])
W = np.array([0.5, 0.5])
SPREAD = 0.5


def eps_cond(x, t):
    return mixture_eps(x, t, MEANS[:1], np.ones(1), SPREAD, SCHEDULE)


def eps_uncond(x, t):
    return mixture_eps(x, t, MEANS, W, SPREAD, SCHEDULE)


def grad_log_classifier(x, t):
    """grad_x log p(y=0 | x_t) of the mixture's exact posterior = score_0 - score_mix."""
    sigma = np.sqrt(1 - SCHEDULE.alphas_cumprod[t.astype(np.int64)])[:, None].astype(np.float32)
    return (-(eps_cond(x, t) - eps_uncond(x, t)) / sigma).astype(np.float32)


def purity(x):
    return float(np.mean(np.argmin(((x[:, None] - MEANS[None]) ** 2).sum(-1), 1) == 0))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_classifier_guidance_equals_cfg_in_score_form(sampler, pred):
    sched = SCHEDULE.replace(prediction_type=pred)
    abar = sched.alphas_cumprod

    def to_pred(eps, x, t):  # the same exact model, expressed in the schedule's prediction type
        a = np.sqrt(abar[t.astype(np.int64)])[:, None].astype(np.float32)
        s = np.sqrt(1 - abar[t.astype(np.int64)])[:, None].astype(np.float32)
        if pred == "epsilon":
            return eps
        x0 = (x - s * eps) / a
        return (a * eps - s * x0).astype(np.float32) if pred == "v_prediction" else x0.astype(np.float32)

    x_T = np.random.default_rng(0).standard_normal((500, 2)).astype(np.float32)
    w = 3.0
    cfg = pydiff.sample(
        lambda x, t, c: to_pred(np.where(c[:, None] == 0, eps_cond(x, t), eps_uncond(x, t)), x, t),
        x_T,
        schedule=sched,
        sampler=sampler,
        steps=20,
        cond=np.zeros(500),
        uncond=np.ones(500),
        guidance_scale=w,
    )
    clf = pydiff.sample(
        lambda x, t: to_pred(eps_uncond(x, t), x, t),
        x_T,
        schedule=sched,
        sampler=sampler,
        steps=20,
        guidance_fn=lambda x, t: w * grad_log_classifier(x, t),
    )
    np.testing.assert_allclose(clf, cfg, atol=2e-4, rtol=1e-4)


def test_ddpm_mean_shift_raises_purity_and_eps_correction_and_combination():
    x_T = np.random.default_rng(1).standard_normal((3000, 2)).astype(np.float32)
    kw = dict(schedule=SCHEDULE, sampler="ddpm", steps=100, seed=0)
    base = purity(pydiff.sample(eps_uncond, x_T, **kw))
    guided = purity(
        pydiff.sample(eps_uncond, x_T, guidance_fn=lambda x, t: 3.0 * grad_log_classifier(x, t), **kw)
    )
    assert base < 0.56 and guided > base + 0.2, (base, guided)
    # An EpsCorrection of 2 (eps_c - eps_u) is classifier-free guidance with scale 2, on any sampler;
    # two terms of 1.5x and 0.5x the gradient combine into 2x.
    ddim = dict(schedule=SCHEDULE, sampler="ddim", steps=20)
    a = pydiff.sample(
        eps_uncond,
        x_T[:200],
        guidance_fn=lambda x, t: EpsCorrection(2 * (eps_cond(x, t) - eps_uncond(x, t))),
        **ddim,
    )
    b = pydiff.sample(
        lambda x, t, c: np.where(c[:, None] == 0, eps_cond(x, t), eps_uncond(x, t)),
        x_T[:200],
        cond=np.zeros(200),
        uncond=np.ones(200),
        guidance_scale=2.0,
        **ddim,
    )
    np.testing.assert_allclose(a, b, atol=2e-4)
    c = pydiff.sample(
        eps_uncond,
        x_T[:200],
        guidance_fn=combine(
            [lambda x, t: 1.5 * grad_log_classifier(x, t), lambda x, t: 0.5 * grad_log_classifier(x, t)]
        ),
        **ddim,
    )
    d = pydiff.sample(eps_uncond, x_T[:200], guidance_fn=lambda x, t: 2.0 * grad_log_classifier(x, t), **ddim)
    np.testing.assert_allclose(c, d, atol=1e-5)


def test_bad_guidance_terms():
    x_T = np.zeros((2, 3), np.float32)
    kw = dict(schedule=SCHEDULE, sampler="ddim", steps=3)
    with pytest.raises(ValueError, match=r"guidance gradient must have shape \(2, 3\)"):
        pydiff.sample(lambda x, t: np.zeros_like(x), x_T, guidance_fn=lambda x, t: np.zeros((2, 4)), **kw)
    with pytest.raises(ValueError, match="contains NaN"):
        pydiff.sample(
            lambda x, t: np.zeros_like(x), x_T, guidance_fn=lambda x, t: np.full((2, 3), np.nan), **kw
        )
    with pytest.raises(TypeError, match="floating point"):
        pydiff.sample(
            lambda x, t: np.zeros_like(x), x_T, guidance_fn=lambda x, t: np.zeros((2, 3), int), **kw
        )
