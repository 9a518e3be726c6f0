"""Everything a user gives is checked before any work, by type and by size (issue 18, part 3):
prompts, masks of every dtype, image files, settings in float32, manifests and scheduler configs
of any depth or encoding, recommended settings against the package's own schedule, tokenizer
files, and ONNX external data that would leave the package."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pydiff import imageio
from pydiff.backends import text_encoder as te_mod
from pydiff.backends.text_encoder import MAX_PROMPT_CHARS, TextEncoder, check_prompt, load_tokenizer
from pydiff.errors import PackageError, ScheduleError
from pydiff.package import bundled_path, load_package, onnx_external_data
from pydiff.pipeline.requests import GenerateRequest, Img2ImgRequest, InpaintRequest
from pydiff.schedules import Schedule

SHAPES = bundled_path("shapes")
BUNDLED_TE = SHAPES / "text_encoder"


@pytest.fixture(scope="module")
def shapes():
    return load_package("shapes")


@pytest.fixture
def pkg(tmp_path):
    """A copy of the bundled shapes package to break."""
    dst = tmp_path / "shapes"
    shutil.copytree(SHAPES, dst)
    return dst


def manifest(pkg) -> dict:
    return json.loads((pkg / "manifest.json").read_text())


def write(pkg, m) -> None:
    (pkg / "manifest.json").write_text(json.dumps(m))


def refused(pkg, *fragments):
    with pytest.raises(PackageError) as ei:
        load_package(pkg)
    for f in fragments:
        assert f in str(ei.value), str(ei.value)
    return str(ei.value)


# ------------------------------------------------------------------------------------ manifests


def test_manifest_in_utf16_or_bad_utf8_is_a_package_error(pkg):
    text = (pkg / "manifest.json").read_text()
    (pkg / "manifest.json").write_bytes(text.encode("utf-16"))
    refused(pkg, "manifest.json", "UTF-16")
    (pkg / "manifest.json").write_bytes(b'{"format": "pydiff-package", "name": "\xff\xfe\x80"}')
    refused(pkg, "manifest.json", "not UTF-8")
    (pkg / "manifest.json").write_bytes(b"\xef\xbb\xbf" + text.encode())  # a UTF-8 BOM is fine
    assert load_package(pkg).name == "shapes"


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_manifest_is_a_package_error(pkg, depth):
    (pkg / "manifest.json").write_text('{"format": "pydiff-package", "x": ' + "[" * depth + "]" * depth + "}")
    refused(pkg, "manifest.json", "nested too deeply")


def test_manifest_numbers_out_of_range(pkg):
    original = manifest(pkg)
    raw = json.dumps(original).replace('"guidance_scale": 7.0', '"guidance_scale": 1e999')
    (pkg / "manifest.json").write_text(raw)
    refused(pkg, "manifest.json", "out of range")
    for key, value in (("guidance_scale", 1e39), ("sample_max_value", 1e39), ("eta", 3.5e38)):
        m = json.loads(json.dumps(original))
        m["stages"][0]["recommended"][key] = value
        m["stages"][0]["recommended"]["sampler"] = "ddim"
        write(pkg, m)
        refused(pkg, f"stages[0].recommended.{key}", "float32")


@pytest.mark.parametrize(
    "rec, fragments",
    [
        ({"steps": 2000}, ["stages[0].recommended.steps", "num_train_timesteps=1000"]),
        ({"sampler": "lms"}, ["stages[0].recommended.sampler", "unknown sampler 'lms'"]),
        ({"sampler": "ddim", "eta": 5.0, "steps": 50}, ["stages[0].recommended", "eta=5"]),
        ({"sampler": "dpmpp_2m", "eta": 0.5}, ["stages[0].recommended", "eta applies to 'ddim' only"]),
        ({"inpaint": {"steps": 5000}}, ["stages[0].recommended.inpaint.steps"]),
    ],
)
def test_recommended_settings_the_schedule_cannot_run_are_refused_at_load(pkg, rec, fragments):
    m = manifest(pkg)
    m["stages"][0]["recommended"].update(rec)
    write(pkg, m)
    refused(pkg, *fragments)


def test_a_stage_schedule_pydiff_cannot_build_is_refused_at_load(pkg):
    original = manifest(pkg)
    m = json.loads(json.dumps(original))
    m["stages"][1]["scheduler"]["beta_schedule"] = "cosine"
    write(pkg, m)
    refused(pkg, "stages[1].scheduler", "beta_schedule")
    m = json.loads(json.dumps(original))
    m["stages"][1]["noise_aug"]["scheduler"]["use_karras_sigmas"] = True
    write(pkg, m)
    refused(pkg, "stages[1].noise_aug.scheduler", "use_karras_sigmas")


# ------------------------------------------------------------------------- ONNX external data


def _external_model(path, location: str) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        e = w.external_data.add()
        e.key, e.value = key, value
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w],
    )
    onnx.save(helper.make_model(g), str(path))


@pytest.mark.parametrize(
    "location, fragment",
    [
        ("../../x.bin", "'..'"),
        ("/etc/passwd", "absolute"),
        ("", "no file location"),
        ("gone.bin", "not a regular file"),
    ],
)
def test_onnx_external_data_outside_the_package_is_refused(pkg, location, fragment):
    _external_model(pkg / "sr64.onnx", location)
    refused(pkg, "stages[1].onnx", "external data of tensor 'w'", fragment)


def test_onnx_external_data_through_a_link_out_of_the_package_is_refused(pkg, tmp_path):
    (tmp_path / "outside.bin").write_bytes(np.ones(4, np.float32).tobytes())
    os.symlink(tmp_path / "outside.bin", pkg / "w.bin")
    _external_model(pkg / "sr64.onnx", "w.bin")
    refused(pkg, "stages[1].onnx", "leaves the package directory")
    os.remove(pkg / "w.bin")
    (pkg / "w.bin").write_bytes(np.ones(4, np.float32).tobytes())  # inside: fine
    assert load_package(pkg).stages[1].onnx.name == "sr64.onnx"


def test_external_data_is_found_in_subgraphs_and_constants(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    c = numpy_helper.from_array(np.ones((1,), np.float32), "c")
    c.ClearField("raw_data")
    c.data_location = TensorProto.EXTERNAL
    e = c.external_data.add()
    e.key, e.value = "location", "../c.bin"
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["z"], value=c)],
        "b",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
    )
    g = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(g), str(tmp_path / "m.onnx"))
    assert onnx_external_data(tmp_path / "m.onnx") == [("c", "../c.bin")] * 2
    assert onnx_external_data(SHAPES / "base.onnx") == []  # the bundled networks keep their weights inline


def test_stage_onnx_that_links_to_etc_is_refused(pkg):
    os.remove(pkg / "sr64.onnx")
    os.symlink("/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd", pkg / "sr64.onnx")
    refused(pkg, "stages[1].onnx", "leaves the package directory")


# ---------------------------------------------------------------------------- scheduler configs


def test_scheduler_config_files_of_any_encoding_or_depth(tmp_path):
    p = tmp_path / "scheduler_config.json"
    p.write_bytes('{"beta_schedule": "linear"}'.encode("utf-16"))
    with pytest.raises(ScheduleError, match="UTF-16"):
        Schedule.from_config(p)
    p.write_bytes(b'{"beta_schedule": "\xff"}')
    with pytest.raises(ScheduleError, match="not UTF-8"):
        Schedule.from_config(p)
    p.write_text("[" * 100_000)
    with pytest.raises(ScheduleError, match="nested too deeply"):
        Schedule.from_config(p)
    with pytest.raises(ScheduleError, match="cannot read"):
        Schedule.from_config(tmp_path / "missing.json")
    # diffusers writes -Infinity for lambda_min_clipped: still read
    p.write_text('{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity}')
    assert Schedule.from_config(p).timestep_spacing == "linspace"


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"variance_type": []}, "variance_type"),
        ({"_class_name": ["DDIMScheduler"]}, "_class_name"),
        ({"num_train_timesteps": 10**9}, "num_train_timesteps"),
        ({"steps_offset": 10**30}, "steps_offset"),
        ({"beta_end": 1e39}, "float32"),
        ({"beta_start": 10**400}, "finite"),
        ({"solver_order": 2.0}, "solver_order"),
        ({"trained_betas": [0.1] * 3}, "trained_betas"),
        ({"trained_betas": [True] * 1000}, "trained_betas"),
        ({"x": json.loads("[" * 40 + "]" * 40)}, "nested"),
    ],
)
def test_scheduler_config_values(config, fragment):
    with pytest.raises(ScheduleError, match=fragment):
        Schedule.from_config(config)


# ------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(guidance_scale=1e39), "guidance_scale"),
        (dict(guidance_scale=[1.0, 1e39]), "guidance_scale"),
        (dict(guidance_scale=10**400), "guidance_scale"),
        (dict(guidance_scale=np.float64(-1e39)), "guidance_scale"),
        (dict(eta=1e39, sampler="ddim"), "eta"),
        (dict(guidance_type="classifier", class_label=0, classifier_scale=1e39), "classifier_scale"),
        (dict(guidance_type="clip", clip_scale=[3.5e38]), "clip_scale"),
    ],
)
def test_settings_must_be_finite_in_float32(shapes, kwargs, fragment):
    kwargs.setdefault("prompt", "a red circle")
    with pytest.raises(ValueError, match=fragment) as ei:
        GenerateRequest(**kwargs).plan(shapes)
    assert "float32" in str(ei.value)


def test_strength_must_be_finite_in_float32(shapes):
    with pytest.raises(ValueError, match="strength.*float32"):
        Img2ImgRequest(image=np.zeros((16, 16, 3), np.uint8), prompt="x", strength=1e39).plan(shapes)


# -------------------------------------------------------------------------------------- prompts


def test_prompts_are_checked_before_tokenizing(shapes):
    with pytest.raises(ValueError, match=r"prompt: not valid Unicode"):
        GenerateRequest(prompt="a red \ud800 circle").plan(shapes)
    with pytest.raises(ValueError, match=r"prompt\[1\]: not valid Unicode"):
        GenerateRequest(prompt=["ok", "\udfff"]).plan(shapes)
    with pytest.raises(ValueError, match="negative_prompt: not valid Unicode"):
        GenerateRequest(prompt="x", negative_prompt="\ud800").plan(shapes)
    with pytest.raises(ValueError, match=f"over the limit of {MAX_PROMPT_CHARS}"):
        GenerateRequest(prompt="a" * (MAX_PROMPT_CHARS + 1)).plan(shapes)
    with pytest.raises(ValueError, match="batch limit"):
        GenerateRequest(prompt=["x"] * 5000).plan(shapes)
    with pytest.raises(TypeError, match=r"prompt\[0\]: expected a string"):
        GenerateRequest(prompt=[b"bytes"]).plan(shapes)
    assert check_prompt("日本語 ☃ 𝔘") == "日本語 ☃ 𝔘"


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(BUNDLED_TE / "model.onnx", BUNDLED_TE / "tokenizer.json", max_length=16)


def test_unknown_characters_encode_as_unk(encoder):
    unk = encoder.tokenizer.token_to_id("[UNK]")
    ids, mask = encoder.tokenize(["\u2603\U0001d518 \u0b95"])
    assert unk in ids[0].tolist() and mask[0].sum() >= 3  # [CLS] [UNK]... [SEP]
    states, _ = encoder.encode(["\u2603\U0001d518"])
    assert np.all(np.isfinite(states))
    with pytest.raises(ValueError, match=r"prompt\[0\]: not valid Unicode"):
        encoder.tokenize(["\ud800"])


def test_tokenizer_files_are_capped_and_must_encode_unknown_characters(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0}, unk_token=None)).save(str(tmp_path / "wordlevel.json"))
    with pytest.raises(PackageError, match="cannot encode characters outside its vocabulary"):
        load_tokenizer(tmp_path / "wordlevel.json")
    Tokenizer(models.BPE({"a": 0}, [], unk_token=None)).save(str(tmp_path / "bpe.json"))
    with pytest.raises(PackageError, match="drops characters outside its vocabulary"):
        load_tokenizer(tmp_path / "bpe.json")
    (tmp_path / "bad.json").write_text("{ nope")
    with pytest.raises(PackageError, match="bad.json: not a tokenizers JSON file"):
        load_tokenizer(tmp_path / "bad.json")
    monkeypatch.setattr(te_mod, "MAX_TOKENIZER_BYTES", 1000)
    with pytest.raises(PackageError, match="over the 1000-byte limit"):
        load_tokenizer(BUNDLED_TE / "tokenizer.json")


# ------------------------------------------------------------------------------ images and masks


def _png_header(w: int, h: int) -> bytes:
    """A PNG file of a few dozen bytes whose header claims w x h."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side, fragment", [(50_000, "decompression bomb"), (9000, "over the limit")])
def test_a_tiny_file_claiming_a_huge_image_is_refused_before_decoding(tmp_path, side, fragment):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header(side, side))
    assert p.stat().st_size < 100
    with pytest.raises(ValueError, match=fragment) as ei:
        imageio.load_image(p)
    assert str(p) in str(ei.value)


def test_unreadable_image_files_are_value_errors_naming_the_file(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="x.png: not an image file"):
        imageio.load_image(p)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:200])  # truncated in the pixel data
    with pytest.raises(ValueError, match="x.png: cannot decode"):
        imageio.load_image(p)
    with pytest.raises(FileNotFoundError):
        imageio.load_image(tmp_path / "missing.png")


def test_arrays_and_images_over_the_pixel_limit_are_refused_before_conversion():
    side = int(np.sqrt(imageio.MAX_IMAGE_PIXELS)) + 1
    big = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (side, side, 3))  # no memory behind it
    with pytest.raises(ValueError, match="over the limit"):
        imageio.to_model_array(big)
    with pytest.raises(ValueError, match="mask: .*over the limit"):
        imageio.mask_to_array(np.broadcast_to(np.zeros((1, 1), bool), (side, side)))


INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_zero_one_masks_of_every_integer_dtype(dtype):
    m = np.array([[0, 1], [1, 0]], dtype)
    np.testing.assert_array_equal(imageio.mask_to_array(m)[0, 0], m.astype(np.float32))


def test_the_mask_rule():
    want = np.array([[0.0, 1.0]], np.float32)
    for m in (
        np.array([[False, True]]),
        np.array([[0, 255]], np.uint8),  # 8-bit grey
        np.array([[0, 1]], np.uint8),  # 0/1, not almost black
        np.array([[0.0, 1.0]], np.float16),
        np.array([[[0.0], [1.0]]], np.float64).reshape(1, 2, 1),
        Image.fromarray(np.array([[0, 255]], np.uint8), "L"),
        Image.fromarray(np.array([[0, 1]], np.uint8), "L"),
        Image.fromarray(np.array([[False, True]])),  # mode '1'
    ):
        np.testing.assert_array_equal(imageio.mask_to_array(m)[0, 0], want)
    np.testing.assert_allclose(imageio.mask_to_array(np.array([[128]], np.uint8))[0, 0, 0, 0], 128 / 255)
    for bad, err, frag in (
        (np.array([[0, 2]], np.int32), ValueError, "only 0 and 1"),
        (np.array([[-1, 0]], np.int8), ValueError, "only 0 and 1"),
        (np.array([[0.5, 1.5]]), ValueError, r"\[0, 1\]"),
        (np.array([[np.nan]]), ValueError, "NaN"),
        (np.array([[1 + 0j]]), TypeError, "complex"),
        (np.array([[None]], object), TypeError, "object"),
        (np.zeros((0, 4), bool), ValueError, "empty"),
        (np.zeros((2, 2, 3), bool), ValueError, "HxW"),
        ([[0, 1]], TypeError, "list"),
    ):
        with pytest.raises(err, match=frag):
            imageio.mask_to_array(bad)


def test_inpaint_takes_an_int64_zero_one_mask(shapes):
    m = np.zeros((16, 16), np.int64)
    m[4:12, 4:12] = 1
    plan = InpaintRequest(image=np.zeros((16, 16, 3), np.uint8), mask=m, prompt="x").plan(shapes)
    assert plan.mask.dtype == np.float32 and plan.mask.max() == 1.0 and plan.mask.sum() == 64
