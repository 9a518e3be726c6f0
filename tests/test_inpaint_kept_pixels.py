"""Inpainting keeps the unmasked pixels of its input bit for bit (PIL and float inputs, RePaint and
mask-channel stages, through the CLI), and the mask's polarity is an option: diffusers' (white =
regenerate, the default) or GLIDE's (1 = keep)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import pydiff
from pydiff import cli
from pydiff.tools.testing import make_tiny_package

PROMPT = "a red circle on a blue background"
FAST = dict(steps={"base": 3, "sr64": 2}, jump_n_sample=1, seed=4, progress=False)


@pytest.fixture(scope="module")
def shapes():
    return pydiff.load("shapes")


@pytest.fixture(scope="module")
def picture(shapes):
    return shapes.generate(PROMPT, steps={"base": 4, "sr64": 2}, seed=0, progress=False)[0]


def box_mask(size=64, box=(8, 8, 40, 48)) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    m.paste(255, box)
    return m


def test_pil_in_pil_out_keeps_every_unmasked_pixel(shapes, picture):
    mask = box_mask()
    out = np.asarray(shapes.inpaint(picture, mask, "a green square on a blue background", **FAST)[0])
    src, keep = np.asarray(picture), np.asarray(mask) == 0
    np.testing.assert_array_equal(out[keep], src[keep])
    assert np.abs(out[~keep].astype(int) - src[~keep]).max() > 30  # the box was regenerated


def test_float_input_keeps_its_own_values_to_the_bit(shapes):
    rng = np.random.default_rng(1)
    image = rng.random((64, 64, 3), dtype=np.float32)  # not multiples of 1/255
    mask = np.zeros((64, 64), np.float32)
    mask[20:50, 10:30] = 1.0
    out = shapes.inpaint(image, mask, PROMPT, output_type="numpy", **FAST)[0]
    keep = mask == 0
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[keep], image[keep])


def test_glide_polarity_is_the_inverted_mask(shapes, picture):
    mask = box_mask()
    inverted = Image.fromarray(255 - np.asarray(mask))
    a = shapes.inpaint(picture, mask, PROMPT, output_type="numpy", **FAST)
    b = shapes.inpaint(picture, inverted, PROMPT, output_type="numpy", mask_convention="glide", **FAST)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="mask_convention must be one of"):
        shapes.inpaint(picture, mask, PROMPT, mask_convention="white", **FAST)


def test_mask_channel_stages_keep_pixels_too(tmp_path):
    pkg = make_tiny_package(tmp_path / "tiny", mask_channel=True)
    pipe = pydiff.load(str(pkg))
    image = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:9] = 255
    out = np.asarray(pipe.inpaint(image, mask, "red", seed=0, progress=False)[0])
    keep = mask == 0
    np.testing.assert_array_equal(out[keep], image[keep])
    assert not np.array_equal(out[~keep], image[~keep])


def test_an_input_of_another_size_is_kept_at_its_own_resolution_only(shapes, picture):
    small = picture.resize((32, 32))
    mask = box_mask(32, (4, 4, 20, 24))
    out = shapes.inpaint(small, mask, PROMPT, **FAST)[0]
    assert out.size == (64, 64)  # no composite at another size: the cascade's output as it is


def test_cli_mask_convention(tmp_path, picture):
    picture.save(tmp_path / "in.png")
    box_mask().save(tmp_path / "m.png")
    Image.fromarray(255 - np.asarray(box_mask())).save(tmp_path / "keep.png")
    common = ["--model", "shapes", "--steps", "base=3", "--steps", "sr64=2", "--jump-n-sample", "1",
              "--seed", "4", "-q"]  # fmt: skip
    assert cli.main(["inpaint", str(tmp_path / "in.png"), str(tmp_path / "m.png"), PROMPT, "--out",
                     str(tmp_path / "a.png"), *common]) == 0  # fmt: skip
    assert cli.main(["inpaint", str(tmp_path / "in.png"), str(tmp_path / "keep.png"), PROMPT, "--out",
                     str(tmp_path / "b.png"), "--mask-convention", "glide", *common]) == 0  # fmt: skip
    a, b = (np.asarray(Image.open(tmp_path / f)) for f in ("a.png", "b.png"))
    np.testing.assert_array_equal(a, b)
    keep = np.asarray(box_mask()) == 0
    np.testing.assert_array_equal(a[keep], np.asarray(picture)[keep])
    with pytest.raises(SystemExit) as e:
        cli.main(["inpaint", str(tmp_path / "in.png"), str(tmp_path / "m.png"), "--mask-convention", "x"])
    assert e.value.code == 2


@pytest.mark.parametrize("sampler", ["heun", "pndm"])
def test_samplers_that_chain_evaluations_cannot_repaint(shapes, picture, sampler):
    with pytest.raises(ValueError, match=f"sampler {sampler!r} for stage 'base' cannot inpaint by RePaint"):
        shapes.inpaint(picture, box_mask(), PROMPT, sampler={"base": sampler}, **FAST)
    model = lambda x, t: (0.1 * x).astype(np.float32)  # noqa: E731
    with pytest.raises(ValueError, match="cannot inpaint by RePaint"):
        pydiff.repaint(model, np.zeros((1, 3, 4, 4), np.float32), np.zeros((1, 3, 4, 4), np.float32),
                       np.ones((1, 1, 4, 4), np.float32), schedule=pydiff.Schedule(), sampler=sampler,
                       steps=4)  # fmt: skip
