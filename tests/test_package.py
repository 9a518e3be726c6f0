"""Model package loading and validation (docs/model-package.md), on tiny synthetic packages."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("onnx")

from pydiff.package import PackageError, load_package  # noqa: E402
from pydiff.tools.testing import make_tiny_package  # noqa: E402


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return make_tiny_package(tmp_path_factory.mktemp("pkg") / "tiny")


@pytest.fixture
def pkg(tiny_src, tmp_path):
    """A fresh copy to break."""
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_src, dst)
    return dst


def edit(pkg, fn):
    m = json.loads((pkg / "manifest.json").read_text())
    fn(m)
    (pkg / "manifest.json").write_text(json.dumps(m))


def backend_for(path):
    from pydiff.backends import create_backend

    return create_backend("onnxruntime", load_package(path))


def expect(pkg, *fragments):
    with pytest.raises(PackageError) as ei:
        backend_for(pkg)
    msg = str(ei.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def test_valid_package_loads(pkg):
    p = load_package(pkg)
    assert p.stage_names == ["base", "sr16"]
    assert p.stages[1].is_super_resolution and not p.stages[0].is_super_resolution
    assert p.text_encoder.max_length == 6
    be = backend_for(pkg)
    assert set(be.stage_models) == {"base", "sr16"}
    assert issubclass(PackageError, ValueError)


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(PackageError, match="does not exist"):
        load_package(tmp_path / "nope")
    with pytest.raises(PackageError, match="manifest.json"):
        load_package(tmp_path)


@pytest.mark.parametrize(
    "text,frag",
    [
        ("{not json", "invalid JSON at line 1"),
        ("[1, 2]", "top level"),
        ('{"format": "pydiff-package", "version": NaN}', "NaN"),
    ],
)
def test_corrupt_manifest(pkg, text, frag):
    (pkg / "manifest.json").write_text(text)
    expect(pkg, "manifest.json", frag)


@pytest.mark.parametrize(
    "mutate,frags",
    [
        (lambda m: m.update(version=2), ["version", "unsupported"]),
        (lambda m: m.update(version="1"), ["version", "integer"]),
        (lambda m: m.update(format="other"), ["format"]),
        (lambda m: m.pop("stages"), ["stages", "missing"]),
        (lambda m: m.update(stages=[]), ["stages", "non-empty"]),
        (lambda m: m["stages"][0].pop("resolution"), ["stages[0].resolution", "missing"]),
        (lambda m: m["stages"][0].update(resolution="8"), ["stages[0].resolution", "integer"]),
        (lambda m: m["stages"][0].update(resolution=True), ["stages[0].resolution"]),
        (lambda m: m["stages"][0].update(resolution=100000), ["stages[0].resolution", "1..4096"]),
        (lambda m: m["stages"][1].update(channels=-1), ["stages[1].channels"]),
        (lambda m: m["stages"][0].update(conditioning="audio"), ["stages[0].conditioning"]),
        (lambda m: m["stages"][0].update(prediction_type="noise"), ["stages[0].prediction_type"]),
        (lambda m: m["stages"][0].update(inputs=["sample"]), ["stages[0].inputs", "timestep"]),
        (lambda m: m["stages"][0].update(inputs="sample"), ["stages[0].inputs"]),
        (lambda m: m["stages"][0]["inputs"].append("bogus"), ["stages[0].inputs", "bogus"]),
        (lambda m: m["stages"][1].update(name="base"), ["stages[1].name", "duplicate"]),
        (lambda m: m["stages"][1].update(low_res_resolution=4), ["stages[1].low_res_resolution"]),
        (lambda m: m["stages"][1]["noise_aug"].update(level=5000), ["stages[1].noise_aug.level"]),
        (
            lambda m: m["stages"][1]["noise_aug"].update(level=300, max_level=250),  # never trained on
            ["stages[1].noise_aug.level", "0..250"],
        ),
        (lambda m: m["stages"][1]["noise_aug"].update(max_level=1000), ["stages[1].noise_aug.max_level"]),
        (lambda m: m["stages"][1].pop("noise_aug"), ["stages[1].noise_aug", "missing"]),
        (lambda m: m["stages"][0]["recommended"].update(steps=0), ["stages[0].recommended.steps"]),
        (
            lambda m: m["stages"][0]["recommended"].update(guidance_scale="x"),
            ["stages[0].recommended.guidance_scale"],
        ),
        (
            lambda m: m["stages"][0]["recommended"].update(thresholding="max"),
            ["stages[0].recommended.thresholding"],
        ),
        (
            lambda m: m["stages"][0]["scheduler"].update(prediction_type="sample"),
            ["stages[0].scheduler.prediction_type", "disagrees"],
        ),
        (lambda m: m["text_encoder"].update(max_length=0), ["text_encoder.max_length"]),
        (lambda m: m.pop("text_encoder"), ["no text_encoder"]),
        (lambda m: m["stages"][0].update(onnx="/etc/passwd"), ["stages[0].onnx", "relative"]),
        (lambda m: m["stages"][0].update(onnx="../x.onnx"), ["stages[0].onnx", ".."]),
        (lambda m: m["stages"][0].update(onnx="missing.onnx"), ["stages[0].onnx", "does not exist"]),
        (lambda m: m["stages"][0].update(onnx="text_encoder"), ["stages[0].onnx", "not a regular file"]),
        (lambda m: m["stages"][0].update(onnx=3), ["stages[0].onnx", "string"]),
        (lambda m: m["text_encoder"].update(tokenizer="nope.json"), ["text_encoder.tokenizer"]),
    ],
)
def test_manifest_errors_name_file_and_key(pkg, mutate, frags):
    edit(pkg, mutate)
    msg = expect(pkg, *frags)
    assert "manifest.json" in msg


def test_symlink_escaping_package_is_rejected(pkg, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(pkg / "base.onnx", outside)
    os.symlink(outside, pkg / "link.onnx")
    edit(pkg, lambda m: m["stages"][0].update(onnx="link.onnx"))
    expect(pkg, "stages[0].onnx", "leaves the package")


def test_empty_and_truncated_onnx(pkg):
    data = (pkg / "sr16.onnx").read_bytes()
    (pkg / "sr16.onnx").write_bytes(data[: len(data) // 2])
    expect(pkg, "sr16.onnx", "cannot load")
    (pkg / "sr16.onnx").write_bytes(b"")
    expect(pkg, "sr16.onnx", "empty")


def test_corrupt_tokenizer(pkg):
    (pkg / "text_encoder" / "tokenizer.json").write_text("{ nope")
    expect(pkg, "tokenizer.json", "cannot load the text encoder")


def test_onnx_inputs_disagreeing_with_manifest(pkg):
    # the manifest says the SR stage has no noise_level input, the graph has one
    edit(pkg, lambda m: m["stages"][1]["inputs"].remove("noise_level"))
    expect(pkg, "sr16.onnx", "noise_level", "disagree")


def test_onnx_output_name_disagreeing(pkg):
    edit(pkg, lambda m: m["stages"][0].update(output="eps"))
    expect(pkg, "base.onnx", "outputs", "eps")


def test_onnx_static_shape_disagreeing(pkg):
    # the graph was built for 8x8; a manifest claiming 12x12 must be caught (a real SR stage
    # would then also disagree, so point the SR stage's low_res_resolution along)
    edit(pkg, lambda m: (m["stages"][0].update(resolution=12), m["stages"][1].update(low_res_resolution=12)))
    expect(pkg, "base.onnx", "sample", "axis 2")


def test_onnx_stage_swapped_for_another_conditioning(pkg, tmp_path):
    cls = make_tiny_package(tmp_path / "cls", conditioning="class")
    shutil.copy(cls / "base.onnx", pkg / "base.onnx")
    expect(pkg, "base.onnx", "class_labels")


def test_class_and_none_packages_load(tmp_path):
    c = load_package(make_tiny_package(tmp_path / "c", conditioning="class", num_classes=3))
    assert c.text_encoder is None and c.stages[0].num_classes == 3
    n = load_package(make_tiny_package(tmp_path / "n", conditioning="none", mask_channel=True))
    assert n.stages[0].has_mask_channel


def test_class_without_num_classes(tmp_path):
    p = make_tiny_package(tmp_path / "c", conditioning="class")
    edit(p, lambda m: m["stages"][0].update(num_classes=None))
    with pytest.raises(PackageError, match=r"stages\[0\].num_classes"):
        load_package(p)


@pytest.mark.parametrize(
    "inpaint,frag",
    [
        ({"jump_n_sample": 0}, "stages[0].recommended.inpaint.jump_n_sample"),
        ({"jump_length": "10"}, "stages[0].recommended.inpaint.jump_length"),
        ({"eta": -1}, "stages[0].recommended.inpaint.eta"),
        ({"inpaint": {}}, "stages[0].recommended.inpaint.inpaint"),
        ([1], "stages[0].recommended.inpaint"),
    ],
)
def test_bad_inpaint_recommendation(pkg, inpaint, frag):
    edit(pkg, lambda m: m["stages"][0]["recommended"].__setitem__("inpaint", inpaint))
    expect(pkg, "manifest.json", frag)


def test_inpaint_recommendation_loads(pkg):
    edit(
        pkg,
        lambda m: m["stages"][0]["recommended"].__setitem__(
            "inpaint", {"guidance_scale": 1.0, "jump_length": 5, "jump_n_sample": 3}
        ),
    )
    assert load_package(pkg).stages[0].recommended["inpaint"]["jump_n_sample"] == 3
