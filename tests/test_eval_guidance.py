"""`pydiff eval guidance`: the guidance sweep (quality against diversity) at a tiny size, as a
subprocess on the installed pydiff (cwd tests/, like test_cli), and its refusals of bad input."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image
from test_cli import one_line_error, run

pytest.importorskip("sklearn")  # the digits quality figure (an SVM on the real digits)


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_digits_tiny_sweep_writes_json_and_png(tmp_path):
    out = tmp_path / "sweep"
    r = run(
        "eval",
        "guidance",
        "--dataset",
        "digits",
        "--types",
        "cfg,classifier",
        "--scales",
        "0,3",
        "--n",
        4,
        "--steps",
        4,
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert _files(out) == ["guidance_sweep_digits.json", "guidance_sweep_digits.png"]  # no temp files
    assert "guidance sweep (digits)" in r.stderr and "4/4" in r.stderr  # the tqdm bar
    rep = json.loads((out / "guidance_sweep_digits.json").read_text())
    assert rep["dataset"] == "digits" and rep["n"] == 40 and rep["settings"]["steps"] == 4
    assert set(rep["points"]) == {"cfg", "classifier"}
    for t in ("cfg", "classifier"):
        assert rep["series"][t]["scales"] == [0.0, 3.0]
        assert [p["scale"] for p in rep["points"][t]] == [0.0, 3.0]
        for p in rep["points"][t]:
            assert 0.0 <= p["quality"] <= 1.0
            assert math.isfinite(p["diversity"]) and p["diversity"] >= 0.0
    # both series start from the same unguided samples; guidance must move the SVM's accuracy
    assert rep["points"]["cfg"][0]["quality"] == rep["points"]["classifier"][0]["quality"]
    assert rep["points"]["cfg"][1]["quality"] > rep["points"]["cfg"][0]["quality"]
    assert rep["thresholding"] == []
    assert rep["command"].startswith("pydiff eval guidance --dataset digits --types cfg,classifier")
    with Image.open(out / "guidance_sweep_digits.png") as im:
        im.verify()
    with Image.open(out / "guidance_sweep_digits.png") as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 400


def test_shapes_base_stage_sweep_with_thresholding(tmp_path):
    out = tmp_path / "shapes"
    r = run(
        "eval",
        "guidance",
        "--dataset",
        "shapes",
        "--base-only",
        "--types",
        "cfg,clip",
        "--scales",
        "cfg=0,3",
        "--scales",
        "clip=0,100",
        "--n",
        2,
        "--num-images",
        2,
        "--steps",
        3,
        "--thresholding-scales",
        8,
        "--out",
        out,
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "guidance sweep" not in r.stderr
    rep = json.loads((out / "guidance_sweep_shapes.json").read_text())
    assert rep["stages"] == ["base"] and rep["n"] == 4
    assert {t: [p["scale"] for p in pts] for t, pts in rep["points"].items()} == {
        "cfg": [0.0, 3.0],
        "clip": [0.0, 100.0],
    }
    for pts in rep["points"].values():
        for p in pts:
            assert 0.0 <= p["quality"] <= 1.0 and p["diversity"] >= 0.0
    assert [(p["guidance_scale"], p["thresholding"]) for p in rep["thresholding"]] == [
        (8.0, "none"),
        (8.0, "static"),
        (8.0, "dynamic"),
    ]
    for p in rep["thresholding"]:
        assert 0.0 <= p["quality"] <= 1.0 and 0.0 <= p["saturated_fraction"] <= 1.0
    with Image.open(out / "guidance_sweep_shapes.png") as im:
        im.verify()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--types", "cfg,nope"], "unknown guidance type 'nope'"),
        (["--types", ""], "--types: empty list"),
        (["--scales", ""], "empty scale list"),
        (["--types", "cfg", "--scales", "cfg="], "empty scale list"),
        (["--types", "cfg", "--scales", "clip=1"], "'clip' is not among the swept types"),
        (["--scales", "1,inf"], "finite"),
        (["--types", "clip"], "package 'digits'"),  # digits has a classifier, no CLIP model
        (["--dataset", "shapes", "--model", "digits"], "not a shapes model"),
        (["--n", 1], "--n must be >= 2"),
        (["--steps", 0], "--steps must be >= 1"),
        (["--seed", -1], "seed"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "never"
    r = run("eval", "guidance", *args, "--out", out)
    assert r.returncode == 2, (r.returncode, r.stderr)
    line = one_line_error(r)
    assert message in line, line
    assert not out.exists()


def test_no_guidance_model_message_names_the_type_and_what_exists(tmp_path):
    r = run("eval", "guidance", "--dataset", "digits", "--types", "cfg,clip", "--out", tmp_path / "o")
    assert r.returncode == 2
    assert one_line_error(r).endswith("has no clip guidance model (its guidance models: classifier)")


def test_interrupted_sweep_leaves_no_files(tmp_path, monkeypatch):
    from pydiff import cli
    from pydiff.tools.eval import guidance_sweep as eval_guidance

    def interrupt(self, imgs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_guidance._Digits, "score", interrupt)
    out = tmp_path / "o"
    rc = cli.main(
        [
            "eval",
            "guidance",
            "--types",
            "cfg",
            "--scales",
            "0,1",
            "--n",
            "2",
            "--steps",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == cli.EXIT_INTERRUPTED
    assert _files(out) == []
