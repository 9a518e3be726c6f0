"""The `pydiff` command line, run as a subprocess (and in-process for failure injection)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

from PIL import Image  # noqa: E402

import pydiff  # noqa: E402
from pydiff import cli, files  # noqa: E402
from pydiff.tools.testing import make_tiny_package  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NEUTRAL_CWD = (
    Path(__file__).resolve().parent
)  # tests/: no pydiff/ here, so subprocesses import the installed one

# Runs pydiff.cli.main; on the NumPy reference sampler where the native module is not built.
PRELUDE = """
import functools, sys
import pydiff
from pydiff import ops
if not ops.native_available():
    pydiff.sample = functools.partial(pydiff.sample, backend="reference")
from pydiff.cli import main
rc = main(sys.argv[1:])
if {check_torch} and "torch" in sys.modules:
    print("TORCH IMPORTED", file=sys.stderr); rc = 99
raise SystemExit(rc)
"""


def run(*args, check_torch=True, timeout=120):
    env = dict(os.environ)  # the installed pydiff: run from a folder that has no pydiff/ in it
    env.pop("PYDIFF_DEBUG", None)
    code = PRELUDE.format(check_torch=check_torch)
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=NEUTRAL_CWD,
    )


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_pkgs")
    return {
        "text": make_tiny_package(root / "text"),
        "class": make_tiny_package(root / "class", conditioning="class"),
    }


@pytest.fixture(autouse=True)
def core_backend(monkeypatch):
    from pydiff import ops

    if not ops.native_available():
        monkeypatch.setattr(pydiff, "sample", functools.partial(pydiff.sample, backend="reference"))


def one_line_error(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "onnxruntime" not in ln]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("pydiff: ")
    return lines[0]


def test_generate_one_png_and_json(pkgs, tmp_path):
    out = tmp_path / "red.png"
    r = run(
        "generate",
        "a red circle on a blue background",
        "--model",
        pkgs["text"],
        "--out",
        out,
        "--seed",
        3,
        "--json",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["seed"] == 3 and rep["num_images"] == 1 and rep["images"][0]["path"] == str(out)
    assert rep["images"][0]["prompt"] == "a red circle on a blue background"
    assert set(rep["stages"]) == {"base", "sr16"}
    with Image.open(out) as im:
        assert im.size == (16, 16) and im.mode == "RGB"
    assert [p.name for p in tmp_path.iterdir()] == ["red.png"]  # no temp files left
    assert r.stderr.strip() == "" or "onnxruntime" in r.stderr  # --quiet


def test_same_seed_same_png(pkgs, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for p in (a, b):
        assert run("generate", "red", "--model", pkgs["text"], "--out", p, "--seed", 9, "-q").returncode == 0
    assert a.read_bytes() == b.read_bytes()


def test_grid_separate_files_and_json_out(pkgs, tmp_path):
    grid = tmp_path / "grid.png"
    r = run(
        "generate",
        "red",
        "blue",
        "--num-images",
        2,
        "--model",
        pkgs["text"],
        "--out",
        grid,
        "--seed",
        1,
        "--steps",
        "base=2",
        "--steps",
        "sr16=3",
        "--guidance",
        "1,4",
        "--json-out",
        tmp_path / "made.json",
    )
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stderr and "base 8x8" in r.stderr  # messages + progress bars
    with Image.open(grid) as im:
        assert im.size == (2 * 16 + 2, 2 * 16 + 2)
    rep = json.loads((tmp_path / "made.json").read_text())
    assert rep["grid"] == str(grid) and rep["stages"]["base"]["steps"] == 2
    assert rep["stages"]["sr16"]["guidance_scale"] == [1.0, 1.0, 4.0, 4.0]
    assert [i["prompt"] for i in rep["images"]] == ["red", "red", "blue", "blue"]
    r = run(
        "generate",
        "red",
        "--num-images",
        3,
        "--no-grid",
        "--model",
        pkgs["text"],
        "--out",
        tmp_path / "sep.png",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert all((tmp_path / f"sep-{i}.png").is_file() for i in range(3))


def test_class_labels(pkgs, tmp_path):
    r = run(
        "generate",
        "--class-label",
        1,
        "--class-label",
        2,
        "--model",
        pkgs["class"],
        "--out",
        tmp_path / "c.png",
        "--json",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert [i["class_label"] for i in json.loads(r.stdout)["images"]] == [1, 2]


def test_editing_commands(pkgs, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    for args in (
        ("inpaint", tmp_path / "in.png", tmp_path / "mask.png", "red"),
        ("img2img", tmp_path / "in.png", "red", "--strength", "0.5"),
        ("upscale", tmp_path / "small.png", "red"),
    ):
        out = tmp_path / f"{args[0]}.png"
        r = run(*args, "--model", pkgs["text"], "--out", out, "-q", "--seed", 0)
        assert r.returncode == 0, (args, r.stderr)
        with Image.open(out) as im:
            assert im.size == (16, 16)


@pytest.mark.parametrize(
    "args,frag",
    [
        (("generate", "red", "--steps", "0"), "steps"),
        (("generate", "red", "--sampler", "lms"), "unknown sampler"),
        (("generate", "red", "--steps", "sr99=3"), "unknown stage 'sr99'"),
        (("generate", "red", "--guidance", "nan"), "finite"),
        (("generate", "red", "--steps", "many"), "--steps"),
        (("generate", "red", "--class-label", "1"), "not class-conditional"),
        (("generate", "red", "--out", "x.jpg"), ".png"),
        (("img2img", "/nonexistent/in.png", "red"), "no such file"),
        (("generate", "red", "--out", "/proc/x.png"), "--out"),
        (("generate", "red", "--num-images", "0"), "num_images"),
    ],
)
def test_bad_input_exits_2_with_one_line(pkgs, tmp_path, args, frag):
    args = list(args)
    if "--out" not in args:
        args += ["--out", tmp_path / "x.png"]
    r = run(*args, "--model", pkgs["text"], "-q")
    assert r.returncode == 2, r.stderr
    assert frag in one_line_error(r)
    assert not (tmp_path / "x.png").exists()


def test_missing_or_corrupt_package_exits_2(tmp_path, pkgs):
    r = run("generate", "red", "--model", tmp_path / "none", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "does not exist" in one_line_error(r)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{")
    r = run("generate", "red", "--model", bad, "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "manifest.json" in one_line_error(r)


def test_img2img_strength_zero_is_an_error(pkgs, tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    r = run(
        "img2img",
        tmp_path / "in.png",
        "red",
        "--strength",
        "0",
        "--model",
        pkgs["text"],
        "--out",
        tmp_path / "o.png",
    )
    assert r.returncode == 2 and "strength" in one_line_error(r)


def test_mismatched_mask_exits_2(pkgs, tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    Image.new("L", (8, 8)).save(tmp_path / "mask.png")
    r = run(
        "inpaint",
        tmp_path / "in.png",
        tmp_path / "mask.png",
        "red",
        "--model",
        pkgs["text"],
        "--out",
        tmp_path / "o.png",
    )
    assert r.returncode == 2 and "must match" in one_line_error(r)


def test_image_files_in_any_common_mode_are_converted(pkgs, tmp_path):
    # the Python API refuses modes it would have to guess about (tests/test_pipeline.py); a file
    # given to the command line is converted, since its user cannot call .convert()
    import numpy as np

    Image.new("L", (16, 16), 90).save(tmp_path / "gray.png")
    Image.new("RGBA", (16, 16), (200, 10, 10, 128)).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(tmp_path / "i16.png")
    Image.new("RGB", (16, 16)).convert("P").save(tmp_path / "p.png")
    for name in ("gray", "rgba", "i16", "p"):
        out = tmp_path / f"o_{name}.png"
        r = run("img2img", tmp_path / f"{name}.png", "red", "--model", pkgs["text"], "--out", out)
        assert r.returncode == 0 and out.is_file(), (name, r.stderr[-300:])
    mask = Image.new("RGB", (16, 16))  # an editor's RGB mask: taken as grey
    mask.paste((255, 255, 255), (4, 4, 12, 12))
    mask.save(tmp_path / "mask_rgb.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    r = run(
        "inpaint",
        tmp_path / "in.png",
        tmp_path / "mask_rgb.png",
        "red",
        "--model",
        pkgs["text"],
        "--out",
        tmp_path / "o_inp.png",
    )
    assert r.returncode == 0, r.stderr[-300:]


def test_argparse_usage_errors_exit_2():
    r = run("generate", "--no-such-flag")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run(check_torch=False)  # no command: help listing includes train/export
    assert r.returncode == 2


def test_info(tmp_path):
    r = run("info", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for k in ("version", "native_kernels", "cuda_twin", "ort_providers", "bundled_models"):
        assert k in d
    assert "CPUExecutionProvider" in d["ort_providers"]
    r = run("info")
    assert r.returncode == 0 and "ONNX Runtime" in r.stdout


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and pydiff.__version__ in r.stdout
    r = run("--help", check_torch=False)
    assert r.returncode == 0 and "generate" in r.stdout


# ------------------------------------------------------------------------------- in-process


def test_internal_error_exits_1_without_traceback(pkgs, tmp_path, monkeypatch, capsys):
    from pydiff.pipeline.pipeline import Pipeline

    def broken(self, plan):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(Pipeline, "execute", broken)
    rc = cli.main(["generate", "red", "--model", str(pkgs["text"]), "--out", str(tmp_path / "x.png"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "internal error" in err and "kaboom" in err and "Traceback" not in err
    assert "second line" not in err
    assert not (tmp_path / "x.png").exists()


def test_ctrl_c_exits_130_and_leaves_old_file(pkgs, tmp_path, monkeypatch, capsys):
    from pydiff.pipeline.pipeline import Pipeline

    out = tmp_path / "x.png"
    out.write_bytes(b"old image")
    real = Pipeline.execute

    def interrupted(self, plan):
        plan.callback = lambda *a: (_ for _ in ()).throw(KeyboardInterrupt())
        return real(self, plan)

    monkeypatch.setattr(Pipeline, "execute", interrupted)
    rc = cli.main(["generate", "red", "--model", str(pkgs["text"]), "--out", str(out), "-q"])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert out.read_bytes() == b"old image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):

    target = tmp_path / "x.json"
    target.write_text("old")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        files.write_json({"a": 1}, target)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    monkeypatch.undo()
    files.write_json({"a": 1}, target)
    assert json.loads(target.read_text()) == {"a": 1}
    mode = target.stat().st_mode & 0o777
    assert mode & 0o044, oct(mode)  # readable like a normal file, not mkstemp's 0600


def test_sigint_during_sampling_exits_130_and_writes_nothing(pkgs, tmp_path):
    """A real Ctrl-C (SIGINT) in the middle of sampling: exit 130, no image, no temp file."""
    import signal
    import time

    # A shell that starts commands in the background (as CI runners may) makes them ignore SIGINT;
    # restore Python's handler, as an interactive terminal would have it.
    slow = PRELUDE.replace(
        "from pydiff.cli import main",
        """import time, signal
signal.signal(signal.SIGINT, signal.default_int_handler)
from pydiff.backends.onnxruntime import OrtStageModel
_call = OrtStageModel.__call__
def _slow(self, *a, **k):
    time.sleep(0.005)   # make every network call slow enough to be interrupted
    return _call(self, *a, **k)
OrtStageModel.__call__ = _slow
from pydiff.cli import main""",
    ).format(check_torch=False)
    out = tmp_path / "x.png"
    env = dict(os.environ)  # the installed pydiff: run from a folder that has no pydiff/ in it
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            slow,
            "generate",
            "red",
            "--model",
            str(pkgs["text"]),
            "--steps",
            "1000",
            "--out",
            str(out),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=NEUTRAL_CWD,
    )
    # wait for the first progress bar, then interrupt
    seen = ""
    deadline = time.time() + 60
    while "base 8x8" not in seen and time.time() < deadline:
        seen += p.stderr.read(1)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    rest = p.communicate(timeout=60)[1]
    assert p.returncode == 130, seen + rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []


def test_json_out_may_not_overwrite_the_image(pkgs, tmp_path):
    r = run(
        "generate",
        "red",
        "--model",
        pkgs["text"],
        "--out",
        tmp_path / "a.png",
        "--json-out",
        tmp_path / "a.png",
    )
    assert r.returncode == 2 and "would overwrite an image" in one_line_error(r)
    r = run(
        "generate",
        "red",
        "--num-images",
        "2",
        "--no-grid",
        "--model",
        pkgs["text"],
        "--out",
        tmp_path / "b.png",
        "--json-out",
        tmp_path / "b-1.png",
    )
    assert r.returncode == 2 and "would overwrite an image" in one_line_error(r)
    assert not list(tmp_path.iterdir())


def test_missing_folders_are_made_only_for_a_run_that_succeeds(pkgs, tmp_path):
    r = run("generate", "red", "--model", tmp_path / "nope", "--out", tmp_path / "new" / "deeper" / "a.png")
    assert r.returncode == 2 and not (tmp_path / "new").exists()
    r = run("generate", "red", "--model", pkgs["text"], "--out", tmp_path / "new" / "deeper" / "a.png")
    assert r.returncode == 0 and (tmp_path / "new" / "deeper" / "a.png").is_file()


def test_a_broken_network_is_bad_input_naming_the_stage(pkgs, tmp_path):
    import json as _json
    import shutil

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    pkg = tmp_path / "pkg"
    shutil.copytree(pkgs["text"], pkg)
    st = _json.loads((pkg / "manifest.json").read_text())["stages"][-1]
    model = onnx.load(str(pkg / st["onnx"]))
    g, out = model.graph, st["output"]
    for n in g.node:  # the network's output, times NaN
        n.output[:] = [o + "_raw" if o == out else o for o in n.output]
    g.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan"))
    g.node.append(helper.make_node("Mul", [out + "_raw", "nan"], [out]))
    onnx.save(model, str(pkg / st["onnx"]))
    r = run("generate", "red", "--model", pkg, "--steps", "2", "-q", "--out", tmp_path / "x.png")
    err = one_line_error(r)
    assert r.returncode == 2 and f"stage {st['name']!r}" in err and st["onnx"] in err and "NaN" in err, err
    assert not (tmp_path / "x.png").exists()


def test_inpaint_resampling_options(pkgs, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
        tmp_path / "in.png"
    )
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    r = run(
        "inpaint",
        tmp_path / "in.png",
        tmp_path / "mask.png",
        "red",
        "--model",
        pkgs["text"],
        "--jump-n-sample",
        "base=3",
        "--jump-length",
        "2",
        "--out",
        tmp_path / "o.png",
        "--json",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["stages"]
    assert (st["base"]["jump_n_sample"], st["base"]["jump_length"]) == (3, 2)
    assert (st["sr16"]["jump_n_sample"], st["sr16"]["jump_length"]) == (1, 2)
    r = run(
        "inpaint",
        tmp_path / "in.png",
        tmp_path / "mask.png",
        "red",
        "--model",
        pkgs["text"],
        "--jump-n-sample",
        "0",
        "--out",
        tmp_path / "o2.png",
    )
    assert r.returncode == 2 and "jump_n_sample" in one_line_error(r)
    assert not (tmp_path / "o2.png").exists()
