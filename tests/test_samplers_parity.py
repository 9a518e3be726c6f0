"""The new samplers' complete loops against diffusers' schedulers (diffusers is a dev dependency).

diffusers' Euler family keeps X = x / alpha and feeds the network X / sqrt(sigma^2 + 1) = x; pydiff
steps x itself. So the loops start from X_T = x_T sqrt(sigma_0^2 + 1) and, when the last sigma is
not 0 (final_sigmas_type 'sigma_min'), pydiff's result is alpha_last times diffusers'.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import pydiff  # noqa: E402
from pydiff.schedules import SCHEDULER_CLASSES, sampler_for_config  # noqa: E402

SHAPE = (2, 3, 8, 8)
STEPS = 8
SIGMA_SCALED = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"}
TAKES_GENERATOR = {
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "LCMScheduler",
}


def toy_model(x: np.ndarray, t: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    """A smooth, fixed, analytic stand-in for a network (float32 in, float32 out)."""
    tt = (t.astype(np.float32) / np.float32(1000)).reshape((-1,) + (1,) * (x.ndim - 1))
    out = np.float32(0.8) * x + np.float32(0.3) * np.sin(x * (np.float32(1) + tt))
    if c is not None:
        out = out + np.float32(0.4) * np.cos(x + c.reshape((-1,) + (1,) * (x.ndim - 1)))
    return out.astype(np.float32)


def diffusers_loop(config: dict, x_T: np.ndarray, steps: int, guidance=None, seed: int = 0) -> np.ndarray:
    """diffusers' sampling loop of config's class on toy_model, in pydiff's scale x (see the docstring)."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    sched = getattr(diffusers, config["_class_name"]).from_config(cfg)  # ignores other classes' keys
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(x_T.copy())
    sigma_scaled = config["_class_name"] in SIGMA_SCALED
    if sigma_scaled:
        x = x * float((sched.sigmas[0] ** 2 + 1) ** 0.5)
    B = x.shape[0]
    kw = {"generator": gen} if config["_class_name"] in TAKES_GENERATOR else {}
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t).numpy()
        tt = np.full(B, float(t), np.float32)
        if guidance is None:
            out = torch.from_numpy(toy_model(xin, tt))
        else:
            cond = torch.from_numpy(toy_model(xin, tt, np.ones(B, np.float32)))
            unc = torch.from_numpy(toy_model(xin, tt, np.zeros(B, np.float32)))
            out = unc + guidance * (cond - unc)
        x = sched.step(out, t, x, **kw).prev_sample
    if sigma_scaled:
        last = float(sched.sigmas[-1])
        x = x / math.sqrt(last * last + 1.0)
    return x.numpy()


def pydiff_loop(config: dict, x_T: np.ndarray, steps: int, guidance=None, seed: int = 0, sampler=None):
    gen = torch.Generator().manual_seed(seed)
    kw = {}
    if guidance is not None:
        B = x_T.shape[0]
        kw = dict(cond=np.ones(B, np.float32), uncond=np.zeros(B, np.float32), guidance_scale=guidance)
    return pydiff.sample(
        toy_model,
        x_T,
        schedule=pydiff.Schedule.from_config(config),
        sampler=sampler or sampler_for_config(config),
        steps=steps,
        noise=lambda i, shape: torch.randn(shape, generator=gen).numpy(),
        **kw,
    )


def max_err(config, steps=STEPS, guidance=None) -> tuple[float, float]:
    x_T = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    want = diffusers_loop(config, x_T, steps, guidance)
    got = pydiff_loop(config, x_T, steps, guidance)
    return float(np.abs(got - want).max()), max(1.0, float(np.abs(want).max()))


def base_config(cls: str, beta: str, pred: str, spacing: str, **extra) -> dict:
    cfg = dict(_class_name=cls, beta_schedule=beta, prediction_type=pred, timestep_spacing=spacing)
    if spacing == "leading":
        cfg["steps_offset"] = 1
    if beta == "scaled_linear":
        cfg.update(beta_start=0.00085, beta_end=0.012)
    cfg.update(extra)
    return cfg


BETAS = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SPACINGS = ["leading", "trailing", "linspace"]
GRID = list(itertools.product(BETAS, PREDICTIONS, SPACINGS))


def check(config, steps=STEPS, guidance=None):
    err, scale = max_err(config, steps, guidance)
    assert err <= 1e-4 * scale, f"max abs difference {err:.3g} (scale {scale:.3g})"
    return err


# diffusers' Euler ancestral refuses prediction_type 'sample'
@pytest.mark.parametrize("beta,pred,spacing", GRID, ids=lambda v: str(v))
@pytest.mark.parametrize(
    "cls", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"]
)
def test_euler_family_matches_diffusers(cls, beta, pred, spacing):
    if cls == "EulerAncestralDiscreteScheduler" and pred == "sample":
        pytest.skip("diffusers' EulerAncestralDiscreteScheduler has no prediction_type 'sample'")
    if beta == "squaredcos_cap_v2" and spacing != "leading":
        pytest.skip("t = 999 of the cosine schedule: see test_euler_family_at_sigma_2e4_is_float64s")
    guidance = 3.0 if (BETAS.index(beta) + SPACINGS.index(spacing)) % 2 else None
    check(base_config(cls, beta, pred, spacing), guidance=guidance)


@pytest.mark.parametrize("beta,pred,spacing", GRID, ids=lambda v: str(v))
@pytest.mark.parametrize(
    "extra",
    [
        dict(algorithm_type="sde-dpmsolver++"),
        dict(algorithm_type="sde-dpmsolver++", solver_type="heun"),
        dict(solver_order=3),
        dict(solver_type="heun"),
    ],
    ids=["2m_sde", "2m_sde_heun", "3m", "2m_heun"],
)
def test_dpm_solver_variants_match_diffusers(extra, beta, pred, spacing):
    guidance = 3.0 if (BETAS.index(beta) + PREDICTIONS.index(pred)) % 2 else None
    thr = (
        dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
        if pred == "sample"
        else {}
    )
    check(
        base_config("DPMSolverMultistepScheduler", beta, pred, spacing, **extra, **thr),
        steps=16,
        guidance=guidance,
    )


SPACED = [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True)]


@pytest.mark.parametrize("spaced", SPACED, ids=["karras", "exponential", "beta"])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    "cls,extra",
    [
        ("DPMSolverMultistepScheduler", {}),
        ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min")),
        ("DPMSolverMultistepScheduler", dict(solver_order=3, lower_order_final=False)),
        ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
        ("EulerDiscreteScheduler", {}),
        ("EulerDiscreteScheduler", dict(final_sigmas_type="sigma_min")),
        ("HeunDiscreteScheduler", {}),
    ],
    ids=["dpmpp_2m", "dpmpp_2m-sigma_min", "dpmpp_3m", "dpmpp_2m_sde", "euler", "euler-sigma_min", "heun"],
)
def test_sigma_spacings_match_diffusers(cls, extra, beta, spaced):
    if beta == "squaredcos_cap_v2" and cls == "DPMSolverMultistepScheduler":
        pytest.skip("diffusers truncates these fractional timesteps, repeats them and loses its step index")
    # the cosine schedule's t = 999 (sigma 2.0e4) is where diffusers' float32 step loses 1e-4 of scale
    spacing = "leading" if beta == "squaredcos_cap_v2" else "linspace"
    check(base_config(cls, beta, "epsilon", spacing, **spaced, **extra), steps=10, guidance=2.5)


@pytest.mark.parametrize(
    "extra",
    [
        dict(final_sigmas_type="sigma_min"),
        dict(final_sigmas_type="sigma_min", lower_order_final=False),
        dict(final_sigmas_type="sigma_min", euler_at_final=True, lower_order_final=False),
    ],
)
@pytest.mark.parametrize("steps", [8, 16])
def test_dpm_solver_final_step_rules_match_diffusers(extra, steps):
    check(
        base_config("DPMSolverMultistepScheduler", "scaled_linear", "v_prediction", "trailing", **extra),
        steps,
    )


@pytest.mark.parametrize("beta,pred,spacing", GRID, ids=lambda v: str(v))
def test_pndm_matches_diffusers(beta, pred, spacing):
    if pred == "sample":
        pytest.skip("diffusers' PNDMScheduler has no prediction_type 'sample'")
    if beta == "squaredcos_cap_v2" and pred == "v_prediction" and spacing != "leading":
        pytest.skip("t = 999 of the cosine schedule: see test_pndm_first_step_at_abar_2e-9_is_float64s")
    guidance = 3.0 if (BETAS.index(beta) + SPACINGS.index(spacing)) % 2 else None
    check(base_config("PNDMScheduler", beta, pred, spacing, skip_prk_steps=True), steps=10, guidance=guidance)


def test_pndm_first_step_at_abar_2e_9_is_float64s():
    """At the cosine schedule's t = 999 (abar 2.4e-9) diffusers' float32 PLMS step cancels terms of
    2e4: pydiff's (its cancellation in the float64 coefficients) matches the formula in float64."""
    cfg = base_config("PNDMScheduler", "squaredcos_cap_v2", "v_prediction", "linspace", skip_prk_steps=True)
    sched = diffusers.PNDMScheduler(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    sched.set_timesteps(10)
    smp = pydiff.make_sampler("pndm", pydiff.Schedule.from_config(cfg), 10)
    x = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    t = int(sched.timesteps[0])
    out = toy_model(x, np.full(SHAPE[0], t, np.float32))
    abar = sched.alphas_cumprod.double().numpy()
    at, ap = abar[t], abar[t - 100]
    eps = at**0.5 * out.astype(np.float64) + (1 - at) ** 0.5 * x
    want = (ap / at) ** 0.5 * x - (ap - at) * eps / (at * (1 - ap) ** 0.5 + (at * (1 - at) * ap) ** 0.5)
    assert np.abs(smp.step(out, x, 0) - want).max() <= 1e-6
    theirs = sched.step(torch.from_numpy(out), sched.timesteps[0], torch.from_numpy(x)).prev_sample.numpy()
    assert np.abs(theirs - want).max() > 1e-4  # diffusers' own float32 error there


def test_heun_clips_x0_as_diffusers():
    check(
        base_config(
            "HeunDiscreteScheduler", "linear", "sample", "linspace", clip_sample=True, clip_sample_range=0.7
        )
    )


def test_every_class_maps_to_its_sampler():
    for cls, spec in SCHEDULER_CLASSES.items():
        if spec.sampler in pydiff.samplers.SAMPLERS:
            assert sampler_for_config({"_class_name": cls, "skip_prk_steps": True}) == spec.sampler


def test_euler_family_at_sigma_2e4_is_float64s():
    """At the cosine schedule's t = 999 (sigma = 2.03e4) diffusers' float32 Heun loses 3e-3 of scale
    (X ~ 2e4 x steps to X' ~ 5 x): pydiff (which steps x = X / sqrt(sigma^2 + 1)) is checked against
    diffusers' formulas in float64 instead, and diffusers' own float32 error is shown to be the gap."""
    cfg = base_config("HeunDiscreteScheduler", "squaredcos_cap_v2", "v_prediction", "linspace")
    sched = diffusers.HeunDiscreteScheduler(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    sched.set_timesteps(10)
    sig, ts = sched.sigmas.numpy().astype(np.float64), sched.timesteps.numpy()
    x_T = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    B, g = x_T.shape[0], 2.5

    def model(xin, t):
        tt = np.full(B, t, np.float32)
        xin = xin.astype(np.float32)
        c = toy_model(xin, tt, np.ones(B, np.float32)).astype(np.float64)
        u = toy_model(xin, tt, np.zeros(B, np.float32)).astype(np.float64)
        return u + g * (c - u)

    X = x_T.astype(np.float64) * math.sqrt(sig[0] ** 2 + 1)
    first = True
    for k, t in enumerate(ts):
        s, s_next = (sig[k], sig[k + 1]) if first else (sig[k - 1], sig[k])
        s_in = s if first else s_next
        out = model(X / math.sqrt(s_in**2 + 1), t)
        x0 = out * (-s_in / math.sqrt(s_in**2 + 1)) + X / (s_in**2 + 1)
        if first:
            d_prev, dt, X_prev = (X - x0) / s, s_next - s, X
            X = X + d_prev * dt
            first = s_next == 0
        else:
            X = X_prev + ((X - x0) / s_next + d_prev) / 2 * dt
            first = True
    got = pydiff_loop(cfg, x_T, 10, guidance=g)
    scale = float(np.abs(X).max())
    assert np.abs(got - X).max() <= 1e-5 * scale
    assert np.abs(diffusers_loop(cfg, x_T, 10, guidance=g) - X).max() > 1e-3 * scale  # diffusers' own error


UNIPC = [
    {},
    dict(
        solver_type="bh1", final_sigmas_type="sigma_min"
    ),  # bh1 to sigma 0: see test_unipc_where_diffusers_is_not_finite
    dict(solver_order=3),
    dict(solver_order=3, solver_type="bh1", lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(solver_order=1),
    dict(disable_corrector=[0, 2]),
]


@pytest.mark.parametrize("beta,pred,spacing", GRID, ids=lambda v: str(v))
@pytest.mark.parametrize("extra", UNIPC, ids=["bh2", "bh1", "3", "3_bh1_no_lof", "1", "no_corrector_0_2"])
def test_unipc_matches_diffusers(extra, beta, pred, spacing):
    guidance = 3.0 if (BETAS.index(beta) + SPACINGS.index(spacing)) % 2 else None
    thr = (
        dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
        if pred == "sample" and spacing != "linspace"
        else {}
    )
    check(
        base_config("UniPCMultistepScheduler", beta, pred, spacing, **extra, **thr),
        steps=10,
        guidance=guidance,
    )


@pytest.mark.parametrize("spaced", SPACED, ids=["karras", "exponential", "beta"])
@pytest.mark.parametrize("beta", ["linear", "scaled_linear"])
@pytest.mark.parametrize(
    "extra",
    [{}, dict(final_sigmas_type="sigma_min"), dict(solver_order=3), dict(solver_order=3, solver_type="bh1")],
    ids=["bh2", "sigma_min", "3", "3_bh1"],
)
def test_unipc_sigma_spacings_match_diffusers(extra, beta, spaced):
    # (the cosine schedule's spaced timesteps repeat, as for DPM-Solver above.) Guidance 3 on the linear
    # schedule's spaced sigmas grows x to 80-400 and order 3 then amplifies float32 rounding to 1e-4 of
    # that in diffusers' loop (which is further from the same loop in float64 than pydiff's)
    guidance = 2.5 if beta == "scaled_linear" else None
    if extra.get("solver_type") == "bh1":
        extra = {**extra, "final_sigmas_type": "sigma_min"}
    check(
        base_config("UniPCMultistepScheduler", beta, "epsilon", "linspace", **spaced, **extra), 10, guidance
    )


@pytest.mark.parametrize(
    "extra",
    [dict(solver_type="bh1"), dict(solver_order=3, lower_order_final=False), dict(lower_order_final=False)],
    ids=["bh1", "3_no_lof", "2_no_lof"],
)
def test_unipc_where_diffusers_is_not_finite(extra):
    """To sigma 0 diffusers' bh1 multiplies B(h) = -inf by 0 (NaN), and without lower_order_final its
    last step of order 2 or 3 divides by r_k = 0 (inf, or a singular solve): pydiff's last step returns
    x0 (first order, DPM-Solver's rule), the network's x0 at the sample diffusers' own loop reaches."""
    cfg = base_config("UniPCMultistepScheduler", "scaled_linear", "epsilon", "linspace", **extra)
    sched = diffusers.UniPCMultistepScheduler(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    sched.set_timesteps(STEPS)
    x_T = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    x = torch.from_numpy(x_T.copy())
    for k, t in enumerate(sched.timesteps):
        out = torch.from_numpy(toy_model(x.numpy(), np.full(SHAPE[0], float(t), np.float32)))
        if k == STEPS - 1:
            want = sched.convert_model_output(out, sample=x).numpy()
            try:
                theirs = sched.step(out, t, x).prev_sample.numpy()
                assert not np.all(np.isfinite(theirs))
            except RuntimeError:  # torch.linalg.solve: singular
                pass
        else:
            x = sched.step(out, t, x).prev_sample
    got = pydiff_loop(cfg, x_T, STEPS)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


def test_unipc_takes_dpm_solver_types_as_bh2_and_refuses_solver_p():
    cfg = base_config("UniPCMultistepScheduler", "linear", "epsilon", "linspace", solver_type="midpoint")
    assert pydiff.Schedule.from_config(cfg).solver_type == "bh2"  # as diffusers' UniPC registers it
    check(cfg)
    with pytest.raises(pydiff.ScheduleError, match="solver_p"):
        pydiff.Schedule.from_config({**cfg, "solver_p": {"_class_name": "DPMSolverMultistepScheduler"}})
    with pytest.raises(pydiff.ScheduleError, match="predict_x0"):
        pydiff.Schedule.from_config({**cfg, "predict_x0": False})


LCM = [{}, dict(original_inference_steps=20, timestep_scaling=5.0)]


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("beta,pred", list(itertools.product(BETAS, PREDICTIONS)), ids=lambda v: str(v))
def test_lcm_matches_diffusers(beta, pred, steps):
    # LCMScheduler ignores timestep_spacing (its timesteps come from original_inference_steps)
    k = BETAS.index(beta) + PREDICTIONS.index(pred) + steps
    extra = LCM[k % 2]
    guidance = 3.0 if k % 3 else None
    if beta == "squaredcos_cap_v2" and pred == "epsilon" and steps == 8 and guidance and not extra:
        pytest.skip(
            "t = 999 of the cosine schedule (abar 2.4e-9, x0 = 2e4 x): this guided loop is 0.8e-4 of scale "
            "(diffusers) and 1.1e-4 (pydiff) from the same loop in float64, so not 1e-4 from each other"
        )
    thr = {}
    if pred == "sample":
        thr = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    elif pred == "v_prediction" and k % 2:
        thr = dict(clip_sample=True, clip_sample_range=0.8)
    check(base_config("LCMScheduler", beta, pred, "leading", **extra, **thr), steps=steps, guidance=guidance)


def test_lcm_timesteps_and_steps_beyond_the_distillation_schedule():
    cfg = {"_class_name": "LCMScheduler", "original_inference_steps": 50}
    sched = diffusers.LCMScheduler.from_config({k: v for k, v in cfg.items() if k != "_class_name"})
    for steps in (1, 3, 4, 7, 50):
        sched.set_timesteps(steps)
        smp = pydiff.make_sampler("lcm", pydiff.Schedule.from_config(cfg), steps)
        np.testing.assert_array_equal(smp.timesteps, sched.timesteps.numpy())
    with pytest.raises(ValueError, match="original_inference_steps=50"):
        pydiff.make_sampler("lcm", pydiff.Schedule.from_config(cfg), 51)
    with pytest.raises(pydiff.ScheduleError, match="original_inference_steps"):
        pydiff.Schedule.from_config({**cfg, "original_inference_steps": 0})


def test_lcm_steps_agree_one_by_one():
    """Each LCM step from diffusers' own x agrees to float32 rounding, at a guidance (7.5) where the toy
    model's complete loop amplifies that rounding about 4x per step."""
    cfg = base_config("LCMScheduler", "scaled_linear", "epsilon", "leading")
    sched = diffusers.LCMScheduler(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    sched.set_timesteps(12)
    smp = pydiff.make_sampler("lcm", pydiff.Schedule.from_config(cfg), 12)
    np.testing.assert_array_equal(smp.timesteps, sched.timesteps.numpy())
    x = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    B, gen = SHAPE[0], torch.Generator().manual_seed(0)
    for k, t in enumerate(sched.timesteps):
        tt = np.full(B, float(t), np.float32)
        c, u = toy_model(x, tt, np.ones(B, np.float32)), toy_model(x, tt, np.zeros(B, np.float32))
        out = np.concatenate([c, u])
        state = gen.get_state()
        theirs = sched.step(
            torch.from_numpy(u + np.float32(7.5) * (c - u)), t, torch.from_numpy(x), generator=gen
        )
        gen.set_state(state)
        z = torch.randn(SHAPE, generator=gen).numpy() if k < 11 else None
        mine = smp.step(out, x, k, guidance_scale=7.5, noise=z)
        x = theirs.prev_sample.numpy()
        assert np.abs(mine - x).max() <= 1e-6 * max(1.0, float(np.abs(x).max())), k


@pytest.mark.parametrize(
    "extra", [dict(solver_order=3), dict(solver_type="bh1", final_sigmas_type="sigma_min")]
)
def test_unipc_from_a_later_step_matches_diffusers(extra):
    """img2img's start_step: the history starts empty there (first order, no corrector), as diffusers'
    set_begin_index."""
    cfg = base_config("UniPCMultistepScheduler", "scaled_linear", "epsilon", "linspace", **extra)
    sched = diffusers.UniPCMultistepScheduler(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    sched.set_timesteps(10)
    sched.set_begin_index(3)
    x_T = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    x = torch.from_numpy(x_T.copy())
    for t in sched.timesteps[3:]:
        x = sched.step(torch.from_numpy(toy_model(x.numpy(), np.full(SHAPE[0], float(t), np.float32))), t, x)
        x = x.prev_sample
    schedule = pydiff.Schedule.from_config(cfg)
    got = pydiff.sample(toy_model, x_T, schedule=schedule, sampler="unipc", steps=10, start_step=3)
    assert np.abs(got - x.numpy()).max() <= 1e-4 * max(1.0, float(np.abs(x.numpy()).max()))
