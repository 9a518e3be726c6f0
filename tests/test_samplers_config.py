"""Schedule.from_config: each diffusers class's own defaults, the refusals, and real checkpoints'
configs (tests/scheduler_configs/) loading and sampling as diffusers samples them."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import pydiff
from pydiff.schedules import SCHEDULER_CLASSES, sampler_for_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_samplers_parity import check, diffusers_loop, pydiff_loop  # noqa: E402

CONFIGS = Path(__file__).parent / "scheduler_configs"


@pytest.mark.parametrize("cls", sorted(SCHEDULER_CLASSES))
def test_each_class_gets_its_own_defaults(cls):
    cfg = {"_class_name": cls, **({"skip_prk_steps": True} if cls == "PNDMScheduler" else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = pydiff.Schedule.from_config(cfg)
    sig = inspect.signature(getattr(diffusers, cls).__init__).parameters
    spec = SCHEDULER_CLASSES[cls]
    for key in spec.keys:
        want = sig[key].default
        got = getattr(s, key)
        if want is None or got is None:
            continue  # None: the sampler's own, which is the class's (tests/test_samplers_parity.py)
        assert got == (tuple(want) if isinstance(want, list) else want), (cls, key, got, want)
    if "clip_sample" not in spec.keys:  # the class never clips
        assert s.clip_sample is False and s.thresholding is False, cls


def test_keys_another_class_reads_change_nothing():
    # Euler ancestral never clips or thresholds, whatever its config says (diffusers ignores the keys)
    s = pydiff.Schedule.from_config(
        {"_class_name": "EulerAncestralDiscreteScheduler", "clip_sample": True, "thresholding": True}
    )
    assert not s.clip_sample and not s.thresholding and s.timestep_spacing == "linspace"
    assert (
        pydiff.Schedule.from_config({"_class_name": "EulerDiscreteScheduler"}).timestep_spacing == "linspace"
    )
    assert pydiff.Schedule.from_config({"_class_name": "DDIMScheduler"}).timestep_spacing == "leading"


@pytest.mark.parametrize(
    "config,fragment",
    [
        ({"_class_name": "KDPM2AncestralDiscreteScheduler"}, "euler_ancestral"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, "flow matching"),
        ({"_class_name": "EDMEulerScheduler", "sigma_min": 0.002}, "EDM"),
        ({"_class_name": "NoSuchScheduler"}, "has no pydiff sampler"),
        ({"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}, "EDM or flow-matching"),
        ({"shift": 3.0, "num_train_timesteps": 1000}, "EDM or flow-matching"),
        ({"use_karras_sigmas": True}, "add the _class_name"),
        ({"_class_name": "PNDMScheduler"}, "skip_prk_steps defaults to False"),
        ({"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"}, "interpolation_type"),
        ({"_class_name": "EulerDiscreteScheduler", "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        (
            {
                "_class_name": "DPMSolverMultistepScheduler",
                "algorithm_type": "sde-dpmsolver++",
                "solver_order": 3,
            },
            "solver_order=3",
        ),
        ({"_class_name": "DDPMScheduler", "variance_type": "learned_range"}, "fixed_small"),
        ({"_class_name": "UniPCMultistepScheduler", "predict_x0": False}, "predict_x0"),
        ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True}, "use_flow_sigmas"),
        ({"_class_name": "UniPCMultistepScheduler", "solver_type": "bh3"}, "solver_type"),
        ({"_class_name": "LCMScheduler", "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"_class_name": "LCMScheduler", "timestep_scaling": 0}, "timestep_scaling"),
        (
            {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "use_beta_sigmas": True},
            "at most one",
        ),
    ],
)
def test_what_pydiff_cannot_sample_is_refused_by_name(config, fragment):
    with pytest.raises(pydiff.ScheduleError, match=fragment):
        pydiff.Schedule.from_config(config)


def test_sampler_for_config():
    dpm = {"_class_name": "DPMSolverMultistepScheduler"}
    assert sampler_for_config(dpm) == "dpmpp_2m"
    assert sampler_for_config({**dpm, "algorithm_type": "sde-dpmsolver++"}) == "dpmpp_2m_sde"
    assert sampler_for_config({**dpm, "solver_order": 3}) == "dpmpp_3m"
    assert sampler_for_config({"_class_name": "HeunDiscreteScheduler"}) == "heun"
    assert sampler_for_config({"_class_name": "UniPCMultistepScheduler"}) == "unipc"
    assert sampler_for_config({"_class_name": "LCMScheduler"}) == "lcm"
    assert sampler_for_config({}) == "ddpm"


def test_to_config_writes_sampler_options_only_when_set():
    for cls in ("DDPMScheduler", "DDIMScheduler"):
        s = pydiff.Schedule.from_config({"_class_name": cls})
        assert not {"use_karras_sigmas", "solver_order", "final_sigmas_type"} & s.to_config().keys()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert pydiff.Schedule.from_config(s.to_config()) == s
    s = pydiff.Schedule.from_config({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True})
    assert s.to_config()["use_karras_sigmas"] is True


REAL = [
    "sd15_pndm.json",
    "sd21_768_v_ddim.json",
    "sdxl_euler.json",
    "dpmpp_2m_karras.json",
    "sd15_unipc.json",
    "sd15_lcm.json",
]


@pytest.mark.parametrize("name", REAL)
def test_real_checkpoint_configs_load_and_sample_as_diffusers(name):
    path = CONFIGS / name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pydiff.Schedule.from_config(path)
    # LCM samples at guidance 1-2 (LCM-LoRA's advice); at 7.5 the toy model makes each LCM step amplify
    # x's rounding about 4x, so 12 steps compound float32's 1e-7 (test_lcm_steps_agree_one_by_one)
    check(json.loads(path.read_text()), steps=12, guidance=1.5 if "lcm" in name else 7.5)


@pytest.mark.parametrize("name", ["if_stage1_ddpm.json", "if_stage2_ddpm.json"])
def test_deepfloyd_if_configs_refuse_learned_variances_and_sample_with_fixed_ones(name):
    path = CONFIGS / name
    with pytest.raises(pydiff.ScheduleError, match="learned_range.*fixed_small"):
        pydiff.Schedule.from_config(path)
    cfg = {**json.loads(path.read_text()), "variance_type": "fixed_small"}
    x_T = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = diffusers_loop(cfg, x_T, 12, guidance=4.0)
    got = pydiff_loop(cfg, x_T, 12, guidance=4.0)
    # IF's dynamic thresholding at t = 999 is sensitive to 1e-7 changes (the existing parity tests' 2e-3)
    assert np.abs(got - want).max() <= 2e-3 * max(1.0, float(np.abs(want).max()))
