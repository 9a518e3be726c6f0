"""The cascaded pipeline on ONNX Runtime, on tiny synthetic packages (no bundled models, no torch)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

import pydiff  # noqa: E402
from pydiff import imageio  # noqa: E402
from pydiff.pipeline import Pipeline, load  # noqa: E402
from pydiff.tools.testing import make_tiny_package  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NEUTRAL_CWD = (
    Path(__file__).resolve().parent
)  # tests/: no pydiff/ here, so subprocesses import the installed one


def _native() -> bool:
    try:
        from pydiff import ops

        return bool(ops.native_available())
    except Exception:
        return False


@pytest.fixture(autouse=True)
def core_backend(monkeypatch):
    """Run on the NumPy reference sampler where the native module is not built."""
    if not _native():
        monkeypatch.setattr(pydiff, "sample", functools.partial(pydiff.sample, backend="reference"))


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkgs")
    return {
        "text": make_tiny_package(root / "text"),
        "class": make_tiny_package(root / "class", conditioning="class", num_classes=4),
        "mask": make_tiny_package(root / "mask", conditioning="none", mask_channel=True),
        "dpm": make_tiny_package(root / "dpm", sampler="dpmpp_2m", steps=5),
    }


@pytest.fixture(scope="module")
def text_pipe(pkgs):
    return load(pkgs["text"])


@pytest.fixture(scope="module")
def class_pipe(pkgs):
    return load(pkgs["class"])


def gen(pipe, *args, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("output_type", "numpy")
    return pipe.generate(*args, **kw)


@pytest.fixture
def no_work(monkeypatch):
    """Any sampling or text encoding fails the test: validation must come first."""

    def boom(*a, **k):
        raise AssertionError("work started before the input was validated")

    monkeypatch.setattr(pydiff, "sample", boom)
    return boom


# ------------------------------------------------------------------------------- the cascade


def test_text_cascade_shapes_and_range(text_pipe):
    out = gen(text_pipe, ["a red circle", "a blue square"], num_images=3, seed=0)
    assert out.shape == (6, 16, 16, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    pil = text_pipe.generate("a red circle", seed=0, progress=False)
    assert len(pil) == 1 and pil[0].size == (16, 16) and pil[0].mode == "RGB"


def test_pil_and_numpy_agree(text_pipe):
    a = gen(text_pipe, "a red circle", seed=4)
    b = text_pipe.generate("a red circle", seed=4, progress=False)
    assert np.abs(np.asarray(b[0], np.float32) / 255.0 - a[0]).max() <= 0.5 / 255 + 1e-6


def test_same_seed_same_images_other_seed_other_images(text_pipe):
    a = gen(text_pipe, "a red circle", num_images=2, seed=7)
    b = gen(text_pipe, "a red circle", num_images=2, seed=7)
    c = gen(text_pipe, "a red circle", num_images=2, seed=8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.05
    assert np.abs(a[0] - a[1]).max() > 0.05  # images in a batch differ


def test_prompt_changes_image(text_pipe):
    a = gen(text_pipe, "a red circle", seed=1)
    b = gen(text_pipe, "green triangle", seed=1)
    assert np.abs(a - b).max() > 0.01


def test_negative_prompt(text_pipe):
    a = gen(text_pipe, "a red circle", seed=1)
    b = gen(text_pipe, "a red circle", seed=1, negative_prompt="blue")
    assert np.abs(a - b).max() > 0.01


def test_per_sample_guidance_scales(text_pipe):
    prompts = ["a red circle", "a blue square"]
    both = gen(text_pipe, prompts, seed=3, guidance_scale=[1.0, 5.0])
    ones = gen(text_pipe, prompts, seed=3, guidance_scale=[1.0, 1.0])
    fives = gen(text_pipe, prompts, seed=3, guidance_scale=5.0)
    # sample 0 gets scale 1 in both batches; sample 1 matches the all-5 batch
    np.testing.assert_allclose(both[0], ones[0], atol=2e-5)
    np.testing.assert_allclose(both[1], fives[1], atol=2e-5)
    assert np.abs(both[1] - ones[1]).max() > 0.01
    # one scale per prompt expands over num_images
    per_prompt = gen(text_pipe, prompts, num_images=2, seed=3, guidance_scale=[1.0, 5.0])
    per_image = gen(text_pipe, prompts, num_images=2, seed=3, guidance_scale=[1.0, 1.0, 5.0, 5.0])
    np.testing.assert_array_equal(per_prompt, per_image)


def test_per_stage_settings(text_pipe):
    a = gen(text_pipe, "red", seed=2, steps={"base": 3}, guidance_scale={"sr16": 1.0})
    b = gen(text_pipe, "red", seed=2, steps={"base": 3, "sr16": 4}, guidance_scale={"base": 2.0, "sr16": 1.0})
    np.testing.assert_array_equal(a, b)
    c = gen(text_pipe, "red", seed=2, sampler={"sr16": "ddpm"}, thresholding={"base": "static"})
    assert c.shape == (1, 16, 16, 3)
    d = gen(text_pipe, "red", seed=2, noise_aug_level={"sr16": 0})
    e = gen(text_pipe, "red", seed=2, noise_aug_level=999)
    assert np.abs(d - e).max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_every_sampler_runs_and_is_deterministic(text_pipe, sampler):
    a = gen(text_pipe, "red", seed=5, sampler=sampler, steps=3)
    b = gen(text_pipe, "red", seed=5, sampler=sampler, steps=3)
    np.testing.assert_array_equal(a, b)


def test_class_conditional(class_pipe):
    a = gen(class_pipe, class_label=[0, 3], num_images=2, seed=0)
    assert a.shape == (4, 16, 16, 3)
    u = gen(class_pipe, seed=0)  # unconditional: label num_classes
    b = gen(class_pipe, class_label=0, seed=0)
    assert np.abs(u - b).max() > 0.01


def test_mask_channel_package(pkgs):
    p = load(pkgs["mask"])
    out = gen(p, num_images=2, seed=1)
    assert out.shape == (2, 16, 16, 3)
    img = (out[0] * 255).astype(np.uint8)
    m = np.zeros((16, 16), bool)
    m[4:12, 4:12] = True
    r = p.inpaint(img, m, seed=2, progress=False, output_type="numpy")
    assert r.shape == (1, 16, 16, 3)


def test_dpm_package_recommended_sampler(pkgs):
    p = load(pkgs["dpm"])
    assert gen(p, "red", seed=0).shape == (1, 16, 16, 3)


# ------------------------------------------------------------------------------- editing


def _image(seed=0, size=16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_inpaint_keeps_known_region(text_pipe):
    img = _image()
    mask = np.zeros((16, 16), np.uint8)
    mask[3:11, 5:13] = 255
    out = text_pipe.inpaint(img, mask, "a red circle", seed=0, progress=False, output_type="numpy")
    orig = img.astype(np.float32) / 255
    keep = mask == 0
    assert np.abs(out[0][keep] - orig[keep]).max() < 1e-5
    assert np.abs(out[0][~keep] - orig[~keep]).max() > 0.05
    again = text_pipe.inpaint(img, mask, "a red circle", seed=0, progress=False, output_type="numpy")
    np.testing.assert_array_equal(out, again)


def test_inpaint_resampling(text_pipe, monkeypatch):
    if not _native():
        monkeypatch.setattr(pydiff, "repaint", functools.partial(pydiff.repaint, backend="reference"))
    img = _image(2)
    mask = np.zeros((16, 16), np.uint8)
    mask[2:10, 6:14] = 255
    kw = dict(seed=4, progress=False, output_type="numpy")
    one = text_pipe.inpaint(img, mask, "a red circle", jump_n_sample=1, **kw)
    two = text_pipe.inpaint(
        img, mask, "a red circle", jump_n_sample={"base": 3, "sr16": 2}, jump_length=2, **kw
    )
    keep = mask == 0
    orig = img.astype(np.float32) / 255
    assert np.abs(two[0][keep] - orig[keep]).max() < 1e-5
    assert np.abs(two[0][~keep] - one[0][~keep]).max() > 0.01
    seen = []
    text_pipe.inpaint(
        img,
        mask,
        "a red circle",
        jump_n_sample=3,
        jump_length=2,
        callback=lambda stage, i, t, x: seen.append((stage, i)),
        **kw,
    )
    steps = text_pipe.plan(kind="inpaint", image=img, mask=mask).settings["base"].steps
    want = [op[1] for op in pydiff.repaint_schedule(steps, 2, 3) if op[0] == "step"]
    assert [i for st, i in seen if st == "base"] == want


def test_inpaint_settings_come_from_recommended_inpaint(pkgs, tmp_path):
    import json
    import shutil

    dst = tmp_path / "p"
    shutil.copytree(pkgs["text"], dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["stages"][0]["recommended"]["inpaint"] = {"guidance_scale": 1.0, "jump_n_sample": 4, "jump_length": 2}
    (dst / "manifest.json").write_text(json.dumps(m))
    p = load(dst)
    img, mask = _image(), np.ones((16, 16), bool)
    ip = p.plan(prompt="red", kind="inpaint", image=img, mask=mask).settings
    assert ip["base"].as_dict()["guidance_scale"] == 1.0
    assert (ip["base"].jump_n_sample, ip["base"].jump_length) == (4, 2)
    assert (ip["sr16"].jump_n_sample, ip["sr16"].jump_length) == (1, 10)  # the fallback
    gp = p.plan(prompt="red").settings["base"]  # generating ignores the inpaint block
    assert gp.as_dict()["guidance_scale"] == 2.0 and gp.jump_n_sample is None
    mine = p.plan(
        prompt="red", kind="inpaint", image=img, mask=mask, jump_n_sample={"base": 2}, guidance_scale=3.0
    ).settings["base"]
    assert mine.jump_n_sample == 2 and mine.as_dict()["guidance_scale"] == 3.0


def test_bundled_shapes_recommends_resampling_for_inpainting():
    p = load()
    s = p.plan(
        prompt="a red circle on a blue background",
        kind="inpaint",
        image=np.zeros((64, 64, 3), np.uint8),
        mask=np.ones((64, 64), bool),
    ).settings
    assert (s["base"].jump_n_sample, s["base"].jump_length) == (10, 10)
    assert s["base"].as_dict()["guidance_scale"] == 3.0
    assert s["sr64"].jump_n_sample == 1


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(jump_n_sample=0), "jump_n_sample for stage 'base' must be a positive integer"),
        (dict(jump_length=1.5), "jump_length for stage 'base' must be a positive integer"),
        (dict(jump_n_sample={"nope": 2}), "unknown stage 'nope'"),
        (dict(jump_n_sample=10**4, jump_length=1), "10000-step limit"),
        (dict(jump_n_sample=2, jump_length=4), "jump_length 4 must be less than the 4 steps of stage 'base'"),
    ],
)
def test_bad_resampling_settings(text_pipe, kw, match):
    with pytest.raises(ValueError, match=match):
        text_pipe.plan(prompt="red", kind="inpaint", image=_image(), mask=np.ones((16, 16), bool), **kw)
    with pytest.raises(ValueError, match="RePaint's inpainting settings"):
        text_pipe.plan(prompt="red", jump_n_sample=2)


def test_img2img_strength(text_pipe):
    img = _image(1)
    orig = img.astype(np.float32) / 255
    weak = text_pipe.img2img(img, "red", strength=0.25, seed=0, steps=8, progress=False, output_type="numpy")
    strong = text_pipe.img2img(img, "red", strength=1.0, seed=0, steps=8, progress=False, output_type="numpy")
    assert np.abs(weak[0] - orig).mean() < np.abs(strong[0] - orig).mean()
    per_stage = text_pipe.img2img(
        img, "red", strength={"base": 0.5}, seed=0, progress=False, output_type="numpy"
    )
    assert per_stage.shape == (1, 16, 16, 3)
    # one number sets every stage; a dict sets the stages it names (the others: 1)
    s = text_pipe.plan(prompt="red", kind="img2img", image=img, strength=0.5).settings
    assert (s["base"].strength, s["sr16"].strength) == (0.5, 0.5)
    s = text_pipe.plan(prompt="red", kind="img2img", image=img, strength={"sr16": 0.5}).settings
    assert (s["base"].strength, s["sr16"].strength) == (1.0, 0.5)


def test_upscale(text_pipe):
    small = _image(2, 8)
    out = text_pipe.upscale(small, "red", seed=0, progress=False)
    assert out[0].size == (16, 16)
    big = text_pipe.upscale(_image(2, 32), "red", seed=0, progress=False)  # resized to 8x8 first
    assert big[0].size == (16, 16)
    a = text_pipe.upscale(small, "red", seed=0, progress=False, output_type="numpy")
    b = text_pipe.upscale(small, "red", seed=0, progress=False, output_type="numpy")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="not a super-resolution stage"):
        text_pipe.upscale(small, stage="base")


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,exc,frag",
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=-3), ValueError, "steps"),
        (dict(steps=2.5), TypeError, "steps"),
        (dict(steps={"nope": 3}), ValueError, "unknown stage 'nope'"),
        (dict(guidance_scale={"sr99": 1.0}), ValueError, "unknown stage 'sr99'"),
        (dict(sampler="lms"), ValueError, "unknown sampler 'lms'"),
        (dict(sampler={"sr16": "lms"}), ValueError, "unknown sampler 'lms'"),
        (dict(guidance_scale=float("nan")), ValueError, "finite"),
        (dict(guidance_scale=float("inf")), ValueError, "finite"),
        (dict(guidance_scale=[1.0, float("nan")]), ValueError, "finite"),
        (dict(guidance_scale=[1.0, 2.0, 3.0]), ValueError, "guidance scales"),
        (dict(thresholding="max"), ValueError, "thresholding"),
        (dict(eta=0.5, sampler="dpmpp_2m"), ValueError, "eta"),
        (dict(eta=-1.0), ValueError, "eta"),
        (dict(noise_aug_level=1000), ValueError, "noise_aug_level"),
        (dict(noise_aug_level={"base": 3}), ValueError, "not a super-resolution stage"),
        (dict(num_images=0), ValueError, "num_images"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed="1"), ValueError, "seed"),
        (dict(output_type="jpeg"), ValueError, "output_type"),
        (dict(class_label=1), ValueError, "not class-conditional"),
        (dict(callback=3), TypeError, "callback"),
    ],
)
def test_bad_generate_input_fails_before_work(text_pipe, no_work, kwargs, exc, frag):
    with pytest.raises(exc, match=frag):
        text_pipe.generate(["a", "b"], progress=False, **kwargs)


def test_bad_prompts(text_pipe, class_pipe, no_work):
    with pytest.raises(TypeError, match="prompt"):
        text_pipe.generate(3)
    with pytest.raises(ValueError, match="empty"):
        text_pipe.generate([])
    with pytest.raises(ValueError, match="not text-conditional"):
        class_pipe.generate("a red circle")
    with pytest.raises(ValueError, match="out of range"):
        class_pipe.generate(class_label=4)
    with pytest.raises(TypeError, match="class_label"):
        class_pipe.generate(class_label="cat")


def test_bad_images_fail_before_work(text_pipe, no_work):
    from PIL import Image

    img = _image()
    gray = Image.fromarray(img[:, :, 0], mode="L")
    with pytest.raises(ValueError, match="grayscale"):
        text_pipe.img2img(gray, "red")
    with pytest.raises(ValueError, match="grayscale"):
        text_pipe.img2img(img[:, :, 0], "red")
    with pytest.raises(ValueError, match="RGBA"):
        text_pipe.img2img(Image.fromarray(img).convert("RGBA"), "red")
    with pytest.raises(ValueError, match="must match"):
        text_pipe.inpaint(img, np.zeros((8, 8), bool), "red")
    with pytest.raises(ValueError, match="square"):
        text_pipe.img2img(np.zeros((16, 12, 3), np.uint8), "red")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        text_pipe.img2img(np.full((16, 16, 3), 2.0, np.float32), "red")
    with pytest.raises(TypeError, match="path"):
        text_pipe.img2img("photo.png", "red")
    with pytest.raises(ValueError, match="strength"):
        text_pipe.img2img(img, "red", strength=0.0)
    with pytest.raises(ValueError, match="strength"):
        text_pipe.img2img(img, "red", strength=1.5)
    with pytest.raises(ValueError, match="no step"):
        text_pipe.img2img(img, "red", strength=0.1, steps=4)
    with pytest.raises(ValueError, match="mask is required"):
        text_pipe.inpaint(img, None, "red")
    with pytest.raises(ValueError, match="unknown stage"):
        text_pipe.upscale(img, stage="sr99")


def test_unknown_backend(pkgs):
    with pytest.raises(ValueError, match="unknown backend"):
        load(pkgs["text"], backend="tensorflow")


# ------------------------------------------------------------------------------- robustness


def test_threads_give_the_same_images_as_sequential_calls(text_pipe):
    jobs = [
        ("a red circle", 11),
        ("a blue square", 12),
        ("green triangle", 13),
        ("yellow circle on a red background", 14),
        ("a red circle", 11),
        ("", 15),
    ]
    sequential = [gen(text_pipe, p, seed=s, num_images=2) for p, s in jobs]
    results = [None] * len(jobs)
    errors = []
    barrier = threading.Barrier(len(jobs))

    def work(k):
        try:
            barrier.wait()
            results[k] = gen(text_pipe, jobs[k][0], seed=jobs[k][1], num_images=2)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for a, b in zip(sequential, results):
        np.testing.assert_array_equal(a, b)


def test_ctrl_c_during_sampling_leaves_pipeline_usable(text_pipe):
    before = gen(text_pipe, "a red circle", seed=21)
    calls = []

    def interrupt(stage, i, t, x):
        calls.append((stage, i))
        if stage == "sr16":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gen(text_pipe, "a red circle", seed=21, callback=interrupt, progress=True)
    assert calls[-1][0] == "sr16"
    after = gen(text_pipe, "a red circle", seed=21)
    np.testing.assert_array_equal(before, after)


def test_user_callback_sees_every_step_and_can_replace_x(text_pipe):
    seen = []

    def cb(stage, i, t, x):
        seen.append(stage)
        return np.zeros_like(x) if stage == "sr16" else None

    out = gen(text_pipe, "red", seed=0, callback=cb, steps={"base": 3, "sr16": 2})
    assert seen == ["base"] * 3 + ["sr16"] * 2
    np.testing.assert_allclose(out, 0.5, atol=1e-6)  # x = 0 in [-1, 1] is grey


def test_module_level_api_caches_pipelines(pkgs):
    from pydiff import pipeline as api

    api.clear_cache()
    a = api.generate("red", model=str(pkgs["text"]), seed=1, progress=False, output_type="numpy")
    assert len(api._cache) == 1
    b = api.generate("red", model=pkgs["text"], seed=1, progress=False, output_type="numpy")
    assert len(api._cache) == 1
    np.testing.assert_array_equal(a, b)
    img = (a[0] * 255).astype(np.uint8)
    assert api.img2img(img, "red", model=pkgs["text"], seed=0, progress=False)[0].size == (16, 16)
    assert api.upscale(img[::2, ::2], "red", model=pkgs["text"], seed=0, progress=False)[0].size == (16, 16)
    m = np.zeros((16, 16), bool)
    m[:8] = True
    assert api.inpaint(img, m, "red", model=pkgs["text"], seed=0, progress=False)[0].size == (16, 16)
    assert isinstance(api.load(pkgs["text"]), Pipeline)
    api.clear_cache()


def test_generate_does_not_import_torch(pkgs):
    script = textwrap.dedent(f"""
        import functools, sys
        import pydiff, pydiff.cli
        from pydiff import ops
        if not ops.native_available():
            pydiff.sample = functools.partial(pydiff.sample, backend="reference")
        from pydiff.pipeline import load
        p = load({str(pkgs["text"])!r})
        imgs = p.generate("a red circle", seed=0, progress=False)
        import numpy as np
        p.inpaint(imgs[0], np.ones((16, 16), bool), "red", progress=False)
        assert imgs[0].size == (16, 16)
        bad = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
        assert not bad, bad
        print("ok")
    """)
    env = dict(os.environ)  # the installed pydiff: run from a folder that has no pydiff/ in it
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, cwd=NEUTRAL_CWD
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------------- numerics


def test_upsample_bilinear_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for h, s in [(8, 16), (16, 64), (5, 13), (16, 16)]:
        x = rng.standard_normal((2, 3, h, h)).astype(np.float32)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x), size=(s, s), mode="bilinear", align_corners=False
        ).numpy()
        np.testing.assert_allclose(imageio.upsample_bilinear(x, s), ref, rtol=1e-5, atol=1e-6)


def test_noise_augmentation_follows_the_format(text_pipe, monkeypatch):
    """low_res = sqrt(abar[level]) up + sqrt(1 - abar[level]) n with the documented draws."""
    seen = {}
    model = text_pipe.backend.model("sr16")
    orig_call = type(model).__call__

    def spy(self, x, t, cond=None):
        if self.stage.name == "sr16" and "low_res" not in seen:
            seen["low_res"] = np.array(cond["low_res"][:1])
            seen["noise_level"] = np.array(cond["noise_level"][:1])
        return orig_call(self, x, t, cond)

    monkeypatch.setattr(type(model), "__call__", spy)
    x0 = {}

    def cb(stage, i, t, x):
        if stage == "base":
            x0["base"] = x

    gen(text_pipe, "red", seed=9, callback=cb, guidance_scale=1.0)
    rng = np.random.Generator(np.random.PCG64(9))
    rng.standard_normal((1, 3, 8, 8), dtype=np.float32)  # base x_T
    rng.standard_normal((1, 3, 16, 16), dtype=np.float32)  # sr16 x_T
    n = rng.standard_normal((1, 3, 16, 16), dtype=np.float32)  # augmentation noise
    abar = text_pipe._aug_schedules["sr16"].alphas_cumprod[100]
    up = imageio.upsample_bilinear(np.clip(x0["base"], -1, 1), 16)
    np.testing.assert_allclose(
        seen["low_res"], np.sqrt(abar) * up + np.sqrt(1 - abar) * n, rtol=1e-5, atol=1e-5
    )
    assert seen["noise_level"][0] == 100.0


def test_torch_backend_matches_onnxruntime(pkgs):
    pytest.importorskip("torch")
    from pydiff.tools.testing import tiny_torch_modules

    path = pkgs["text"]
    mods = tiny_torch_modules(path)
    tp = load(path, backend="torch", modules=mods)
    op = load(path)
    a = op.generate(["a red circle", "blue"], seed=3, progress=False, output_type="numpy")
    b = tp.generate(["a red circle", "blue"], seed=3, progress=False, output_type="numpy")
    # the documented cross-backend tolerance (docs: 1e-3 in [0, 1] pixel units)
    np.testing.assert_allclose(a, b, atol=1e-3)
    with pytest.raises(pydiff.package.PackageError, match="torch.nn.Module"):
        load(path, backend="torch", modules={"base": mods["base"]})


# ------------------------------------------------------------------------------- the real model


def test_bundled_shapes_red_circle_on_blue(tmp_path):
    """The bundled shapes cascade draws what it is asked for (the analytic shapes reader)."""
    from pydiff.pipeline import bundled_path

    if not (bundled_path("shapes") / "manifest.json").is_file():
        pytest.skip("the bundled shapes package is not built yet")
    from pydiff.tools.eval.packages import read_shape

    pipe = load()
    imgs = pipe.generate(
        "a red circle on a blue background", num_images=4, seed=0, progress=False, output_type="numpy"
    )
    found = [read_shape(img) for img in imgs]
    hits = [(r["fg"], r["shape"], r["bg"]) == ("red", "circle", "blue") for r in found]
    assert sum(hits) >= 2, found
    # the command line the README starts with
    from pydiff.cli import main

    out = tmp_path / "red.png"
    assert (
        main(["generate", "a red circle on a blue background", "--out", str(out), "-q", "--seed", "0"]) == 0
    )
    assert out.is_file()


def test_inpaint_evaluation(tmp_path):
    """`pydiff eval shapes-inpaint`: both tasks, the settings that ran recorded, fixed cases."""
    from PIL import Image

    from pydiff.pipeline import bundled_path
    from pydiff.tools.eval.packages import evaluate_shapes_inpaint, inpaint_cases

    if not (bundled_path("shapes") / "manifest.json").is_file():
        pytest.skip("the bundled shapes package is not built yet")
    rep = evaluate_shapes_inpaint(
        None, n=2, steps={"base": 12, "sr64": 4}, jump_length={"base": 4}, save_grid=str(tmp_path / "g.png")
    )
    assert rep["n"] == 2 and set(rep) >= {"complete", "replace", "seconds", "settings"}
    assert set(rep["complete"]) == {"alignment", "fg", "shape", "bg", "masked_psnr_db"}
    assert set(rep["replace"]) == {"alignment", "fg", "shape", "bg", "fill_error"}
    base = rep["settings"]["base"]  # the package's inpainting recommendation, and the overrides
    assert (base["steps"], base["jump_length"], base["jump_n_sample"], base["guidance_scale"]) == (
        12,
        4,
        10,
        3.0,
    )
    assert rep["settings"]["sr64"]["jump_n_sample"] == 1
    assert Image.open(tmp_path / "g.png").size == (2 * 66 * 2, 4 * 66 * 2)
    few, more = inpaint_cases(2, seed=3), inpaint_cases(5, seed=3)  # cases[:k] do not depend on n
    for a, b in zip(few, more):
        for task in ("complete", "replace"):
            assert a[task][1:] == b[task][1:] and np.array_equal(a[task][0], b[task][0])
        assert a[task][0].any() and not a[task][0].all()
    with pytest.raises(ValueError, match="n must be at least 1, got 0"):
        evaluate_shapes_inpaint(None, n=0)


def test_img2img_evaluation(tmp_path):
    """`pydiff eval shapes-img2img`: per edit and strength, alignment and the layout kept; at a
    tiny strength the image is nearly untouched, so the layout IoU is high."""
    from PIL import Image

    from pydiff.pipeline import bundled_path
    from pydiff.tools.eval.packages import evaluate_shapes_img2img

    if not (bundled_path("shapes") / "manifest.json").is_file():
        pytest.skip("the bundled shapes package is not built yet")
    rep = evaluate_shapes_img2img(
        None, n=2, strengths=(0.15, 1.0), steps={"base": 10, "sr64": 8}, save_grid=str(tmp_path / "g.png")
    )
    assert rep["n"] == 2 and rep["strengths"] == [0.15, 1.0]
    for task in ("recolour", "reshape"):
        low, full = rep[task]
        assert (low["strength"], full["strength"]) == (0.15, 1.0)
        assert low["layout_iou"] > 0.7 and 0.0 <= full["layout_iou"] <= 1.0
        assert 0.0 <= low["alignment"] <= 1.0
    assert rep["settings"]["base"]["steps"] == 10 and rep["settings"]["base"]["strength"] == 1.0
    assert Image.open(tmp_path / "g.png").size == (2 * 66 * 2, 5 * 66 * 2)  # originals + 2 x 2 rows
    with pytest.raises(ValueError, match="n must be at least 1, got 0"):
        evaluate_shapes_img2img(None, n=0)


def test_sr_stage_evaluation(tmp_path):
    """`pydiff eval shapes-sr`: the SR stage alone on rendered low-resolution images, with bilinear
    upsampling of the same inputs beside it; a package without an SR stage is refused by name."""
    from pydiff.pipeline import bundled_path
    from pydiff.tools.eval.packages import evaluate_shapes_sr

    if not (bundled_path("shapes") / "manifest.json").is_file():
        pytest.skip("the bundled shapes package is not built yet")
    rep = evaluate_shapes_sr(None, n=3, seed=1, steps=3, save_grid=str(tmp_path / "g.png"))
    assert rep["stage"] == "sr64" and rep["n"] == 3
    # the settings the stage ran with: the override and the package's recommendations
    assert rep["settings"]["steps"] == 3 and rep["settings"]["sampler"] == "dpmpp_2m"
    assert rep["settings"]["guidance_scale"] == 1.0
    # bilinear upsampling of a 16x16 area mean of a render still reads back right, and is close
    assert rep["bilinear"]["alignment"] == 1.0 and rep["bilinear"]["psnr_db"] > 20
    assert 0.0 <= rep["sr"]["alignment"] <= 1.0 and 5 < rep["sr"]["psnr_db"] < 60
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (3 * 66 * 2, 3 * 66 * 2)  # originals, bilinear, SR
    with pytest.raises(ValueError, match="no super-resolution stage"):
        evaluate_shapes_sr(bundled_path("digits"), n=1)
    with pytest.raises(ValueError, match="n must be at least 1, got 0"):
        evaluate_shapes_sr(None, n=0)
    # the bundled (v-prediction) SR stage at its recommended settings: every image reads back right
    # and is closer to the original than bilinear upsampling (the eps stage before it: 0.5 of 40
    # right, 6 dB below bilinear)
    rep = evaluate_shapes_sr(None, n=4, seed=1)
    assert rep["sr"]["alignment"] == 1.0 and rep["sr"]["psnr_db"] > rep["bilinear"]["psnr_db"], rep


def test_a_noise_augmentation_level_above_the_trained_one_is_refused():
    import pydiff

    pipe = (
        pydiff.load()
    )  # the bundled shapes cascade: sr64 was trained on levels 0..250 (its manifest's max_level)
    assert pipe.package.stage("sr64").noise_aug_max_level == 250
    with pytest.raises(ValueError, match=r"0\.\.250 \(the levels stage 'sr64' was trained on\), got 600"):
        pipe.plan(prompt="red", noise_aug_level=600)
    pipe.plan(prompt="red", noise_aug_level=250)


def test_resize_by_an_integer_factor_is_the_area_mean_of_training():
    from pydiff import imageio
    from pydiff.tools.data.shapes import area_resize

    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(imageio.resize(x, 16), area_resize(x, 16), atol=1e-6)
    assert imageio.resize(x, 24).shape == (2, 3, 24, 24)  # not a divisor: bicubic
