"""The call conventions diffusers users type (issue 22), on the bundled shapes cascade: aliases,
`generator=`, the result object, and per-image seeds (an image is the same alone or in a batch)."""

from __future__ import annotations

import numpy as np
import pytest

import pydiff
from pydiff.pipeline.requests import GenerateRequest, image_seed
from pydiff.pipeline.result import ImageArray, ImageList

FAST = dict(steps={"base": 4, "sr64": 2}, progress=False)
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return pydiff.load("shapes")


def test_aliases_mean_the_same(pipe):
    a = pipe.generate(PROMPT, seed=3, num_images=2, output_type="numpy", **FAST)
    b = pipe.generate(
        PROMPT,
        generator=3,
        num_images_per_prompt=2,
        num_inference_steps=FAST["steps"],
        output_type="np",
        height=64,
        width=64,
        progress=False,
    )
    assert np.array_equal(a, b)
    assert b.settings["base"]["steps"] == 4 and b.settings["sr64"]["steps"] == 2


@pytest.mark.parametrize(
    "kwargs, frag",
    [
        (dict(height=32), "makes 64x64 images"),
        (dict(width=63), "makes 64x64 images"),
        (dict(steps=3, num_inference_steps=5), "give one of them"),
        (dict(num_images=2, num_images_per_prompt=3), "give one of them"),
        (dict(seed=1, generator=1), "not both"),
        (dict(generator=[1, 2, 3], num_images=2), "one per image"),
        (dict(generator=[1, -2], num_images=2), r"generator\[1\]"),
        (dict(generator="7"), "numpy.random.Generator"),
        (dict(latents=np.zeros((2, 3, 8, 8), np.float32)), "latents"),
        (dict(output_type="jpeg"), "output_type"),
    ],
)
def test_bad_conventions_fail_before_work(pipe, kwargs, frag):
    with pytest.raises((ValueError, TypeError), match=frag):
        pipe.plan(GenerateRequest(prompt=PROMPT, **kwargs))


def test_torch_generator_is_refused_with_the_translation(pipe):
    class Generator:  # stands in for torch.Generator: judged by its module
        __module__ = "torch"

    with pytest.raises(TypeError, match=r"generator=s"):
        pipe.plan(GenerateRequest(prompt=PROMPT, generator=Generator()))


def test_result_object_is_the_old_list(pipe):
    r = pipe.generate([PROMPT, "a green square"], num_images=2, seed=5, **FAST)
    assert isinstance(r, ImageList) and isinstance(r, list) and len(r) == 4
    assert r.images == list(r) and r[0] is r.images[0] and type(r[1:3]) is list
    assert [im.size for im in r] == [(64, 64)] * 4
    assert r.seeds == [image_seed(5, j) for j in range(4)] and r.seeds[0] == 5
    assert r.settings["base"]["sampler"] == "dpmpp_2m"
    arr = pipe.generate(PROMPT, seed=5, output_type="np", **FAST)
    assert isinstance(arr, ImageArray) and isinstance(arr, np.ndarray) and arr.shape == (1, 64, 64, 3)
    assert type(arr.images) is np.ndarray and arr.seeds == [5]


def test_random_seed_is_reported_and_remakes_the_image(pipe):
    r = pipe.generate(PROMPT, output_type="np", **FAST)
    again = pipe.generate(PROMPT, seed=r.seeds[0], output_type="np", **FAST)
    assert np.array_equal(r, again)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_an_image_is_the_same_alone_or_anywhere_in_a_batch(pipe, sampler):
    """Each image depends only on its own seed (x_T, augmentation noise, in-kernel noise)."""
    kw = dict(FAST, sampler=sampler, output_type="np")
    batch = pipe.generate([PROMPT, "a green square on a white background"], num_images=2, seed=11, **kw)
    for j in range(4):
        prompt = PROMPT if j < 2 else "a green square on a white background"
        alone = pipe.generate(prompt, seed=batch.seeds[j], **kw)
        # the network at batch 1 rounds differently (ulps), nothing more: not the 0.5 of batch-wide draws
        assert np.abs(alone[0] - batch[j]).max() < 1e-4, j
    shuffled = pipe.generate(PROMPT, num_images=2, generator=[batch.seeds[1], batch.seeds[0]], **kw)
    assert np.abs(shuffled[0] - batch[1]).max() < 1e-4 and np.abs(shuffled[1] - batch[0]).max() < 1e-4


def test_numpy_generator_draws_the_seeds(pipe):
    a = pipe.generate(PROMPT, num_images=2, generator=np.random.default_rng(0), output_type="np", **FAST)
    b = pipe.generate(PROMPT, num_images=2, generator=np.random.default_rng(0), output_type="np", **FAST)
    assert a.seeds == b.seeds and np.array_equal(a, b)
    g = np.random.default_rng(0)
    g.integers(0, 2**53, size=2)
    c = pipe.generate(PROMPT, num_images=2, generator=g, output_type="np", **FAST)  # the generator moved on
    assert c.seeds != a.seeds


def test_latents_replace_x_T(pipe):
    plan = pipe.plan(GenerateRequest(prompt=PROMPT, seed=2, num_images=2, **FAST))
    x_T = pipe.stage_inputs(plan, plan.stages[0], pipe.generators(plan), pipe.text_conditions(plan), None)[0]
    a = pipe.generate(PROMPT, seed=2, num_images=2, output_type="np", **FAST)
    b = pipe.generate(PROMPT, seed=2, num_images=2, latents=x_T, output_type="np", **FAST)
    assert np.array_equal(a, b)
    c = pipe.generate(PROMPT, seed=2, num_images=2, latents=-x_T, output_type="np", **FAST)
    assert np.abs(a - c).max() > 0.05


def test_latent_output_is_the_unclipped_sample(pipe):
    lat = pipe.generate(PROMPT, seed=4, output_type="latent", **FAST)
    img = pipe.generate(PROMPT, seed=4, output_type="np", **FAST)
    assert lat.shape == (1, 3, 64, 64)
    assert np.allclose(np.clip((lat.transpose(0, 2, 3, 1) + 1) / 2, 0, 1), img, atol=1e-6)


def test_stage_inputs_still_takes_one_generator(pipe):
    """The serving scheduler's contract: one Generator for the whole batch draws as before."""
    plan = pipe.plan(GenerateRequest(prompt=PROMPT, seed=9, num_images=2, **FAST))
    st = plan.stages[0]
    text = pipe.text_conditions(plan)
    x_one = pipe.stage_inputs(plan, st, np.random.Generator(np.random.PCG64(9)), text, None)[0]
    want = np.random.Generator(np.random.PCG64(9)).standard_normal(x_one.shape, dtype=np.float32)
    assert np.array_equal(x_one, want)
    x_per = pipe.stage_inputs(plan, st, pipe.generators(plan), text, None)[0]
    assert np.array_equal(x_per[0], want[0]) and not np.array_equal(x_per[1], want[1])


def test_callback_on_step_end(pipe):
    seen = []

    def on_step_end(p, i, t, kw):
        seen.append((i, int(t), kw["latents"].shape))
        return kw

    a = pipe.generate(PROMPT, seed=1, callback_on_step_end=on_step_end, output_type="np", **FAST)
    assert [s[0] for s in seen] == [0, 1, 2, 3, 0, 1]  # base's 4 steps, then sr64's 2
    assert seen[0][2] == (1, 3, 16, 16) and seen[-1][2] == (1, 3, 64, 64)

    def darken(p, i, t, kw):
        return {"latents": kw["latents"] - 0.5} if i == 1 and kw["latents"].shape[-1] == 64 else kw

    b = pipe.generate(PROMPT, seed=1, callback_on_step_end=darken, output_type="np", **FAST)
    assert b.mean() < a.mean() - 0.1
    with pytest.raises(ValueError, match="only \\['latents'\\]"):
        pipe.plan(
            GenerateRequest(
                prompt=PROMPT,
                callback_on_step_end=darken,
                callback_on_step_end_tensor_inputs=["prompt_embeds"],
            )
        )
