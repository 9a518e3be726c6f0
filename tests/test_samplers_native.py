"""The deep multistep step (c_d2, c_d3, history_output) of the native kernel against the NumPy oracle,
and the samplers that use it, native against reference, bit for bit or to a few ulp."""

from __future__ import annotations

import numpy as np
import pytest

import pydiff
from pydiff import ops, reference

SHAPE = (3, 2, 9, 11)


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(6)]


@pytest.mark.parametrize("pred", [0, 1, 2])
@pytest.mark.parametrize("history_output", [0, 1])
@pytest.mark.parametrize("thr", [0, 1, 2])
@pytest.mark.parametrize("guided", [False, True])
def test_deep_step_matches_reference(pred, history_output, thr, guided):
    x, m, m2, h1, h2, h3 = _arrays(pred + 3 * thr)
    mo = np.concatenate([m, m2]) if guided else m
    fields = dict(
        alpha=0.6, sigma=0.8, prediction_type=pred, threshold_mode=thr, clip_range=1.2, dynamic_ratio=0.9,
        sample_max_value=1.5, c_x=0.7, c_x0=0.3, c_eps=-0.2, c_d=0.25, c_d2=-0.4, c_d3=0.15, c_noise=0.1,
        history_output=history_output, seed=5, noise_step=3, use_clipped_eps=0,
    )  # fmt: skip
    h_out = np.empty_like(x)
    got, bad = ops.fused_step(
        x, mo, ops.step_params(**fields), guidance_scale=2.5 if guided else None,
        x0_prev=h1, x0_prev2=h2, x0_prev3=h3, x0_out=h_out,
    )  # fmt: skip
    want, want_h, _ = reference.fused_step(
        x, mo, fields, guided=guided, guidance_scale=2.5, x0_prev=h1, x0_prev2=h2, x0_prev3=h3
    )
    assert bad == 0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(h_out, want_h)
    if history_output:  # the history value is the guided output m
        np.testing.assert_allclose(h_out, reference.cfg_mix(m, m2, 2.5) if guided else m, rtol=1e-6)


def test_deep_step_needs_its_history_and_is_refused_where_unsupported():
    x, m, h1, h2, *_ = _arrays()
    with pytest.raises(ValueError, match="x0_prev2 are required when c_d2"):
        ops.fused_step(x, m, ops.step_params(c_d=0.1, c_d2=0.2), x0_prev=h1)
    with pytest.raises(ValueError, match="x0_prev3 are required when c_d3"):
        ops.fused_step(x, m, ops.step_params(c_d3=0.2), x0_prev=h1, x0_prev2=h2)
    with pytest.raises(ValueError, match="history_output must be 0 or 1"):
        ops.fused_step(x, m, ops.step_params(history_output=2))
    with pytest.raises(ValueError, match="fused_step_rows does not take deep multistep steps"):
        ops.fused_step_rows(x, m, [ops.step_params(c_d2=0.5)] * SHAPE[0], x0_prev=h1)
    with pytest.raises(ValueError, match="does not take deep multistep steps"):
        ops.step_params_table([dict(c_d2=0.5)] * SHAPE[0])
    with pytest.raises(ValueError, match="CUDA step table does not take deep"):
        pydiff._C.pack_step_params([ops.step_params(history_output=1)])


def toy(x, t):
    tt = (t.astype(np.float32) / np.float32(1000)).reshape((-1,) + (1,) * (x.ndim - 1))
    return (np.float32(0.8) * x + np.float32(0.3) * np.sin(x * (np.float32(1) + tt))).astype(np.float32)


@pytest.mark.parametrize(
    "sampler,cfg",
    [
        ("dpmpp_3m", dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9)),
        ("pndm", dict(prediction_type="v_prediction")),
        ("pndm", {}),
        ("heun", dict(prediction_type="sample", clip_sample=True)),
        ("euler_ancestral", {}),
        ("dpmpp_2m_sde", dict(use_karras_sigmas=True)),
        (
            "unipc",
            dict(solver_order=3, thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9),
        ),
        ("unipc", dict(solver_type="bh1", prediction_type="v_prediction", disable_corrector=(1,))),
        ("lcm", dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.8)),
        ("lcm", dict(original_inference_steps=20)),
    ],
)
def test_samplers_native_match_reference(sampler, cfg):
    schedule = pydiff.Schedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **cfg)
    x_T = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    got = pydiff.sample(toy, x_T, schedule=schedule, sampler=sampler, steps=9, seed=3)
    want = pydiff.sample(toy, x_T, schedule=schedule, sampler=sampler, steps=9, seed=3, backend="reference")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lcm_draws_kernel_noise_between_steps_and_none_after_the_last():
    schedule = pydiff.Schedule.from_config({"_class_name": "LCMScheduler"})
    x_T = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    one = [pydiff.sample(toy, x_T, schedule=schedule, sampler="lcm", steps=1, seed=s) for s in (1, 2)]
    np.testing.assert_array_equal(one[0], one[1])  # a single step returns f(x_T, 999): no noise
    four = [pydiff.sample(toy, x_T, schedule=schedule, sampler="lcm", steps=4, seed=s) for s in (1, 1, 2)]
    np.testing.assert_array_equal(four[0], four[1])
    assert np.abs(four[0] - four[2]).max() > 1e-3


@pytest.mark.parametrize("sampler", ["unipc", "lcm"])
def test_new_samplers_inpaint_by_repaint(sampler):
    schedule = pydiff.Schedule.from_config(
        {"_class_name": "LCMScheduler" if sampler == "lcm" else "UniPCMultistepScheduler"}
    )
    rng = np.random.default_rng(4)
    x_T, image = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    mask = np.zeros((1, 1) + SHAPE[2:], np.float32)
    mask[..., :4, :] = 1.0
    out = pydiff.repaint(toy, x_T, image, mask, schedule=schedule, sampler=sampler, steps=6, jump_length=2,
                         jump_n_sample=2, seed=0)  # fmt: skip
    np.testing.assert_array_equal(out[..., 4:, :], image[..., 4:, :])  # the kept region, exactly
    assert np.all(np.isfinite(out)) and np.abs(out[..., :4, :] - image[..., :4, :]).max() > 1e-2


def test_unipc_runs_alone_in_step_batching():
    # fused_step_rows keeps one x0 per row: StepScheduler.accepts reads history_slots
    assert pydiff.samplers.SAMPLERS["unipc"].history_slots == 3
    assert pydiff.samplers.SAMPLERS["lcm"].history_slots == 1 and not pydiff.samplers.LCM.uses_x0_history
