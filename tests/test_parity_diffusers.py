"""Complete sampling loops in diffusers and in pydiff.sample agree (diffusers is a dev dependency)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import pydiff  # noqa: E402

SHAPE = (2, 3, 8, 8)
STEPS = 12


def toy_model(x: np.ndarray, t: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    """A smooth, fixed, analytic stand-in for a network (float32 in, float32 out)."""
    tt = (t.astype(np.float32) / np.float32(1000)).reshape((-1,) + (1,) * (x.ndim - 1))
    out = np.float32(0.8) * x + np.float32(0.3) * np.sin(x * (np.float32(1) + tt))
    if c is not None:
        out = out + np.float32(0.4) * np.cos(x + c.reshape((-1,) + (1,) * (x.ndim - 1)))
    return out.astype(np.float32)


def diffusers_loop(sampler, config, x_T, *, guidance=None, eta=0.0, torch_seed=0):
    if sampler == "ddpm":
        sched = diffusers.DDPMScheduler(**config)
    elif sampler == "ddim":
        sched = diffusers.DDIMScheduler(**config)
    else:
        cfg = {
            k: v for k, v in config.items() if k not in ("clip_sample", "clip_sample_range", "variance_type")
        }
        sched = diffusers.DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2)
    sched.set_timesteps(STEPS)
    gen = torch.Generator().manual_seed(torch_seed)
    x = torch.from_numpy(x_T.copy())
    B = x.shape[0]
    for t in sched.timesteps:
        xn = x.numpy()
        tt = np.full(B, int(t), np.float32)
        if guidance is None:
            out = torch.from_numpy(toy_model(xn, tt))
        else:
            cond = torch.from_numpy(toy_model(xn, tt, np.ones(B, np.float32)))
            unc = torch.from_numpy(toy_model(xn, tt, np.zeros(B, np.float32)))
            out = unc + guidance * (cond - unc)  # the usual torch CFG mix
        if sampler == "ddpm":
            x = sched.step(out, t, x, generator=gen).prev_sample
        elif sampler == "ddim":
            noise = torch.randn(x.shape, generator=gen) if eta > 0 else None
            x = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        else:
            x = sched.step(out, t, x).prev_sample
    return x.numpy()


def pydiff_loop(sampler, config, x_T, *, guidance=None, eta=0.0, torch_seed=0):
    gen = torch.Generator().manual_seed(torch_seed)
    noise = lambda i, shape: torch.randn(shape, generator=gen).numpy()  # noqa: E731
    kw = {}
    if guidance is not None:
        kw = dict(
            cond=np.ones(x_T.shape[0], np.float32),
            uncond=np.zeros(x_T.shape[0], np.float32),
            guidance_scale=guidance,
        )
    schedule = pydiff.Schedule(**config)
    model = toy_model
    return pydiff.sample(
        model,
        x_T,
        schedule=schedule,
        sampler=sampler,
        steps=STEPS,
        eta=eta,
        noise=noise if sampler != "dpmpp_2m" else None,
        **kw,
    )


BETAS = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SPACINGS = ["leading", "trailing", "linspace"]
THRESHOLDS = ["off", "static", "dynamic"]
SAMPLERS = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpmpp_2m", 0.0)]


def config_for(beta, pred, spacing, thr, steps_offset=0):
    cfg = dict(
        num_train_timesteps=1000,
        beta_schedule=beta,
        prediction_type=pred,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        clip_sample=thr == "static",
        clip_sample_range=1.0,
        thresholding=thr == "dynamic",
        dynamic_thresholding_ratio=0.9,
        sample_max_value=1.5,
    )
    if beta == "scaled_linear":
        cfg.update(beta_start=0.00085, beta_end=0.012)
    return cfg


CASES = [
    c
    for c in itertools.product(BETAS, PREDICTIONS, SPACINGS, THRESHOLDS, SAMPLERS, [None, 3.0])
    if not (c[4][0] == "dpmpp_2m" and c[3] == "static")
]  # diffusers' DPM-Solver has no static clip


@pytest.mark.parametrize(
    "beta,pred,spacing,thr,sampler_eta,guidance",
    CASES,
    ids=lambda v: str(v) if not isinstance(v, tuple) else f"{v[0]}-eta{v[1]}",
)
def test_sampling_loop_matches_diffusers(beta, pred, spacing, thr, sampler_eta, guidance):
    sampler, eta = sampler_eta
    cfg = config_for(beta, pred, spacing, thr, steps_offset=1 if spacing == "leading" else 0)
    x_T = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    want = diffusers_loop(sampler, cfg, x_T, guidance=guidance, eta=eta)
    got = pydiff_loop(sampler, cfg, x_T, guidance=guidance, eta=eta)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= 1e-4 * scale, f"max abs difference {err:.3g} (scale {scale:.3g})"


def test_timesteps_match_diffusers():
    for spacing, offset, steps in itertools.product(SPACINGS, [0, 1], [1, 7, 10, 50, 999]):
        cfg = dict(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
        s = pydiff.Schedule(**cfg)
        for name, cls in (
            ("ddpm", diffusers.DDPMScheduler),
            ("ddim", diffusers.DDIMScheduler),
            ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler),
        ):
            d = cls(**cfg)
            d.set_timesteps(steps)
            if d.timesteps.max() >= 1000:  # diffusers would index past its schedule later; we refuse now
                with pytest.raises(ValueError, match="outside"):
                    pydiff.timesteps(s, steps, name)
                continue
            assert list(pydiff.timesteps(s, steps, name)) == d.timesteps.tolist(), (
                name,
                spacing,
                offset,
                steps,
            )


@pytest.mark.parametrize("beta", BETAS)
def test_alphas_cumprod_match_diffusers(beta):
    d = diffusers.DDPMScheduler(beta_schedule=beta)
    s = pydiff.Schedule(beta_schedule=beta)
    np.testing.assert_allclose(s.alphas_cumprod, d.alphas_cumprod.double().numpy(), rtol=2e-6, atol=1e-9)


def test_dynamic_threshold_matches_diffusers_threshold_sample():
    d = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1.5)
    x0 = (np.random.default_rng(3).standard_normal((5, 3, 16, 16)) * 1.2).astype(np.float32)
    want = d._threshold_sample(torch.from_numpy(x0.copy())).numpy()
    got, s = pydiff.ops.dynamic_threshold(x0, 0.995, 1.5)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_abs_quantile_equals_torch_quantile_exactly():
    rng = np.random.default_rng(11)
    for n in [1, 2, 5, 192, 4097, 12288, 100001]:
        x = (rng.standard_normal((3, n)) * 1.5).astype(np.float32)
        for q in [0.5, 0.9, 0.995, 1.0]:
            want = torch.quantile(torch.from_numpy(np.abs(x)), q, dim=1).numpy()
            got = pydiff.ops.abs_quantile(x, q)
            assert np.array_equal(got, want), (n, q, got, want)


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_stock_diffusers_configs_import_and_sample_as_diffusers(cls, tmp_path):
    # a config as diffusers saves it (nulls for "default", DPM's keys); no warning, same loop
    import warnings

    sched = getattr(diffusers, cls)(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    sched.save_config(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = pydiff.Schedule.from_config(tmp_path / "scheduler_config.json")
    sampler = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}.get(cls, "dpmpp_2m")
    # diffusers' DPM-Solver has no clip_sample; its config must not get DDPM's clipping default
    assert s.clip_sample is (sampler != "dpmpp_2m")
    x_T = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    cfg = {k: v for k, v in sched.config.items() if not k.startswith("_")}
    want = diffusers_loop(
        sampler, {k: cfg[k] for k in ("beta_schedule", "prediction_type", "clip_sample") if k in cfg}, x_T
    )
    gen = torch.Generator().manual_seed(0)  # diffusers_loop's DDPM noise, drawn the same way
    got = pydiff.sample(
        toy_model,
        x_T,
        schedule=s,
        sampler=sampler,
        steps=STEPS,
        noise=lambda i, shape: torch.randn(shape, generator=gen).numpy(),
    )
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize(
    "key,value",
    [
        ("rescale_betas_zero_snr", True),
        ("algorithm_type", "dpmsolver"),
        ("use_lu_lambdas", True),
        ("lambda_min_clipped", -5.1),
        ("variance_type", "learned_range"),
    ],
)
def test_config_keys_that_change_the_math_are_refused(key, value):
    cfg = {k: v for k, v in diffusers.DPMSolverMultistepScheduler().config.items()}
    cfg[key] = value
    with pytest.raises(pydiff.ScheduleError, match=f"{key}={value!r} is not implemented"):
        pydiff.Schedule.from_config(cfg)


def test_log_variance_types_are_their_plain_twins():
    for name, plain in (("fixed_small_log", "fixed_small"), ("fixed_large_log", "fixed_large")):
        assert pydiff.Schedule.from_config({"variance_type": name}).variance_type == plain


def test_ddim_eta_above_one_that_overflows_is_refused():
    s = pydiff.Schedule()
    pydiff.make_sampler("ddim", s, 10, eta=1.0)
    with pytest.raises(ValueError, match="eta=2: the noise .* exceeds"):
        pydiff.make_sampler("ddim", s, 10, eta=2.0)
