"""SDEdit starts at the level the sampler's step runs at, for every sampler: diffusers' add_noise of
the same scheduler (the Euler family's fractional timesteps and sigma spacings included), moved to
pydiff's x = alpha x0 + sigma eps."""

from __future__ import annotations

import numpy as np
import pytest

from pydiff.pipeline.pipeline import _noised_to_step
from pydiff.pipeline.settings import StageSettings
from pydiff.schedules import Schedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

BASE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CASES = [
    ("ddim", "DDIMScheduler", {}),
    ("euler", "EulerDiscreteScheduler", {}),
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("heun", "HeunDiscreteScheduler", {}),
]


def settings(sampler: str) -> StageSettings:
    return StageSettings(sampler=sampler, steps=10, guidance_scale=np.ones(1, np.float32), eta=0.0,
                         thresholding="none", dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                         clip_sample_range=1.0, noise_aug_level=None)  # fmt: skip


@pytest.mark.parametrize("sampler, cls, extra", CASES)
def test_the_start_is_diffusers_add_noise(sampler, cls, extra):
    config = {"_class_name": cls, **BASE, **extra}
    if cls == "DDIMScheduler":
        config["clip_sample"] = False
    peer = getattr(diffusers, cls).from_config(config)
    peer.set_timesteps(10)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    start = 4
    got = _noised_to_step(Schedule.from_config(config), settings(sampler), start, image, noise)
    t = peer.timesteps[start : start + 1]
    want = peer.add_noise(torch.from_numpy(image), torch.from_numpy(noise), t).numpy()
    if hasattr(peer, "sigmas") and cls != "DDIMScheduler":
        sigma = float(
            peer.sigmas[peer.index_for_timestep(t[0]) if hasattr(peer, "index_for_timestep") else start]
        )
        if cls != "DPMSolverMultistepScheduler":  # the Euler family's sample is x / alpha
            want = want / np.sqrt(sigma**2 + 1)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
