"""pydiff.sample against an analytic oracle (a Gaussian mixture with closed-form eps*), and its errors."""

from __future__ import annotations

import numpy as np
import pytest

import pydiff

# ---------------------------------------------------------------- the oracle
MEANS = np.array([[-1.5, 0.0], [1.5, 0.0], [0.0, 1.8]])
WEIGHTS = np.array([0.5, 0.3, 0.2])
SPREAD = 0.35
SCHEDULE = pydiff.Schedule(beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing="trailing")


def mixture_eps(x, t, means, weights, spread, schedule):
    """Exact eps*(x_t, t) = -sigma_t grad log p_t(x_t) for p_0 = sum_k w_k N(mu_k, spread^2 I)."""
    abar = schedule.alphas_cumprod[t.astype(np.int64)][:, None]
    a, var_t = np.sqrt(abar), 1.0 - abar
    x = x.astype(np.float64)
    var = a**2 * spread**2 + var_t  # [B, 1]
    diff = x[:, None, :] - a[:, None, :] * means[None]  # [B, K, d]
    logp = np.log(weights)[None] - (diff**2).sum(-1) / (2 * var) - x.shape[1] / 2 * np.log(var)
    gamma = np.exp(logp - logp.max(1, keepdims=True))
    gamma /= gamma.sum(1, keepdims=True)
    score = -(gamma[:, :, None] * diff).sum(1) / var
    return (-np.sqrt(var_t) * score).astype(np.float32)


def mixture_model(x, t):
    return mixture_eps(x, t, MEANS, WEIGHTS, SPREAD, SCHEDULE)


def exact_samples(n, rng):
    k = rng.choice(len(WEIGHTS), size=n, p=WEIGHTS)
    return MEANS[k] + SPREAD * rng.standard_normal((n, 2))


def stats(x):
    k = np.argmin(((x[:, None, :] - MEANS[None]) ** 2).sum(-1), axis=1)
    frac = np.array([(k == j).mean() for j in range(len(WEIGHTS))])
    means = np.array([x[k == j].mean(0) for j in range(len(WEIGHTS))])
    spreads = np.array([x[k == j].std(0).mean() for j in range(len(WEIGHTS))])
    return frac, means, spreads


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddim", 50), ("dpmpp_2m", 20)])
def test_samples_reproduce_the_mixture(sampler, steps):
    n = 4000
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((n, 2)).astype(np.float32)
    x = pydiff.sample(mixture_model, x_T, schedule=SCHEDULE, sampler=sampler, steps=steps, seed=1)
    frac, means, spreads = stats(x)
    # Tolerances: 4 standard errors for n samples, plus a small allowance for the solver's
    # discretisation error (measured: well under it at these step counts).
    se_w = np.sqrt(WEIGHTS * (1 - WEIGHTS) / n)
    assert np.all(np.abs(frac - WEIGHTS) <= 4 * se_w + 0.01), frac
    se_m = SPREAD / np.sqrt(WEIGHTS * n)
    assert np.all(np.abs(means - MEANS) <= 4 * se_m[:, None] + 0.02), means
    assert np.all(np.abs(spreads / SPREAD - 1) <= 4 / np.sqrt(WEIGHTS * n) + 0.05), spreads


def test_classifier_free_guidance_raises_class_purity_monotonically():
    """Two overlapping classes; at s = 1 purity is exactly Phi(0.3 / 0.5); guidance sharpens it."""
    means = np.array([[-0.3, 0.0], [0.3, 0.0]])
    w = np.array([0.5, 0.5])

    def model(x, t, c):
        c = np.asarray(c)
        out = np.empty_like(x)
        for cls in (0, 1):  # class-conditional: one Gaussian; label 2: the unconditional mixture
            m = c == cls
            if m.any():
                out[m] = mixture_eps(x[m], t[m], means[cls : cls + 1], np.ones(1), 0.5, SCHEDULE)
        m = c == 2
        if m.any():
            out[m] = mixture_eps(x[m], t[m], means, w, 0.5, SCHEDULE)
        return out

    n = 3000
    x_T = np.random.default_rng(1).standard_normal((n, 2)).astype(np.float32)
    labels = np.zeros(n, np.int64)
    purity = []
    for s in [1.0, 1.5, 2.0, 3.0]:
        x = pydiff.sample(
            model,
            x_T,
            schedule=SCHEDULE,
            sampler="ddim",
            steps=50,
            cond=labels,
            uncond=np.full(n, 2),
            guidance_scale=s,
            seed=0,
        )
        purity.append(float(np.mean(np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), 1) == 0)))
    phi = 0.7257468822499265  # Phi(0.6): the exact purity without guidance
    assert abs(purity[0] - phi) <= 4 * np.sqrt(phi * (1 - phi) / n), purity
    assert all(b > a + 0.02 for a, b in zip(purity, purity[1:])), purity


def test_per_sample_guidance_equals_separate_runs():
    def model(x, t, c):
        return (0.5 * x + 0.3 * np.asarray(c, np.float32)[:, None]).astype(np.float32)

    x_T = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    cond, uncond = np.array([1.0, -1.0, 2.0]), np.zeros(3)
    scales = np.array([1.5, 3.0, 7.0], np.float32)
    kw = dict(schedule=SCHEDULE, sampler="ddpm", steps=10, seed=4)
    together = pydiff.sample(model, x_T, cond=cond, uncond=uncond, guidance_scale=scales, **kw)
    for b in range(3):
        alone = pydiff.sample(model, x_T, cond=cond, uncond=uncond, guidance_scale=float(scales[b]), **kw)
        np.testing.assert_array_equal(together[b], alone[b])  # the noise is keyed by element, not batch


def test_model_called_once_on_stacked_batch_or_twice():
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return np.zeros_like(x)

    x_T = np.zeros((2, 3), np.float32)
    kw = dict(
        schedule=SCHEDULE, sampler="ddim", steps=3, cond=np.ones(2), uncond=np.zeros(2), guidance_scale=2.0
    )
    pydiff.sample(model, x_T, **kw)
    assert calls == [4, 4, 4]
    calls.clear()
    pydiff.sample(model, x_T, batch_cond_uncond=False, **kw)
    assert calls == [2] * 6


def test_seed_determinism_and_callback_replacement():
    x_T = np.random.default_rng(3).standard_normal((4, 2)).astype(np.float32)
    a = pydiff.sample(mixture_model, x_T, schedule=SCHEDULE, sampler="ddpm", steps=20, seed=5)
    b = pydiff.sample(mixture_model, x_T, schedule=SCHEDULE, sampler="ddpm", steps=20, seed=5)
    c = pydiff.sample(mixture_model, x_T, schedule=SCHEDULE, sampler="ddpm", steps=20, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    seen = []
    out = pydiff.sample(
        mixture_model,
        x_T,
        schedule=SCHEDULE,
        sampler="ddim",
        steps=5,
        callback=lambda i, t, x: seen.append((i, t)) or np.zeros_like(x),
    )
    assert [i for i, _ in seen] == list(range(5)) and np.all(out == 0)


def test_native_and_reference_backends_agree():
    x_T = np.random.default_rng(4).standard_normal((8, 3, 4, 4)).astype(np.float32) * 2
    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        kw = dict(
            schedule=SCHEDULE.replace(thresholding=True, sample_max_value=1.5),
            sampler=sampler,
            steps=8,
            seed=3,
            eta=1.0 if sampler == "ddim" else 0.0,
        )
        model = lambda x, t: (0.7 * x + 0.2).astype(np.float32)  # noqa: E731
        a = pydiff.sample(model, x_T, **kw)
        b = pydiff.sample(model, x_T, backend="reference", **kw)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_start_step_skips_timesteps():
    seen = []
    pydiff.sample(
        lambda x, t: seen.append(int(t[0])) or np.zeros_like(x),
        np.zeros((1, 2), np.float32),
        schedule=SCHEDULE,
        sampler="ddim",
        steps=10,
        start_step=6,
    )
    assert seen == list(pydiff.timesteps(SCHEDULE, 10, "ddim")[6:])


class TestBadInput:
    x = np.zeros((2, 3), np.float32)

    def model(self, x, t, c=None):
        return np.zeros_like(x)

    def run(self, **kw):
        model, x_T = kw.pop("model", self.model), kw.pop("x_T", self.x)
        args = dict(schedule=SCHEDULE, sampler="ddim", steps=5)
        args.update(kw)
        return pydiff.sample(model, x_T, **args)

    def test_nan_in_model_output_names_the_step(self):
        def model(x, t):
            return np.full_like(x, np.nan) if t[0] < 500 else np.zeros_like(x)

        for sampler in ("ddpm", "ddim", "dpmpp_2m"):
            with pytest.raises(
                pydiff.NonFiniteError, match=r"step \d+ \(t=\d+\): NaN or Inf in the network's output"
            ):
                self.run(model=model, sampler=sampler, steps=10)

    def test_inf_hidden_by_static_clip_is_still_reported(self):
        with pytest.raises(pydiff.NonFiniteError):
            self.run(
                model=lambda x, t: np.full_like(x, np.inf),
                sampler="ddpm",
                schedule=SCHEDULE.replace(clip_sample=True),
            )

    def test_steps_out_of_range(self):
        for steps in (0, -1, 1001):
            with pytest.raises(ValueError, match="steps must be in"):
                self.run(steps=steps)
        with pytest.raises(ValueError, match="steps must be an integer"):
            self.run(steps=2.5)
        with pytest.raises(ValueError, match="repeats timesteps"):  # 1001 linspace points over 1000 timesteps
            self.run(sampler="dpmpp_2m", steps=1000, schedule=SCHEDULE.replace(timestep_spacing="linspace"))

    def test_unknown_names(self):
        with pytest.raises(ValueError, match="unknown sampler 'lms'"):
            self.run(sampler="lms")
        with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'"):
            pydiff.Schedule(beta_schedule="cosine")
        with pytest.raises(ValueError, match="unknown prediction_type"):
            pydiff.Schedule(prediction_type="x0")
        with pytest.raises(ValueError, match="unknown timestep_spacing"):
            pydiff.Schedule(timestep_spacing="uniform")
        with pytest.raises(TypeError, match="unknown sampler option"):
            self.run(thresholdin=True)

    def test_ratio_outside_unit_interval(self):
        for r in (0.0, 1.01, -0.5):
            with pytest.raises(ValueError, match="dynamic_thresholding_ratio must be in"):
                self.run(thresholding=True, dynamic_thresholding_ratio=r)

    def test_shapes_and_dtypes(self):
        with pytest.raises(TypeError, match="x_T must be float32"):
            self.run(x_T=np.zeros((2, 3)))
        with pytest.raises(ValueError, match=r"returned shape \(2, 4\)"):
            self.run(model=lambda x, t: np.zeros((2, 4), np.float32))
        with pytest.raises(TypeError, match="returned dtype int64"):
            self.run(model=lambda x, t: np.zeros((2, 3), np.int64))
        with pytest.raises(ValueError, match="cond must have batch size 2"):
            self.run(cond=np.zeros(3), uncond=np.zeros(2), guidance_scale=2.0)
        with pytest.raises(ValueError, match="per-sample guidance_scale must have shape"):
            self.run(cond=np.zeros(2), uncond=np.zeros(2), guidance_scale=np.ones(3))
        with pytest.raises(ValueError, match="x_T contains NaN"):
            self.run(x_T=np.full((2, 3), np.nan, np.float32))

    def test_nan_guidance(self):
        for g in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="guidance_scale must be finite"):
                self.run(cond=np.zeros(2), uncond=np.zeros(2), guidance_scale=g)

    def test_from_config(self, tmp_path):
        p = tmp_path / "scheduler_config.json"
        p.write_text(
            '{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,'
            ' "beta_end": 0.012, "prediction_type": "v_prediction", "some_new_key": 3}'
        )
        with pytest.warns(UserWarning, match="some_new_key"):
            s = pydiff.Schedule.from_config(p)
        assert s.prediction_type == "v_prediction" and s.beta_schedule == "scaled_linear"
        with pytest.raises(ValueError, match="num_train_timesteps must be an integer"):
            pydiff.Schedule.from_config({"num_train_timesteps": "1000"})
        with pytest.raises(ValueError, match="clip_sample must be true or false"):
            pydiff.Schedule.from_config({"clip_sample": 1})
        p.write_text("{not json")
        with pytest.raises(ValueError, match="not valid JSON"):
            pydiff.Schedule.from_config(p)
