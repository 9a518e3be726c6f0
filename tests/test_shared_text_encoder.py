"""A package may use a bundled package's text encoder file instead of shipping a copy."""

from __future__ import annotations

import json
import shutil

import pytest

from pydiff.errors import PackageError
from pydiff.package import bundled_path, load_package


def _copy_without_encoder(tmp_path, text_encoder):
    src = bundled_path("shapes")
    dst = tmp_path / "pkg"
    dst.mkdir()
    for f in ("base.onnx", "sr64.onnx"):
        shutil.copyfile(src / f, dst / f)
    m = json.loads((src / "manifest.json").read_text())
    m["text_encoder"] = text_encoder
    m.pop("guidance_models", None)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_a_shared_text_encoder_is_the_bundled_packages_file(tmp_path):
    pkg = load_package(_copy_without_encoder(tmp_path, {"shared": "shapes"}))
    shapes = load_package("shapes")
    assert pkg.text_encoder == shapes.text_encoder
    assert pkg.text_encoder.onnx.parent.parent == bundled_path("shapes")


@pytest.mark.parametrize(
    "te, said",
    [
        ({"shared": "no-such-package"}, "text_encoder.shared"),
        ({"shared": "digits"}, "has no text encoder"),
        ({"shared": "shapes", "max_length": 16}, "no other keys"),
        ({"shared": 3}, "expected a string"),
    ],
)
def test_a_bad_shared_text_encoder_is_named(tmp_path, te, said):
    with pytest.raises(PackageError, match=said):
        load_package(_copy_without_encoder(tmp_path, te))
