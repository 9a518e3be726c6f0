"""Classifier-free guidance in an interval of noise levels (Kynkaanniemi et al. 2024): guided steps
exactly where sigma_t is in (lo, hi], one network pass elsewhere, the same x as a hand-written loop;
the setting through sample, the pipeline, the manifest and the CLI; bad intervals refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import pydiff
from pydiff import cli
from pydiff.errors import PackageError
from pydiff.samplers import make_sampler
from pydiff.tools.testing import make_tiny_package

SCHEDULE = pydiff.Schedule(beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing="trailing")
B, SHAPE = 2, (3, 4, 4)


def model_factory(log):
    """An eps model whose output depends on x, t and the condition, recording each call's rows."""

    def model(x, t, c):
        log.append(x.shape[0])
        return (0.3 * x + 0.01 * t[:, None, None, None] / 1000 + c[:, None, None, None]).astype(np.float32)

    return model


def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, *SHAPE), dtype=np.float32)
    return x, np.array([0.2, -0.4], np.float32), np.zeros(B, np.float32)


def noise_level(t: int) -> float:
    abar = float(SCHEDULE.alphas_cumprod[t])
    return math.sqrt((1.0 - abar) / abar)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
@pytest.mark.parametrize("interval", [(0.5, 4.0), (0.0, 1.0), (2.0, 1e30)])
def test_guided_steps_and_x_match_a_hand_written_loop(sampler, interval):
    x, cond, uncond = inputs()
    log: list[int] = []
    got = pydiff.sample(model_factory(log), x, schedule=SCHEDULE, sampler=sampler, steps=12,
                        guidance_scale=4.0, guidance_interval=interval, cond=cond, uncond=uncond,
                        seed=3)  # fmt: skip
    # the loop written out: guide where sigma_t (from the schedule's alphas_cumprod) is in (lo, hi]
    smp = make_sampler(sampler, SCHEDULE, 12)
    ref_log: list[int] = []
    model = model_factory(ref_log)
    xr = x.copy()
    for i, t in enumerate(smp.timesteps):
        tt = np.full(B, t, np.float32)
        if interval[0] < noise_level(int(t)) <= interval[1]:
            out = model(np.concatenate([xr, xr]), np.concatenate([tt, tt]), np.concatenate([cond, uncond]))
            xr = smp.step(out, xr, i, guidance_scale=4.0, seed=3)
        else:
            xr = smp.step(model(xr, tt, cond), xr, i, seed=3)
    assert log == ref_log and set(log) == {B, 2 * B}, log  # some steps of each kind
    np.testing.assert_array_equal(got, xr)


def test_the_whole_range_is_plain_guidance_and_an_empty_one_none():
    x, cond, uncond = inputs()
    kw = dict(schedule=SCHEDULE, sampler="ddim", steps=8, cond=cond, seed=1)
    plain = pydiff.sample(model_factory([]), x, guidance_scale=3.0, uncond=uncond, **kw)
    every = pydiff.sample(
        model_factory([]), x, guidance_scale=3.0, uncond=uncond, guidance_interval=(0, 1e38), **kw
    )
    np.testing.assert_array_equal(plain, every)
    log: list[int] = []
    never = pydiff.sample(
        model_factory(log), x, guidance_scale=3.0, uncond=uncond, guidance_interval=(1e3, 1e4), **kw
    )
    np.testing.assert_array_equal(never, pydiff.sample(model_factory([]), x, **kw))
    assert set(log) == {B}


@pytest.mark.parametrize(
    "bad, error, words",
    [
        ((5.0, 1.0), ValueError, "below"),
        ((1.0, 1.0), ValueError, "below"),
        ((-0.1, 1.0), ValueError, ">= 0"),
        ((0.0, float("nan")), ValueError, "finite"),
        ((0.0, 1e39), ValueError, "float32"),
        ((0.0, 1.0, 2.0), TypeError, "pair"),
        ("everything", TypeError, "pair"),
        ((True, 2.0), TypeError, "number"),
        (("0", 2.0), TypeError, "number"),
    ],
)
def test_bad_intervals_are_refused_before_any_work(bad, error, words):
    x, cond, uncond = inputs()
    log: list[int] = []
    with pytest.raises(error, match="guidance_interval") as e:
        pydiff.sample(model_factory(log), x, schedule=SCHEDULE, steps=4, guidance_scale=2.0,
                      guidance_interval=bad, cond=cond, uncond=uncond)  # fmt: skip
    assert words in str(e.value) and log == []


@pytest.fixture(scope="module")
def shapes():
    return pydiff.load("shapes")


def test_pipeline_per_stage_interval_settings_and_calls(shapes):
    rows: list[tuple] = []
    models = shapes.backend.stage_models

    class Counting:
        def __init__(self, name, inner):
            self.name, self.inner, self.stage = name, inner, getattr(inner, "stage", None)

        def __call__(self, x, t, c=None):
            rows.append((self.name, x.shape[0], float(t[0])))
            return self.inner(x, t, c)

    shapes.backend.stage_models = {k: Counting(k, m) for k, m in models.items()}
    try:
        kw = dict(seed=0, steps={"base": 10, "sr64": 3}, progress=False, output_type="numpy")
        img = shapes.generate(
            "a red circle on a blue background", guidance_interval={"base": [0.5, 4.0]}, **kw
        )
        base = [(n, t) for s, n, t in rows if s == "base"]
        sched = shapes.schedule("base")
        for n, t in base:
            abar = float(sched.alphas_cumprod[int(t)])
            assert (n == 2) == (0.5 < math.sqrt((1 - abar) / abar) <= 4.0), (n, t)
        assert {n for n, _ in base} == {1, 2}
        assert img.settings["base"]["guidance_interval"] == [0.5, 4.0]
        assert "guidance_interval" not in img.settings["sr64"]
        rows.clear()
        plain = shapes.generate("a red circle on a blue background", guidance_interval="all", **kw)
        assert {n for s, n, _ in rows if s == "base"} == {2} and "guidance_interval" not in plain.settings[
            "base"
        ]
        assert np.abs(np.asarray(img) - np.asarray(plain)).max() > 0.01
    finally:
        shapes.backend.stage_models = models
    with pytest.raises(ValueError, match="guidance_interval for stage 'base'"):
        shapes.plan(prompt="x", guidance_interval={"base": [3, 2]})
    with pytest.raises(ValueError, match="guidance_interval: unknown stage 'sr99'"):
        shapes.plan(prompt="x", guidance_interval={"sr99": [0, 2]})


def _with_recommendation(tmp_path, interval):
    pkg = make_tiny_package(tmp_path / "tiny", steps=6)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["stages"][0]["recommended"]["guidance_scale"] = 3.0
    manifest["stages"][0]["recommended"]["guidance_interval"] = interval
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    return pkg


def test_the_manifest_recommends_an_interval_and_a_call_overrides_it(tmp_path):
    pkg = _with_recommendation(tmp_path, [0.5, 4.0])
    pipe = pydiff.load(str(pkg))
    first = pipe.package.stages[0].name
    assert pipe.plan(prompt="x").settings[first].guidance_interval == (0.5, 4.0)
    assert pipe.plan(prompt="x", guidance_interval="all").settings[first].guidance_interval is None
    assert pipe.plan(prompt="x", guidance_interval=[1, 2]).settings[first].guidance_interval == (1.0, 2.0)


@pytest.mark.parametrize("bad", [[4.0, 0.5], [0.5], "some", [0, 1e39]])
def test_a_bad_recommended_interval_is_a_package_error_naming_it(tmp_path, bad):
    with pytest.raises(PackageError, match=r"recommended\.guidance_interval"):
        pydiff.load(str(_with_recommendation(tmp_path, bad)))


def test_cli_guidance_interval(tmp_path, capsys):
    pkg = make_tiny_package(tmp_path / "tiny", steps=4)
    out = tmp_path / "x.png"
    rc = cli.main(["generate", "red", "--model", str(pkg), "--guidance", "3", "--guidance-interval",
                   "0.5,4", "--out", str(out), "--json-out", str(tmp_path / "x.json"), "-q"])  # fmt: skip
    assert rc == 0 and out.is_file()
    report = json.loads((tmp_path / "x.json").read_text())
    assert [s.get("guidance_interval") for s in report["stages"].values()] == [[0.5, 4.0]] * 2
    for bad in ("1", "4,0.5", "0,nan", "a,b"):
        rc = cli.main(["generate", "red", "--model", str(pkg), "--guidance-interval", bad, "--out",
                       str(tmp_path / "y.png"), "-q"])  # fmt: skip
        assert rc == 2, bad
        assert "guidance" in capsys.readouterr().err
        assert not (tmp_path / "y.png").exists()
