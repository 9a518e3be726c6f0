"""Palette-style stages: the manifest's `image_condition` (what the input is made from), the
pipeline's colorize call on a grey or colour image, the CLI, and the refusals either way."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import pydiff
from pydiff import cli, imageio
from pydiff.errors import PackageError
from pydiff.tools.testing import make_tiny_package


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return make_tiny_package(tmp_path_factory.mktemp("c") / "tiny", resolutions=(8,), image_condition=True)


def test_the_grey_image_reaches_the_network_in_both_halves(pkg):
    pipe = pydiff.load(str(pkg))
    seen = []
    inner = pipe.backend.stage_models["base"]

    class Spy:
        stage = getattr(inner, "stage", None)

        def __call__(self, x, t, cond=None):
            seen.append(cond["image_condition"].copy())
            return inner(x, t, cond)

    pipe.backend.stage_models = {"base": Spy()}
    grey = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    out = pipe.colorize(grey, "red", seed=0, output_type="numpy", progress=False)
    assert out.shape == (1, 8, 8, 3)
    want = grey[None, None] * 2 - 1
    assert all(c.shape == (2, 1, 8, 8) for c in seen)  # [cond; uncond]: the image in both
    np.testing.assert_allclose(seen[0], np.concatenate([want, want]), atol=1e-7)
    # a colour image is taken by its BT.601 luma, the same as its grey given directly
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    luma = imageio.to_numpy(imageio.to_grey(imageio.to_model_array(rgb)))[0, :, :, 0]
    a = pipe.colorize(rgb, "red", seed=1, output_type="numpy", progress=False)
    b = pipe.colorize(luma, "red", seed=1, output_type="numpy", progress=False)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # the image changes the output (the tiny network adds 0.3 x it)
    c = pipe.colorize(np.zeros((8, 8), np.float32), "red", seed=1, output_type="numpy", progress=False)
    assert np.abs(b - c).max() > 0.01


def test_generate_on_a_colorization_package_and_colorize_elsewhere_are_refused(pkg, tmp_path):
    pipe = pydiff.load(str(pkg))
    with pytest.raises(ValueError, match="conditioned on an image .* use colorize"):
        pipe.generate("red", progress=False)
    plain = pydiff.load(str(make_tiny_package(tmp_path / "plain", resolutions=(8,))))
    with pytest.raises(ValueError, match="no stage conditioned on a grey image"):
        plain.colorize(np.zeros((8, 8), np.float32), "red", progress=False)
    with pytest.raises(ValueError, match="colorize: an image is required"):
        pipe.colorize(None, "red")


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda st: st.pop("image_condition"), "go together"),
        (lambda st: st.update(image_condition={"from": "sepia"}), "sepia"),
        (lambda st: st.update(image_condition="grey"), "expected an object"),
    ],
)
def test_a_bad_image_condition_is_a_package_error(pkg, tmp_path, edit, words):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in pkg.rglob("*"):
        if f.is_file():
            (bad / f.relative_to(pkg)).parent.mkdir(parents=True, exist_ok=True)
            (bad / f.relative_to(pkg)).write_bytes(f.read_bytes())
    manifest = json.loads((bad / "manifest.json").read_text())
    edit(manifest["stages"][0])
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=words):
        pydiff.load(str(bad))


def test_cli_colorize(pkg, tmp_path):
    Image.fromarray(np.full((8, 8), 128, np.uint8), mode="L").save(tmp_path / "g.png")
    out = tmp_path / "c.png"
    assert cli.main(["colorize", str(tmp_path / "g.png"), "red", "--model", str(pkg), "--seed", "0",
                     "--out", str(out), "-q"]) == 0  # fmt: skip
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.size == (8, 8)
    assert cli.main(["generate", "red", "--model", str(pkg), "--out", str(tmp_path / "x.png"), "-q"]) == 2
    assert not (tmp_path / "x.png").exists()


def test_the_bundled_colorization_package_colours_a_grey_shape():
    """The bundled shapes-colorize: an unambiguous grey (a yellow circle on black) read back in
    colour from the grey alone, at a few steps."""
    from pydiff.tools.data import shapes as S
    from pydiff.tools.eval.packages import read_shape

    spec = S.sample_specs(np.random.default_rng(3), 1)[0]
    spec = type(spec)(**{**vars(spec), "fg": "yellow", "bg": "black", "shape": "circle"})
    rgb = S.render_batch([spec])
    grey = imageio.to_numpy(imageio.to_grey(rgb))[0, :, :, 0]
    out = pydiff.colorize(grey, model="shapes-colorize", steps=8, seed=0, output_type="numpy", progress=False)
    got = read_shape(out[0])
    assert (got["fg"], got["bg"]) == ("yellow", "black"), got


def test_serve_colorize_endpoint_equals_the_library():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    import base64
    import io

    from pydiff.serving import BackgroundServer

    grey = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1)), mode="L")
    buf = io.BytesIO()
    grey.save(buf, format="PNG")
    body = {
        "model": "shapes-colorize",
        "image": base64.b64encode(buf.getvalue()).decode(),
        "steps": 4,
        "seed": 2,
    }
    with BackgroundServer(["shapes-colorize"]) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        card = c.get("/v1/models/shapes-colorize").json()["pydiff"]
        assert card["kinds"] == ["colorize"]
        r = c.post("/v1/colorize", json=body)
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["b64_json"]))))
        want = np.asarray(pydiff.colorize(grey, model="shapes-colorize", steps=4, seed=2, progress=False)[0])
        np.testing.assert_array_equal(got, want)
        r = c.post("/v1/generate", json={"model": "shapes-colorize", "prompt": "x"})
        assert r.status_code == 400 and "colorize" in r.json()["error"]["message"]


def test_colorize_and_uncrop_evaluations(tmp_path):
    """`pydiff eval shapes-colorize` and `shapes-uncrop` on the bundled packages, a few images: the
    figures are there, in range, with the settings that ran."""
    from pydiff.tools.eval.packages import evaluate_shapes_colorize, evaluate_shapes_uncrop, grey_twins

    assert grey_twins("red") == {"red", "purple", "blue"} and grey_twins("yellow") == {"yellow"}
    rep = evaluate_shapes_colorize("shapes-colorize", n=3, steps=4, save_grid=str(tmp_path / "c.png"))
    assert rep["settings"]["steps"] == 4 and 0 <= rep["unambiguous_images"] <= 3
    for mode in ("grey only", "with caption"):
        assert 0.0 <= rep[mode]["colours_all"] <= 1.0 and rep[mode]["psnr_db"] > 5
    assert Image.open(tmp_path / "c.png").size == (3 * 66 * 2, 4 * 66 * 2)
    rep = evaluate_shapes_uncrop(None, n=2, steps={"base": 6, "sr64": 3}, jump_n_sample=1)
    assert set(rep) >= {"alignment", "seam_band_psnr_db", "side_psnr_db", "settings"}
    assert rep["settings"]["base"]["jump_n_sample"] == 1 and rep["side_psnr_db"] > 5
    with pytest.raises(ValueError, match="not a colorization stage"):
        evaluate_shapes_colorize("shapes", n=1)
