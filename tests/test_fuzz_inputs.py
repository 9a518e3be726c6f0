"""Bounded fuzzing of what users and packages hand pydiff (issue 18, part 6): the package loader and
manifest parser, the scheduler-config reader, image files and masks.

Each fuzzer runs a fixed number of cases, derandomized (the same cases on every run, so CI is
deterministic), and asserts only that the input gives a valid result or a clean exception: a
ValueError / TypeError subclass (PackageError, ScheduleError) with a message, never a
RecursionError, a decode error, a KeyError, an OverflowError or a crash. The native ops' argument
ranges are fuzzed in tests/test_reliability_native.py. Rerun: `pytest tests/test_fuzz_inputs.py`;
the counts are in docs/reliability.md#fuzzing.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from pydiff import imageio
from pydiff.errors import PackageError, ScheduleError
from pydiff.package import Package, bundled_path, load_package
from pydiff.schedules import Schedule

CASES = 300  # per fuzzer; docs/reliability.md lists them
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's notes on corrupt tags
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
SHAPES = bundled_path("shapes")
BUNDLED_MANIFEST = json.loads((SHAPES / "manifest.json").read_text())


def clean(exc: BaseException, *allowed: type) -> None:
    """A clean refusal: one of `allowed`, with a message."""
    assert isinstance(exc, allowed), f"{type(exc).__name__}: {exc}"
    assert str(exc).strip(), f"{type(exc).__name__} without a message"
    event(f"refused ({type(exc).__name__})")  # `pytest --hypothesis-show-statistics` counts them


# JSON values: scalars (big and odd numbers, odd strings included), lists and objects, nested
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 2**63, 10**30, 1e39, -1e39, 3.4e38, 1e-45, 0.5, 4096, 4097, 100000])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["", "..", "/etc/passwd", "base.onnx", "ddim", "dpmpp_2m", "text", "class", "\x00"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    """A copy of the bundled shapes package whose manifest each case replaces."""
    dst = tmp_path_factory.mktemp("fuzz") / "shapes"
    shutil.copytree(SHAPES, dst)
    return dst


def load_with_manifest(package_dir, raw: bytes) -> None:
    (package_dir / "manifest.json").write_bytes(raw)
    try:
        pkg = load_package(package_dir)
    except Exception as e:  # noqa: BLE001 - the point is to see which
        clean(e, PackageError)
    else:
        assert isinstance(pkg, Package) and pkg.stages
        event("valid")


# ---------------------------------------------------------------------- package loader / manifest


@FUZZ
@given(raw=st.binary(max_size=512) | st.sampled_from([b"\xff\xfe{\x00}\x00", b"\xef\xbb\xbf{}", b"[" * 5000]))
def test_fuzz_manifest_random_bytes(package_dir, raw):
    load_with_manifest(package_dir, raw)


@FUZZ
@given(value=json_values)
def test_fuzz_manifest_random_json(package_dir, value):
    load_with_manifest(package_dir, json.dumps(value).encode())


def _paths(node, prefix=()):
    """Every path (tuple of keys / indices) into a JSON tree."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


MANIFEST_PATHS = list(_paths(BUNDLED_MANIFEST))[1:]


@st.composite
def mutated_manifests(draw):
    m = json.loads(json.dumps(BUNDLED_MANIFEST))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(MANIFEST_PATHS))
        parent = m
        try:
            for k in path[:-1]:
                parent = parent[k]
            key = path[-1]
            op = draw(st.sampled_from(["nudge", "nudge", "replace", "delete", "wrap", "deep"]))
            old = parent[key]
            if op == "nudge":  # a value of the same type: reaches the checks behind the type checks
                if isinstance(old, bool):
                    parent[key] = not old
                elif isinstance(old, int):
                    parent[key] = draw(
                        st.sampled_from([0, 1, 2, old - 1, old + 1, 999, 1000, 1001, 4097, 10001])
                    )
                elif isinstance(old, float):
                    parent[key] = draw(st.sampled_from([0.0, -1.0, 1.0001, old * 10, 1e30, 3.5e38]))
                elif isinstance(old, str):
                    parent[key] = draw(
                        st.sampled_from(
                            [
                                "ddim",
                                "ddpm",
                                "dpmpp_2m",
                                "none",
                                "static",
                                "x",
                                "",
                                "../base.onnx",
                                "manifest.json",
                            ]
                        )
                    )
                else:
                    parent[key] = draw(json_values)
            elif op == "delete":
                del parent[key]
            elif op == "wrap":
                parent[key] = [parent[key]]
            elif op == "deep":
                parent[key] = json.loads("[" * 40 + "1" + "]" * 40)
            else:
                parent[key] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or retyped the path
    return m


@FUZZ
@given(m=mutated_manifests(), encoding=st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "latin-1"]))
def test_fuzz_manifest_mutations_of_the_bundled_one(package_dir, m, encoding):
    text = json.dumps(m, ensure_ascii=False)
    load_with_manifest(package_dir, text.encode(encoding, "replace"))


# --------------------------------------------------------------------------- scheduler configs

DIFFUSERS_KEYS = [
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "variance_type",
    "clip_sample",
    "clip_sample_range",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "set_alpha_to_one",
    "_class_name",
    "algorithm_type",
    "solver_order",
    "use_karras_sigmas",
    "lambda_min_clipped",
    "final_sigmas_type",
]
schedule_values = (
    json_values
    | st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2", "epsilon", "v_prediction", "trailing"])
    | st.sampled_from(["fixed_small_log", "DDIMScheduler", "DPMSolverMultistepScheduler", "dpmsolver++"])
    | st.integers(1, 2000)
    | st.lists(st.floats(0, 1), min_size=1, max_size=8)
)
schedule_configs = st.dictionaries(
    st.sampled_from(DIFFUSERS_KEYS) | st.text(max_size=6), schedule_values, max_size=8
)


def build_schedule(config) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys are warned about, by design
            s = Schedule.from_config(config)
    except Exception as e:  # noqa: BLE001
        clean(e, ScheduleError)
    else:
        assert np.all(np.isfinite(s.alphas_cumprod)) and s.alphas_cumprod.shape == (s.num_train_timesteps,)
        event("valid")


@FUZZ
@given(config=schedule_configs)
def test_fuzz_scheduler_config_dicts(config):
    build_schedule(config)


@FUZZ
@given(
    raw=st.binary(max_size=256)
    | schedule_configs.map(lambda c: json.dumps(c).encode())
    | schedule_configs.map(lambda c: json.dumps(c).encode("utf-16"))
    | st.sampled_from([b"[" * 100000, b'{"a": ' * 3000, b'{"lambda_min_clipped": -Infinity}', b"\x80\x81"])
)
def test_fuzz_scheduler_config_files(tmp_path_factory, raw):
    p = tmp_path_factory.getbasetemp() / "scheduler_config.json"
    p.write_bytes(raw)
    build_schedule(p)


# ------------------------------------------------------------------------------- image files


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@st.composite
def png_files(draw):
    """PNG files with random (often absurd) headers and random or deflated pixel data."""
    w = draw(st.integers(0, 2**31 - 1) | st.integers(1, 64))
    h = draw(st.integers(0, 2**31 - 1) | st.integers(1, 64))
    depth = draw(st.sampled_from([1, 2, 4, 8, 16, 3, 0]))
    color = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, draw(st.sampled_from([0, 1])))
    body = draw(st.binary(max_size=256))
    idat = zlib.compress(body) if draw(st.booleans()) else body
    chunks = [_chunk(b"IHDR", ihdr)]
    if color == 3 and draw(st.booleans()):
        chunks.append(_chunk(b"PLTE", draw(st.binary(max_size=48))))
    chunks += [_chunk(b"IDAT", idat), _chunk(b"IEND", b"")]
    raw = b"\x89PNG\r\n\x1a\n" + b"".join(chunks)
    cut = draw(st.integers(8, len(raw)))
    return raw[:cut]


@st.composite
def other_headers(draw):
    """A real small image in some format, its header bytes then overwritten at random."""
    fmt = draw(st.sampled_from(["PNG", "BMP", "GIF", "JPEG", "TIFF", "PPM", "WEBP", "ICO"]))
    mode = "RGB" if fmt in ("JPEG", "PPM", "WEBP") else draw(st.sampled_from(["RGB", "L", "P"]))
    side = draw(st.integers(1, 24))
    im = Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), np.uint8)).convert(
        mode
    )
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    raw = bytearray(buf.getvalue())
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, min(len(raw), 64) - 1))
        raw[i] = draw(st.integers(0, 255))
    return bytes(raw)


def decode(tmp_path_factory, raw: bytes) -> None:
    p = tmp_path_factory.getbasetemp() / "fuzz-image"
    p.write_bytes(raw)
    try:
        im = imageio.load_image(p)
    except Exception as e:  # noqa: BLE001
        clean(e, ValueError)
        assert str(p) in str(e), f"the error does not name the file: {e}"
    else:
        w, h = im.size
        assert w * h <= imageio.MAX_IMAGE_PIXELS
        event("valid")


@FUZZ
@given(raw=st.binary(max_size=512) | png_files() | other_headers())
def test_fuzz_image_files(tmp_path_factory, raw):
    decode(tmp_path_factory, raw)


# ----------------------------------------------------------------------------- arrays and masks

ALL_DTYPES = (
    hnp.boolean_dtypes()
    | hnp.integer_dtypes()
    | hnp.unsigned_integer_dtypes()
    | hnp.floating_dtypes()
    | hnp.complex_number_dtypes()
    | hnp.datetime64_dtypes()
)
any_shape = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
# any dtype, any shape, any values (NaN, infinity, extremes of the dtype)
arrays = hnp.arrays(ALL_DTYPES, any_shape) | st.just(np.empty((2, 2), object))
unit_floats = st.floats(0, 1, width=16)
side = st.integers(1, 6)


def plausible(dtypes, extra_dims):
    """Arrays close to valid: the right rank, values mostly in range."""
    shapes = st.tuples(side, side, extra_dims).map(lambda t: (t[0], t[1], *t[2]))
    return shapes.flatmap(
        lambda shape: st.one_of(
            hnp.arrays(np.uint8, shape),
            hnp.arrays(dtypes, shape, elements=st.integers(0, 1)),
            hnp.arrays(hnp.floating_dtypes(), shape, elements=unit_floats),
            hnp.arrays(np.bool_, shape),
        )
    )


@st.composite
def masks(draw):
    a = draw(arrays | plausible(hnp.integer_dtypes() | hnp.unsigned_integer_dtypes(), st.just(())))
    if a.dtype == np.uint8 and a.ndim == 2 and a.size and draw(st.booleans()):
        return Image.fromarray(a, "L")
    return a


@st.composite
def images(draw):
    a = draw(arrays | plausible(st.just(np.uint8), st.sampled_from([(), (1,), (3,)])))
    a = a.reshape(*a.shape, 1) if a.ndim == 2 and draw(st.booleans()) else a
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] in (1, 3) and a.size and draw(st.booleans()):
        return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a, "L" if a.shape[2] == 1 else "RGB")
    return a


@FUZZ
@given(mask=masks())
def test_fuzz_masks(mask):
    try:
        out = imageio.mask_to_array(mask)
    except Exception as e:  # noqa: BLE001
        clean(e, ValueError, TypeError)
    else:
        assert out.dtype == np.float32 and out.ndim == 4 and out.shape[:2] == (1, 1) and out.size
        assert np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0
        event("valid")


@FUZZ
@given(image=images(), channels=st.sampled_from([1, 3]))
def test_fuzz_image_arrays(image, channels):
    try:
        out = imageio.to_model_array(image, channels)
    except Exception as e:  # noqa: BLE001
        clean(e, ValueError, TypeError)
    else:
        assert out.dtype == np.float32 and out.shape[:2] == (1, channels)
        assert np.all(np.isfinite(out)) and out.min() >= -1.0 and out.max() <= 1.0
        event("valid")
