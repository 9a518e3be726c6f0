"""Every command's bad input ends as exit 2 with one line naming the problem, never as 1 (exit 1
is kept for pydiff's own bugs) (issue 18, part 5). In-process, for speed: cli.main returns the code."""

from __future__ import annotations

import functools
import struct
import zlib

import pytest

pytest.importorskip("onnx")

from PIL import Image  # noqa: E402

import pydiff  # noqa: E402
from pydiff import cli, ops  # noqa: E402
from pydiff.tools.testing import make_tiny_package  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("exit_codes")
    Image.new("RGB", (16, 16)).save(root / "in.png")
    Image.new("L", (16, 16), 255).save(root / "mask.png")

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)  # a size Pillow refuses to decode
    (root / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )
    (root / "not.onnx").write_bytes(b"this is not a model")
    return {"root": root, "text": make_tiny_package(root / "text")}


@pytest.fixture(autouse=True)
def core_backend(monkeypatch):
    if not ops.native_available():
        monkeypatch.setattr(pydiff, "sample", functools.partial(pydiff.sample, backend="reference"))


def run(capsys, argv):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


IMAGE_CASES = [
    ("generate", "red", "--guidance", "1e39"),
    ("generate", "red", "--guidance", "1,1e39"),
    ("generate", "red", "--eta", "1e39"),
    ("generate", "red", "--noise-aug-level", "99999999999999999999999"),
    ("generate", "red", "--seed", "-1"),
    ("generate", "red", "--num-images", "100000000"),
    ("generate", "red", "--steps", "1000000000"),
    ("generate", "a\udcffb"),  # bytes that are not UTF-8, as Python receives them
    ("generate", "red", "--negative-prompt", "\ud800"),
    ("generate", "red", "--classifier-scale", "1e39"),
    ("generate", "red", "--out", "{root}/" + "a" * 250 + ".png"),
    ("generate", "red", "--out", "-", "--json"),
    ("generate", "red", "--out", "-", "--num-images", "2", "--no-grid"),
    ("generate", "red", "--json-out", "-", "--json"),
    ("img2img", "{root}/in.png", "red", "--strength", "1e39"),
    ("img2img", "{root}/bomb.png", "red"),
    ("img2img", "{root}/not.onnx", "red"),
    ("upscale", "{root}/bomb.png", "red"),
    ("upscale", "{root}/in.png", "red", "--stage", "nope"),
    ("inpaint", "{root}/in.png", "{root}/bomb.png", "red"),
    ("inpaint", "{root}/in.png", "{root}/mask.png", "red", "--jump-length", "0"),
    ("generate", "red", "--model", "{root}/none"),
]


@pytest.mark.parametrize("args", IMAGE_CASES, ids=lambda a: " ".join(a)[:60])
def test_image_commands_bad_input_exits_2(files, capsys, args):
    root = files["root"]
    argv = [a.format(root=root) for a in args]
    if "--model" not in argv:
        argv += ["--model", files["text"]]
    if "--out" not in argv:
        argv += ["--out", root / "x.png"]
    rc, err = run(capsys, argv + ["-q"])
    assert rc == 2, (rc, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pydiff") and "internal error" not in err, err
    assert not (root / "x.png").exists()


def test_info_bad_arguments_exit_2(capsys):
    assert run(capsys, ["info", "--bogus"])[0] == 2


TOOL_CASES = [
    ("train", "digits", "--out", "{root}/r", "--steps", "-5"),
    ("train", "digits", "--out", "{root}/r", "--batch-size", "0"),
    ("train", "digits", "--out", "{root}/r", "--lr", "nan"),
    ("train", "digits", "--out", "{root}/r", "--ema-decay", "2"),
    ("train", "shapes-base", "--out", "{root}/r"),
    ("export", "digits", "--out", "{root}/e", "--run", "{root}/none"),
    ("export", "float16", "{root}/not.onnx", "{root}/x.onnx"),
    ("export", "static-shapes", "{root}/not.onnx"),
    ("export", "ort-placement", "{root}/not.onnx"),
    ("export", "float16", "{root}/none.onnx", "{root}/x.onnx"),
    ("eval", "shapes", "--model", "{root}/none"),
    ("guidance", "export-classifier", "--out", "{root}/c.onnx", "--run", "{root}/none"),
    ("bench", "--model", "{root}/none"),
    ("bench", "--batch", "0"),
    ("bench", "--guidance", "1e39"),
    ("bench", "--run", "base"),
]


@pytest.mark.parametrize("args", TOOL_CASES, ids=lambda a: " ".join(a)[:60])
def test_tool_commands_bad_input_exits_2(files, capsys, args):
    pytest.importorskip("torch")
    root = files["root"]
    rc, err = run(capsys, [a.format(root=root) for a in args])
    assert rc == 2, (rc, err)
    assert "internal error" not in err and "Traceback" not in err, err
