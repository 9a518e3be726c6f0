"""What a newcomer trips on (issue 17), each fixed and kept fixed here."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import pydiff
from pydiff.errors import PackageError
from pydiff.package import bundled_packages, load_package

# -- a bundled package's name is accepted everywhere a package is


def test_bundled_name_is_a_package_everywhere():
    assert {"digits", "shapes"} <= set(bundled_packages())
    kw = dict(class_label=[3, 7], steps=2, output_type="numpy", progress=False, seed=11)
    by_load = pydiff.load("digits").generate(**kw)
    by_generate = pydiff.generate(model="digits", **kw)
    np.testing.assert_array_equal(by_load, by_generate)
    assert load_package("digits").name == load_package(load_package("digits").path).name
    assert pydiff.Pipeline("digits").package.path == load_package("digits").path
    assert load_package(None).name == "shapes"


def test_a_path_wins_over_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # a folder called "digits" here: the path is meant, and it is empty
    with pytest.raises(PackageError, match="manifest.json"):
        pydiff.load("digits")


def test_unknown_package_name_lists_the_bundled_ones():
    with pytest.raises(PackageError, match=r"does not exist.*bundled packages: digits, shapes"):
        pydiff.load("no-such-package")


# -- a prompt that names a classifier class is its label


def test_classifier_guidance_takes_a_class_name_as_prompt():
    pipe = pydiff.load("shapes")
    names = pipe.package.guidance_model("classifier").class_names
    prompt = "a red circle on a blue background"
    plan = pipe.plan(prompt=prompt, guidance_type="classifier", steps=2)
    assert plan.class_labels == [names.index(prompt)]
    two = pipe.plan(prompt=[names[5], names[9]], guidance_type="classifier", steps=2)
    assert two.class_labels == [5, 9]
    # the guided stage runs on the empty prompt (the classifier carries the condition): as with a label
    kw = dict(
        guidance_type="classifier", steps={"base": 3, "sr64": 1}, output_type="numpy", progress=False, seed=2
    )
    by_prompt = pipe.generate(prompt, **kw)
    by_label = pipe.generate(class_label=names.index(prompt), **kw)
    assert by_prompt.shape == by_label.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match=r"not one of the 168 class_names.*class_names"):
        pipe.plan(prompt="a red circle on a blue backdrop", guidance_type="classifier")


def test_classifier_guidance_by_prompt_matches_by_label_on_the_guided_stage():
    """Base stage alone (the SR stage sees the prompt's text only when a prompt is given)."""
    pipe = pydiff.load("shapes")
    names = pipe.package.guidance_model("classifier").class_names
    seen = {}

    def keep(tag):
        def cb(stage, i, t, x):
            if stage == "base":
                seen[tag] = x.copy()

        return cb

    kw = dict(
        guidance_type="classifier", steps={"base": 3, "sr64": 1}, output_type="numpy", progress=False, seed=4
    )
    pipe.generate(names[40], callback=keep("prompt"), **kw)
    pipe.generate(class_label=40, callback=keep("label"), **kw)
    np.testing.assert_array_equal(seen["prompt"], seen["label"])


# -- the benchmark's torch peer is built from the package's own weights


@pytest.mark.parametrize("name", ["shapes", "digits"])
def test_torch_networks_from_the_package_weights(name):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from pydiff.tools.bench import check_same_networks
    from pydiff.tools.training.from_package import torch_modules

    pipe = pydiff.load(name)
    err = check_same_networks(pipe, torch_modules(pipe.package))
    assert set(err) == set(pipe.stages) and max(err.values()) <= 1e-4, err


@pytest.mark.parametrize("kind", ["class", "text", "sr", "inpaint"])
def test_exported_file_rebuilds_its_torch_network(kind, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from test_export_package import _perturbed
    from test_models_unet import KINDS

    from pydiff.tools.export.onnx_export import export_stage_onnx
    from pydiff.tools.training.from_package import torch_module, write_network_config

    cfg = KINDS[kind]
    m = _perturbed(cfg)
    rep = export_stage_onnx(
        m,
        cfg.input_names(),
        tmp_path / "net.onnx",
        channels=cfg.in_channels,
        resolution=8,
        max_length=8,
        text_dim=cfg.text_dim or 384,
        num_classes=cfg.num_classes or 10,
        fp16_weights=True,
    )
    write_network_config(rep["tmp_path"], cfg.to_dict())
    back = torch_module(rep["tmp_path"])
    want = m.state_dict()  # rounded to float16 in place by the export
    got = back.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_a_foreign_onnx_file_is_a_clear_error(tmp_path):
    pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from pydiff.tools.training.from_package import torch_module

    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(g), str(tmp_path / "f.onnx"))
    with pytest.raises(PackageError, match="no 'pydiff.network' metadata"):
        torch_module(tmp_path / "f.onnx")


# -- a diffusers config without _class_name takes its class's defaults


def test_dpm_solver_config_without_class_name():
    cfg = {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
    }
    with pytest.warns(UserWarning, match="taken as DPMSolverMultistepScheduler"):
        s = pydiff.Schedule.from_config(cfg)
    named = pydiff.Schedule.from_config({**cfg, "_class_name": "DPMSolverMultistepScheduler"})
    assert s == named
    assert s.clip_sample is False and s.timestep_spacing == "linspace"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a config with its class says so: no warning
        pydiff.Schedule.from_config({**cfg, "_class_name": "DPMSolverMultistepScheduler"})
        assert pydiff.Schedule.from_config({"num_train_timesteps": 1000}).clip_sample is True  # DDPM's


def test_dpm_solver_config_without_class_name_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    cfg = {"num_train_timesteps": 1000, "beta_schedule": "linear", "algorithm_type": "dpmsolver++"}
    with pytest.warns(UserWarning):
        s = pydiff.Schedule.from_config(cfg)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    ref.set_timesteps(20)
    np.testing.assert_array_equal(pydiff.timesteps(s, 20, "dpmpp_2m"), ref.timesteps.numpy())


def test_bench_runs_from_a_checkout_without_training_runs(tmp_path, monkeypatch):
    """`pydiff bench` needs no runs/ folder: the peer's networks come from the package itself."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from pydiff.tools.bench import run_benchmark

    monkeypatch.chdir(tmp_path)  # no runs/ here
    rep = run_benchmark(batch=1, steps=2, repeats=1, warmup=0, progress=False, threads=1)
    assert max(rep["max_abs_network_diff"].values()) <= 1e-4
    assert rep["max_abs_image_diff"] <= 2e-2, rep["max_abs_image_diff"]
    assert set(rep["sides"]) == {"pydiff", "torch"}
