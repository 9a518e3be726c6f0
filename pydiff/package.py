"""Load and validate a pydiff model package (format version 1, see docs/model-package.md).

`load_package(path)` reads `manifest.json`, checks every key's type and range, checks that every
file it names lies inside the package directory and is a non-empty regular file, and returns a
frozen `Package`. It reads no network weights: checking the ONNX graphs' inputs and outputs against
the manifest needs an ONNX Runtime session, so the backend does that with `check_stage_io` /
`check_text_encoder_io` when it creates its sessions. Nothing here unpickles anything.

Every problem is a `PackageError` (a `ValueError`) whose message names the file and the key:
``shapes/manifest.json: stages[1].resolution: expected an integer in 1..4096, got 100000``.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pydiff.errors import PackageError
from pydiff.guidance import check_interval
from pydiff.samplers import SAMPLERS, make_sampler
from pydiff.schedules import MAX_TRAIN_TIMESTEPS, Schedule, parse_json_bytes
from pydiff.step_params import PREDICTION_TYPES, THRESHOLDINGS

__all__ = [
    "PackageError",
    "Package",
    "Stage",
    "TextEncoderSpec",
    "VaeSpec",
    "GuidanceModelSpec",
    "load_package",
    "check_stage_io",
    "check_text_encoder_io",
    "INPUT_SPECS",
    "MAX_RESOLUTION",
    "GUIDANCE_KINDS",
    "RECOMMENDED_DEFAULTS",
    "onnx_external_data",
]

FORMAT = "pydiff-package"
SUPPORTED_VERSIONS = (1,)
MAX_RESOLUTION = 4096  # pixels per side; stops absurd manifests before any allocation
MAX_CHANNELS = 64
MAX_TEXT_LENGTH = 4096
MAX_HIDDEN_SIZE = 65536
MAX_STEPS = 10000
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KB; refuse to json-parse anything huge
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the settings are used in float32

# What a stage's `recommended` block means where it leaves a key out (the pipeline's settings use
# these; the load-time check that the schedule can run them uses the same).
RECOMMENDED_DEFAULTS: dict[str, Any] = {
    "sampler": "ddim",
    "steps": 25,
    "guidance_scale": 1.0,
    "eta": 0.0,
    "thresholding": "none",
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "clip_sample_range": 1.0,
    "jump_length": 10,
    "jump_n_sample": 1,
    "guidance_interval": None,  # guidance at every step
}

CONDITIONINGS = ("text", "class", "none")
# guidance model kind -> the inputs its network takes (docs/model-package.md, guidance_models)
GUIDANCE_KINDS: dict[str, tuple[str, ...]] = {
    "classifier": ("sample", "timestep", "class_labels"),
    "clip": ("sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"),
}

# name -> (ONNX element type, rank) of every stage network input the format knows.
INPUT_SPECS: dict[str, tuple[str, int]] = {
    "sample": ("tensor(float)", 4),
    "timestep": ("tensor(float)", 1),
    "encoder_hidden_states": ("tensor(float)", 3),
    "encoder_attention_mask": ("tensor(float)", 2),
    "class_labels": ("tensor(int64)", 1),
    "low_res": ("tensor(float)", 4),
    "noise_level": ("tensor(float)", 1),
    "mask": ("tensor(float)", 4),
    "masked_image": ("tensor(float)", 4),
    "image_condition": ("tensor(float)", 4),  # Palette: the input image, concatenated (see IMAGE_CONDITIONS)
}
# What a stage's `image_condition` input is made from (`stages[i].image_condition.from`): "grey", the
# BT.601 luma of the user's image in [-1, 1], one channel (colorization)
IMAGE_CONDITIONS = ("grey",)


def input_dtype(name: str) -> type:
    """The NumPy dtype of a stage network input (docs/model-package.md): int64 labels, else f32."""
    return np.int64 if INPUT_SPECS.get(name, ("tensor(float)",))[0] == "tensor(int64)" else np.float32


@dataclass(frozen=True)
class TextEncoderSpec:
    onnx: Path  # absolute path of the encoder ONNX file
    tokenizer: Path  # absolute path of the tokenizers JSON file
    max_length: int
    hidden_size: int | None
    name: str | None = None
    # "per_prompt": each prompt encoded alone (its states depend on it only); "batched": all of a
    # call's prompts in one run, as stages trained on batch-encoded captions expect (an encoder with
    # dynamic int8 quantisation takes one scale per run, so batch-mates change each other)
    encode: str = "per_prompt"


@dataclass(frozen=True)
class VaeSpec:
    """A latent package's autoencoder (`vae` entry): the decoder turns the last stage's latents into
    images, ``image = decoder(latents / scaling_factor + shift_factor)``; the encoder (optional, for
    img2img and inpainting) the reverse, ``latents = (encoder(image) - shift_factor) * scaling_factor``."""

    decoder: Path  # absolute path: input `latent` [B, C, h, w] -> output `image` [B, 3, h*s, w*s] in [-1, 1]
    latent_channels: int
    scale: int  # image pixels per latent pixel, per side (8 for Stable Diffusion's VAE)
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    encoder: Path | None = None  # input `image` [B, 3, H, W] -> output `latent` (the posterior's mean)
    name: str | None = None


@dataclass(frozen=True)
class Stage:
    """One stage of a cascade, as the manifest describes it (paths made absolute)."""

    index: int
    name: str
    onnx: Path
    resolution: int
    channels: int
    conditioning: str  # "text" | "class" | "none"
    num_classes: int | None
    inputs: tuple[str, ...]
    output: str
    prediction_type: str
    scheduler: Mapping[str, Any]  # diffusers-style scheduler config
    recommended: Mapping[str, Any]
    low_res_resolution: int | None = None  # super-resolution stages only
    noise_aug_scheduler: Mapping[str, Any] | None = None
    noise_aug_level: int | None = None
    noise_aug_max_level: int | None = None  # the highest level training drew (level <= it)
    # class stages: the label num_classes means "no class" (trained with condition dropout); False
    # for networks without one (most diffusers class-conditional UNets): no classifier-free guidance
    unconditional_class: bool = True
    # Palette-style stages: what the `image_condition` input is made from (IMAGE_CONDITIONS), or None
    image_condition: str | None = None

    @property
    def is_super_resolution(self) -> bool:
        return "low_res" in self.inputs

    @property
    def has_mask_channel(self) -> bool:
        """An inpainting network that takes `mask` and `masked_image` as inputs."""
        return "mask" in self.inputs


@dataclass(frozen=True)
class GuidanceModelSpec:
    """A guidance model (classifier / CLIP) whose ONNX network outputs the input gradient."""

    index: int
    name: str
    kind: str  # "classifier" | "clip"
    onnx: Path  # absolute path
    stage: str  # the stage whose x_t it guides
    inputs: tuple[str, ...]
    output: str  # the gradient output's name
    num_classes: int | None = None  # classifier only
    class_names: tuple[str, ...] | None = None  # classifier only, optional: what each label means
    recommended: Mapping[str, Any] = field(default_factory=dict)  # {"scale": s}


@dataclass(frozen=True)
class Package:
    path: Path  # the package directory (resolved)
    manifest_path: Path
    name: str
    description: str
    version: int
    text_encoder: TextEncoderSpec | None
    stages: tuple[Stage, ...]
    manifest: Mapping[str, Any] = field(repr=False, compare=False)
    guidance_models: tuple[GuidanceModelSpec, ...] = ()
    vae: VaeSpec | None = None  # a latent package: the last stage samples latents, the VAE decodes them

    @property
    def image_resolution(self) -> int:
        """The side of the images a call makes: the last stage's, times the VAE's scale if latent."""
        r = self.stages[-1].resolution
        return r * self.vae.scale if self.vae is not None else r

    def guidance_model(self, kind: str, stage: str | None = None) -> GuidanceModelSpec | None:
        """The first guidance model of `kind` (for `stage` when given), or None."""
        for g in self.guidance_models:
            if g.kind == kind and (stage is None or g.stage == stage):
                return g
        return None

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"unknown stage {name!r}; this package has {[s.name for s in self.stages]}")

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]


# --------------------------------------------------------------------------------------------
# manifest parsing helpers: each takes the key path for its error message


class _Ctx:
    def __init__(self, manifest_path: Path, root: Path):
        self.file = manifest_path
        self.root = root

    def error(self, key: str, problem: str) -> PackageError:
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        return PackageError(where + problem)


def _typename(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _get(ctx: _Ctx, obj: Mapping, key: str, where: str, *, required: bool = True, default=None):
    if key not in obj:
        if required:
            raise ctx.error(f"{where}.{key}" if where else key, "missing required key")
        return default
    return obj[key]


def _str(ctx, obj, key, where, *, required=True, default=None, choices=None):
    v = _get(ctx, obj, key, where, required=required, default=default)
    k = f"{where}.{key}" if where else key
    if v is None and not required:
        return default
    if not isinstance(v, str):
        raise ctx.error(k, f"expected a string, got {_typename(v)}")
    if choices is not None and v not in choices:
        raise ctx.error(k, f"expected one of {list(choices)}, got {v!r}")
    return v


def _int(ctx, obj, key, where, lo, hi, *, required=True, default=None, nullable=False):
    v = _get(ctx, obj, key, where, required=required, default=default)
    k = f"{where}.{key}" if where else key
    if v is None and (nullable or not required):
        return None if nullable else default
    # bool is an int subclass in Python; `true` is not a resolution
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ctx.error(k, f"expected an integer in {lo}..{hi}, got {v!r}")
    return v


def _number(ctx, obj, key, where, lo=-math.inf, hi=math.inf, *, lo_open=False, required=False):
    v = _get(ctx, obj, key, where, required=required)
    k = f"{where}.{key}" if where else key
    if v is None:
        return None
    ok = (
        not isinstance(v, bool)
        and isinstance(v, (int, float))
        and math.isfinite(v)
        and abs(v) <= FLOAT32_MAX
        and (lo < v if lo_open else lo <= v)
        and v <= hi
    )
    if not ok:
        lo_s = "(" if lo_open else "["
        within = "" if lo == -math.inf and hi == math.inf else f" in {lo_s}{lo}, {hi}]"
        raise ctx.error(k, f"expected a number finite in float32{within}, got {v!r}")
    return float(v)


def _obj(ctx, obj, key, where, *, required=True):
    v = _get(ctx, obj, key, where, required=required)
    k = f"{where}.{key}" if where else key
    if v is None and not required:
        return None
    if not isinstance(v, dict):
        raise ctx.error(k, f"expected an object, got {_typename(v)}")
    return v


def _path(ctx: _Ctx, obj, key, where) -> Path:
    """A file path relative to the package directory that must stay inside it."""
    rel = _str(ctx, obj, key, where)
    k = f"{where}.{key}" if where else key
    if not rel or "\x00" in rel:
        raise ctx.error(k, f"expected a relative file path, got {rel!r}")
    pure = Path(rel.replace("\\", "/"))
    if pure.is_absolute() or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise ctx.error(k, f"path {rel!r} must be relative to the package directory")
    if ".." in pure.parts:
        raise ctx.error(k, f"path {rel!r} must not contain '..'")
    full = ctx.root / pure
    real = Path(os.path.realpath(full))
    if real != ctx.root and ctx.root not in real.parents:
        raise ctx.error(k, f"path {rel!r} leaves the package directory (through a link)")
    if not real.exists():
        raise ctx.error(k, f"file {rel!r} does not exist ({full})")
    if not real.is_file():
        raise ctx.error(k, f"{rel!r} is not a regular file ({full})")
    if real.stat().st_size == 0:
        raise ctx.error(k, f"file {rel!r} is empty ({full})")
    return real


# --------------------------------------------------------------------------------------------
# ONNX external data: read from the protobuf wire format (the onnx package is not a runtime
# dependency), so that no version of ONNX Runtime is trusted to keep a model inside its package


class _Malformed(Exception):
    """Not a protobuf message; ONNX Runtime's own parser refuses the file with its error."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value): a varint's value, or a length-delimited field's (start, end)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Malformed
            yield number, wire, (pos, pos + n)
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed
        else:  # groups: not in onnx.proto
            raise _Malformed


# onnx.proto's field numbers of the messages that hold tensors, and what each field holds
_GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _FUNCTION, _TRAINING = range(7)
_HOLDS = {
    "model": {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _FUNCTION: {7: _NODE},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 8, 13, 14, 1


def _tensor_external(buf, start: int, end: int) -> tuple[str, str | None] | None:
    """(tensor name, external data location or None) of a TensorProto stored externally, else None."""
    name, location, external = "", None, False
    for number, wire, value in _fields(buf, start, end):
        if number == _TENSOR_NAME and wire == 2:
            name = bytes(buf[value[0] : value[1]]).decode("utf-8", "replace")
        elif number == _TENSOR_DATA_LOCATION and wire == 0:
            external = value == _EXTERNAL
        elif number == _TENSOR_EXTERNAL_DATA and wire == 2:
            external = True
            entry = {}
            for n, w, v in _fields(buf, *value):
                if w == 2 and n in (1, 2):
                    entry[n] = bytes(buf[v[0] : v[1]]).decode("utf-8", "replace")
            if entry.get(1) == "location":
                location = entry.get(2, "")
    return (name, location) if external else None


def onnx_external_data(path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """(tensor name, location) of every tensor of an ONNX file kept in external data: initializers,
    sparse initializers and constants, in subgraphs and functions too; location None where the
    tensor is marked external but names no file. An unparseable file gives what was found before
    the damage (ONNX Runtime refuses the file itself)."""
    found: list[tuple[str, str | None]] = []
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return found
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            stack = [("model", 0, len(buf))]  # no recursion: subgraphs nest as deep as a file says
            try:
                while stack:
                    kind, start, end = stack.pop()
                    if kind == _TENSOR:
                        ext = _tensor_external(buf, start, end)
                        if ext is not None:
                            found.append(ext)
                        continue
                    holds = _HOLDS[kind]
                    for number, wire, value in _fields(buf, start, end):
                        if wire == 2 and number in holds:
                            stack.append((holds[number], *value))
            except _Malformed:
                pass
    return found


def _check_external_data(ctx: _Ctx, k: str, onnx_file: Path) -> None:
    """Every external data file of an ONNX network lies inside the package, as a regular file."""
    for tensor, location in onnx_external_data(onnx_file):
        what = f"external data of tensor {tensor!r} in {onnx_file.name}"
        if not location or "\x00" in location:
            raise ctx.error(k, f"{what}: no file location given")
        pure = Path(location.replace("\\", "/"))
        if (
            pure.is_absolute()
            or location.startswith(("/", "\\"))
            or (len(location) > 1 and location[1] == ":")
        ):
            raise ctx.error(k, f"{what}: the absolute path {location!r} leaves the package directory")
        if ".." in pure.parts:
            raise ctx.error(k, f"{what}: the path {location!r} must not contain '..'")
        real = Path(os.path.realpath(onnx_file.parent / pure))
        if ctx.root not in real.parents:
            raise ctx.error(k, f"{what}: {location!r} leaves the package directory (through a link)")
        if not real.is_file():
            raise ctx.error(k, f"{what}: {location!r} is not a regular file in the package")


def _onnx_path(ctx: _Ctx, obj, key, where) -> Path:
    """An ONNX file of the package (see _path) whose external data stays inside the package too."""
    real = _path(ctx, obj, key, where)
    _check_external_data(ctx, f"{where}.{key}" if where else key, real)
    return real


def _read_manifest(manifest_path: Path) -> dict:
    try:
        size = manifest_path.stat().st_size
    except OSError as e:
        raise PackageError(f"{manifest_path}: cannot read the manifest ({e.strerror})") from None
    if size > MAX_MANIFEST_BYTES:
        raise PackageError(
            f"{manifest_path}: manifest is {size} bytes; over the {MAX_MANIFEST_BYTES}-byte limit"
        )
    try:
        with open(manifest_path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)  # the file may grow after the stat
    except OSError as e:
        raise PackageError(f"{manifest_path}: cannot read the manifest ({e.strerror})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise PackageError(f"{manifest_path}: manifest is over the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        data = parse_json_bytes(raw)
    except ValueError as e:
        raise PackageError(f"{manifest_path}: {e}") from None
    if not isinstance(data, dict):
        raise PackageError(f"{manifest_path}: expected a JSON object at the top level, got {_typename(data)}")
    return data


def _scheduler(ctx, obj, key, where, *, required=True) -> dict | None:
    sch = _obj(ctx, obj, key, where, required=required)
    if sch is None:
        return None
    k = f"{where}.{key}"
    _int(ctx, sch, "num_train_timesteps", k, 1, MAX_TRAIN_TIMESTEPS, required=False)
    for name in ("beta_schedule", "prediction_type", "timestep_spacing"):
        _str(ctx, sch, name, k, required=False)
    if "prediction_type" in sch:
        _str(ctx, sch, "prediction_type", k, choices=PREDICTION_TYPES)
    return dict(sch)


def _recommended(ctx, obj, where) -> dict:
    rec = _obj(ctx, obj, "recommended", where, required=False) or {}
    k = f"{where}.recommended"
    _recommended_fields(ctx, rec, k)
    inpaint = _obj(ctx, rec, "inpaint", k, required=False)
    if inpaint is not None:  # the settings that differ when the stage inpaints
        if "inpaint" in inpaint:
            raise ctx.error(f"{k}.inpaint.inpaint", "not allowed (inpaint overrides are one level)")
        _recommended_fields(ctx, inpaint, f"{k}.inpaint")
    return dict(rec)


def _build_schedule(ctx, config: dict, key: str) -> Schedule:
    """The schedule a scheduler block describes, built as the pipeline builds it (its ScheduleError
    becomes this file's PackageError naming the key)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # keys pydiff ignores: the pipeline warns when it builds it
            return Schedule.from_config(dict(config))
    except (ValueError, TypeError) as e:
        raise ctx.error(key, str(e)) from None


def _check_runnable(ctx, where: str, schedule: Schedule, recommended: dict) -> None:
    """The stage's recommended sampler, steps and eta (and its inpainting ones) run on its own
    schedule: refused at load, not on the first call that leaves them as they are. (RePaint's jumps
    against the steps are the call's settings, checked when they are resolved.)"""
    base = {**RECOMMENDED_DEFAULTS, **{k: v for k, v in recommended.items() if k != "inpaint"}}
    blocks = [(f"{where}.recommended", base)]
    if recommended.get("inpaint") is not None:
        blocks.append((f"{where}.recommended.inpaint", {**base, **recommended["inpaint"]}))
    T = schedule.num_train_timesteps
    for k, rec in blocks:
        sampler, steps, eta = rec["sampler"], rec["steps"], rec["eta"]
        if sampler not in SAMPLERS:
            raise ctx.error(f"{k}.sampler", f"unknown sampler {sampler!r}; pydiff has {list(SAMPLERS)}")
        if steps > T:
            raise ctx.error(f"{k}.steps", f"{steps} steps, but {where}.scheduler has num_train_timesteps={T}")
        try:
            make_sampler(sampler, schedule, steps, eta=eta)
        except (ValueError, TypeError) as e:
            raise ctx.error(
                k, f"sampler {sampler!r}, {steps} steps, eta {eta} cannot run on {where}.scheduler: {e}"
            ) from None


def _recommended_fields(ctx, rec, k) -> None:
    _str(ctx, rec, "sampler", k, required=False)
    _int(ctx, rec, "steps", k, 1, MAX_STEPS, required=False)
    _number(ctx, rec, "guidance_scale", k)
    _number(ctx, rec, "eta", k, 0.0)
    _str(ctx, rec, "thresholding", k, required=False, choices=THRESHOLDINGS)
    _number(ctx, rec, "dynamic_thresholding_ratio", k, 0.0, 1.0, lo_open=True)
    _number(ctx, rec, "sample_max_value", k, 1.0)
    _number(ctx, rec, "clip_sample_range", k, 0.0, lo_open=True)
    _int(ctx, rec, "jump_length", k, 1, MAX_STEPS, required=False)
    _int(ctx, rec, "jump_n_sample", k, 1, MAX_STEPS, required=False)
    try:
        check_interval(rec.get("guidance_interval"), f"{k}.guidance_interval")
    except (TypeError, ValueError) as e:
        raise ctx.error(f"{k}.guidance_interval", str(e).split(": ", 1)[-1]) from None


def _name(ctx: _Ctx, raw: dict, where: str) -> str:
    """The `name` of a stage or guidance model: letters, digits, '_', '-' or '.'."""
    name = _str(ctx, raw, "name", where)
    if not name or not all(c.isalnum() or c in "_-." for c in name):
        raise ctx.error(
            f"{where}.name", f"expected a non-empty name of letters, digits, '_', '-' or '.', got {name!r}"
        )
    return name


def _parse_stage(
    ctx: _Ctx, raw: Any, i: int, text_encoder: TextEncoderSpec | None, previous: Stage | None
) -> Stage:
    where = f"stages[{i}]"
    if not isinstance(raw, dict):
        raise ctx.error(where, f"expected an object, got {_typename(raw)}")
    name = _name(ctx, raw, where)
    onnx_path = _onnx_path(ctx, raw, "onnx", where)
    resolution = _int(ctx, raw, "resolution", where, 1, MAX_RESOLUTION)
    channels = _int(ctx, raw, "channels", where, 1, MAX_CHANNELS)
    conditioning = _str(ctx, raw, "conditioning", where, choices=CONDITIONINGS)
    num_classes = _int(ctx, raw, "num_classes", where, 1, 1 << 30, required=False, nullable=True)
    if conditioning == "class" and num_classes is None:
        raise ctx.error(f"{where}.num_classes", 'required (an integer >= 1) with conditioning "class"')

    inputs_raw = _get(ctx, raw, "inputs", where)
    if not isinstance(inputs_raw, list) or not all(isinstance(x, str) for x in inputs_raw):
        raise ctx.error(f"{where}.inputs", f"expected a list of input names, got {inputs_raw!r}")
    inputs = tuple(inputs_raw)
    for name_ in inputs:
        if name_ not in INPUT_SPECS:
            raise ctx.error(
                f"{where}.inputs", f"unknown input {name_!r}; the format knows {list(INPUT_SPECS)}"
            )
    if len(set(inputs)) != len(inputs):
        raise ctx.error(f"{where}.inputs", "an input is listed twice")
    for needed in ("sample", "timestep"):
        if needed not in inputs:
            raise ctx.error(f"{where}.inputs", f"must contain {needed!r}")
    if conditioning == "text":
        if "encoder_hidden_states" not in inputs:
            raise ctx.error(f"{where}.inputs", 'conditioning "text" needs "encoder_hidden_states"')
        if text_encoder is None:
            raise ctx.error(f"{where}.conditioning", 'is "text" but the package has no text_encoder')
    elif "encoder_hidden_states" in inputs or "encoder_attention_mask" in inputs:
        raise ctx.error(f"{where}.inputs", f"text inputs given but conditioning is {conditioning!r}")
    if (conditioning == "class") != ("class_labels" in inputs):
        raise ctx.error(f"{where}.inputs", 'conditioning "class" and the input "class_labels" go together')
    unconditional_class = _get(ctx, raw, "unconditional_class", where, required=False, default=True)
    if not isinstance(unconditional_class, bool):
        raise ctx.error(
            f"{where}.unconditional_class", f"expected true or false, got {unconditional_class!r}"
        )
    if not unconditional_class and conditioning != "class":
        raise ctx.error(f"{where}.unconditional_class", 'only a "class" stage can lack it')
    if ("mask" in inputs) != ("masked_image" in inputs):
        raise ctx.error(f"{where}.inputs", '"mask" and "masked_image" go together')
    if ("noise_level" in inputs) and ("low_res" not in inputs):
        raise ctx.error(f"{where}.inputs", '"noise_level" without "low_res"')
    image_condition = None
    ic = _obj(ctx, raw, "image_condition", where, required=False)
    if ("image_condition" in inputs) != (ic is not None):
        raise ctx.error(
            f"{where}.image_condition",
            'the input "image_condition" and the object {"from": ...} that says what it is go together',
        )
    if ic is not None:
        image_condition = _str(ctx, ic, "from", f"{where}.image_condition", choices=IMAGE_CONDITIONS)

    output = _str(ctx, raw, "output", where)
    prediction_type = _str(ctx, raw, "prediction_type", where, choices=PREDICTION_TYPES)
    scheduler = _scheduler(ctx, raw, "scheduler", where)
    sp = scheduler.get("prediction_type")
    if sp is not None and sp != prediction_type:
        raise ctx.error(
            f"{where}.scheduler.prediction_type",
            f"{sp!r} disagrees with {where}.prediction_type {prediction_type!r}",
        )
    scheduler.setdefault("prediction_type", prediction_type)
    recommended = _recommended(ctx, raw, where)
    schedule = _build_schedule(ctx, scheduler, f"{where}.scheduler")
    _check_runnable(ctx, where, schedule, recommended)

    low_res_resolution = aug_sched = aug_level = aug_max = None
    if "low_res" in inputs:
        low_res_resolution = _int(ctx, raw, "low_res_resolution", where, 1, MAX_RESOLUTION)
        aug = _obj(ctx, raw, "noise_aug", where)
        aug_sched = _scheduler(ctx, aug, "scheduler", f"{where}.noise_aug")
        _build_schedule(ctx, aug_sched, f"{where}.noise_aug.scheduler")
        t_max = int(aug_sched.get("num_train_timesteps", 1000))
        # training drew levels from [0, max_level]: a level above it was never seen (optional,
        # default: the whole schedule)
        aug_max = _int(
            ctx, aug, "max_level", f"{where}.noise_aug", 0, t_max - 1, required=False, default=t_max - 1
        )
        aug_level = _int(ctx, aug, "level", f"{where}.noise_aug", 0, aug_max)
        if previous is not None:
            if low_res_resolution != previous.resolution:
                raise ctx.error(
                    f"{where}.low_res_resolution",
                    f"{low_res_resolution} but the previous stage {previous.name!r} "
                    f"makes {previous.resolution}x{previous.resolution} images",
                )
            if previous.channels != 3:
                raise ctx.error(
                    f"{where}.inputs",
                    f"low_res needs 3 channels but the previous "
                    f"stage {previous.name!r} has {previous.channels}",
                )
        if low_res_resolution > resolution:
            raise ctx.error(
                f"{where}.low_res_resolution",
                f"{low_res_resolution} is larger than the stage's resolution {resolution}",
            )
    elif previous is not None:
        raise ctx.error(
            f"{where}.inputs",
            'a stage after the first must be a super-resolution stage (inputs "low_res", "noise_level")',
        )

    return Stage(
        index=i,
        name=name,
        onnx=onnx_path,
        resolution=resolution,
        channels=channels,
        conditioning=conditioning,
        num_classes=num_classes,
        inputs=inputs,
        output=output,
        prediction_type=prediction_type,
        scheduler=scheduler,
        recommended=recommended,
        low_res_resolution=low_res_resolution,
        noise_aug_scheduler=aug_sched,
        noise_aug_level=aug_level,
        noise_aug_max_level=aug_max,
        unconditional_class=unconditional_class,
        image_condition=image_condition,
    )


def _parse_guidance_model(ctx: _Ctx, raw: Any, i: int, stages: list[Stage]) -> GuidanceModelSpec:
    where = f"guidance_models[{i}]"
    if not isinstance(raw, dict):
        raise ctx.error(where, f"expected an object, got {_typename(raw)}")
    name = _name(ctx, raw, where)
    kind = _str(ctx, raw, "kind", where, choices=tuple(GUIDANCE_KINDS))
    onnx_path = _onnx_path(ctx, raw, "onnx", where)
    stage_name = _str(ctx, raw, "stage", where)
    st = next((s for s in stages if s.name == stage_name), None)
    if st is None:
        raise ctx.error(
            f"{where}.stage", f"unknown stage {stage_name!r}; the stages are {[s.name for s in stages]}"
        )
    inputs_raw = _get(ctx, raw, "inputs", where)
    if not isinstance(inputs_raw, list) or not all(isinstance(x, str) for x in inputs_raw):
        raise ctx.error(f"{where}.inputs", f"expected a list of input names, got {inputs_raw!r}")
    want = GUIDANCE_KINDS[kind]
    if sorted(inputs_raw) != sorted(want):
        raise ctx.error(f"{where}.inputs", f"a {kind!r} guidance model takes {list(want)}, got {inputs_raw}")
    output = _str(ctx, raw, "output", where, required=False, default="grad")
    num_classes = None
    class_names = None
    if kind == "classifier":
        num_classes = _int(ctx, raw, "num_classes", where, 1, 1 << 30)
        names = _get(ctx, raw, "class_names", where, required=False)
        if names is not None:
            if (
                not isinstance(names, list)
                or len(names) != num_classes
                or not all(isinstance(n, str) for n in names)
            ):
                raise ctx.error(f"{where}.class_names", f"expected a list of {num_classes} strings")
            class_names = tuple(names)
    elif st.conditioning != "text":
        raise ctx.error(
            f"{where}.stage",
            f"CLIP guidance needs a text-conditional stage's prompts; "
            f"stage {stage_name!r} is {st.conditioning!r}",
        )
    rec = _obj(ctx, raw, "recommended", where, required=False) or {}
    _number(ctx, rec, "scale", f"{where}.recommended")
    return GuidanceModelSpec(
        index=i,
        name=name,
        kind=kind,
        onnx=onnx_path,
        stage=stage_name,
        inputs=tuple(inputs_raw),
        output=output,
        num_classes=num_classes,
        class_names=class_names,
        recommended=dict(rec),
    )


BUNDLED_ROOT = Path(__file__).resolve().parent / "bundled"
DEFAULT_PACKAGE = "shapes"


def bundled_path(name: str = DEFAULT_PACKAGE) -> Path:
    """Where the bundled package `name` lives: pydiff/bundled/<name>."""
    return BUNDLED_ROOT / name


def bundled_packages() -> list[str]:
    """Names of the bundled packages present (those with a manifest.json)."""
    if not BUNDLED_ROOT.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_ROOT.iterdir() if (p / "manifest.json").is_file())


def package_path(model: str | os.PathLike | None) -> Path:
    """The folder a package argument names: a path, else a bundled package's name ("digits"),
    None for the bundled shapes cascade. A path that exists wins over a bundled name."""
    if model is None:
        return bundled_path(DEFAULT_PACKAGE)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"a model package is a path or a bundled package's name, got {type(model).__name__}")
    p = Path(model)
    if not p.exists() and isinstance(model, str) and model in bundled_packages():
        return bundled_path(model)
    return p


_SHARING: set[str] = set()  # bundled packages whose shared text encoder is being resolved


def _shared_text_encoder(ctx: _Ctx, raw: dict) -> TextEncoderSpec:
    """`"text_encoder": {"shared": "shapes"}`: the text encoder of the bundled package of that name,
    its one file on disk (packages that condition on the same encoder ship it once)."""
    name = _str(ctx, raw, "shared", "text_encoder", choices=[n for n in bundled_packages()])
    if set(raw) != {"shared"}:
        raise ctx.error(
            "text_encoder", f"a shared text encoder has no other keys, got {sorted(set(raw) - {'shared'})}"
        )
    if name in _SHARING:
        raise ctx.error(
            "text_encoder.shared", f"{name!r} shares its text encoder in a cycle: {sorted(_SHARING)}"
        )
    _SHARING.add(name)
    try:
        other = load_package(bundled_path(name))
    finally:
        _SHARING.discard(name)
    if other.text_encoder is None:
        raise ctx.error("text_encoder.shared", f"the bundled package {name!r} has no text encoder")
    return other.text_encoder


def load_package(path: str | os.PathLike | None) -> Package:
    """Read and validate the package directory `path` (or its `manifest.json`); a bundled
    package's name ("shapes", "digits") or None (shapes) names a bundled package."""
    p = package_path(path)
    if path is None and not (p / "manifest.json").is_file():
        raise PackageError(
            f"{p}: the bundled {DEFAULT_PACKAGE!r} package is not installed; pass a model package directory"
        )
    if p.is_file() and p.name == "manifest.json":
        p = p.parent
    if not p.exists():
        names = ", ".join(bundled_packages()) or "none installed"
        raise PackageError(f"{p}: model package directory does not exist (bundled packages: {names})")
    if not p.is_dir():
        raise PackageError(f"{p}: a model package is a directory with a manifest.json")
    root = Path(os.path.realpath(p))
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise PackageError(f"{manifest_path}: missing (a model package needs a manifest.json)")
    data = _read_manifest(manifest_path)
    ctx = _Ctx(manifest_path, root)

    fmt = _str(ctx, data, "format", "")
    if fmt != FORMAT:
        raise ctx.error("format", f"expected {FORMAT!r}, got {fmt!r}")
    version = _get(ctx, data, "version", "")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ctx.error("version", f"expected an integer, got {_typename(version)}")
    if version not in SUPPORTED_VERSIONS:
        raise ctx.error(
            "version",
            f"unsupported package format version {version}; this pydiff "
            f"reads version(s) {list(SUPPORTED_VERSIONS)}",
        )
    name = _str(ctx, data, "name", "")
    description = _str(ctx, data, "description", "", required=False, default="")

    te = None
    te_raw = _obj(ctx, data, "text_encoder", "", required=False)
    if te_raw is not None and "shared" in te_raw:
        te = _shared_text_encoder(ctx, te_raw)
    elif te_raw is not None:
        te = TextEncoderSpec(
            onnx=_onnx_path(ctx, te_raw, "onnx", "text_encoder"),
            tokenizer=_path(ctx, te_raw, "tokenizer", "text_encoder"),
            max_length=_int(ctx, te_raw, "max_length", "text_encoder", 1, MAX_TEXT_LENGTH),
            hidden_size=_int(
                ctx, te_raw, "hidden_size", "text_encoder", 1, MAX_HIDDEN_SIZE, required=False, nullable=True
            ),
            name=_str(ctx, te_raw, "name", "text_encoder", required=False),
            encode=_str(
                ctx,
                te_raw,
                "encode",
                "text_encoder",
                required=False,
                default="per_prompt",
                choices=("per_prompt", "batched"),
            ),
        )

    stages_raw = _get(ctx, data, "stages", "")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ctx.error("stages", f"expected a non-empty list of stages, got {stages_raw!r:.60}")
    stages: list[Stage] = []
    for i, raw in enumerate(stages_raw):
        st = _parse_stage(ctx, raw, i, te, stages[-1] if stages else None)
        if any(s.name == st.name for s in stages):
            raise ctx.error(f"stages[{i}].name", f"duplicate stage name {st.name!r}")
        stages.append(st)
    vae = _parse_vae(ctx, data, stages)
    gms: list[GuidanceModelSpec] = []
    gm_raw = _get(ctx, data, "guidance_models", "", required=False, default=None)
    if gm_raw is not None:
        if not isinstance(gm_raw, list):
            raise ctx.error("guidance_models", f"expected a list, got {_typename(gm_raw)}")
        for i, raw in enumerate(gm_raw):
            g = _parse_guidance_model(ctx, raw, i, stages)
            if any(o.name == g.name for o in gms):
                raise ctx.error(f"guidance_models[{i}].name", f"duplicate name {g.name!r}")
            gms.append(g)
    return Package(
        path=root,
        manifest_path=manifest_path,
        name=name,
        description=description,
        version=version,
        text_encoder=te,
        stages=tuple(stages),
        manifest=data,
        guidance_models=tuple(gms),
        vae=vae,
    )


def _parse_vae(ctx: _Ctx, data: dict, stages: list[Stage]) -> VaeSpec | None:
    """The `vae` entry of a latent package: one stage (a latent cascade is not supported yet) whose
    channels are the latents'."""
    raw = _obj(ctx, data, "vae", "", required=False)
    if raw is None:
        return None
    decoder = _onnx_path(ctx, raw, "decoder", "vae")
    encoder = _onnx_path(ctx, raw, "encoder", "vae") if raw.get("encoder") is not None else None
    channels = _int(ctx, raw, "latent_channels", "vae", 1, MAX_CHANNELS)
    scale = _int(ctx, raw, "scale", "vae", 1, 64)
    scaling = _number(ctx, raw, "scaling_factor", "vae", 0.0, lo_open=True)
    shift = _number(ctx, raw, "shift_factor", "vae")
    if len(stages) != 1:
        raise ctx.error("vae", f"a latent package has one stage, this one has {len(stages)}")
    if stages[0].channels != channels:
        raise ctx.error(
            "vae.latent_channels",
            f"{channels}, but stage {stages[0].name!r} has {stages[0].channels} channels",
        )
    if stages[0].resolution * scale > MAX_RESOLUTION:
        raise ctx.error("vae.scale", f"{scale} x {stages[0].resolution} is over {MAX_RESOLUTION} pixels")
    return VaeSpec(
        decoder=decoder,
        latent_channels=channels,
        scale=scale,
        scaling_factor=1.0 if scaling is None else scaling,
        shift_factor=0.0 if shift is None else shift,
        encoder=encoder,
        name=_str(ctx, raw, "name", "vae", required=False),
    )


# --------------------------------------------------------------------------------------------
# ONNX graph checks against the manifest (the backend calls these on its ORT sessions)


def _static(d) -> int | None:
    return d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None


def check_stage_io(package: Package, stage: Stage, session) -> None:
    """Check an onnxruntime session's inputs/outputs against the stage's manifest entry."""
    f = stage.onnx
    where = f"stages[{stage.index}]"
    got = {i.name: i for i in session.get_inputs()}
    missing = [n for n in stage.inputs if n not in got]
    extra = [n for n in got if n not in stage.inputs]
    if missing or extra:
        raise PackageError(
            f"{f}: ONNX inputs {sorted(got)} disagree with {package.manifest_path} "
            f"{where}.inputs {list(stage.inputs)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (not in the manifest {extra})" if extra else "")
        )
    for n in stage.inputs:
        want_type, want_rank = INPUT_SPECS[n]
        inp = got[n]
        if inp.type != want_type:
            raise PackageError(
                f"{f}: input {n!r} has type {inp.type}, the format needs {want_type} "
                f"({package.manifest_path} {where}.inputs)"
            )
        shape = list(inp.shape) if inp.shape is not None else None
        if shape is not None and len(shape) != want_rank:
            raise PackageError(
                f"{f}: input {n!r} has rank {len(shape)} (shape {shape}), the format needs rank {want_rank}"
            )
        if shape is None:
            continue
        expect: dict[int, int] = {}
        if n == "sample":
            expect = {1: stage.channels, 2: stage.resolution, 3: stage.resolution}
        elif n in ("low_res", "masked_image"):
            expect = {1: 3, 2: stage.resolution, 3: stage.resolution}
        elif n == "mask":
            expect = {1: 1, 2: stage.resolution, 3: stage.resolution}
        elif n == "encoder_hidden_states" and package.text_encoder is not None:
            expect = {1: package.text_encoder.max_length}
            if package.text_encoder.hidden_size:
                expect[2] = package.text_encoder.hidden_size
        elif n == "encoder_attention_mask" and package.text_encoder is not None:
            expect = {1: package.text_encoder.max_length}
        for axis, want in expect.items():
            have = _static(shape[axis])
            if have is not None and have != want:
                raise PackageError(
                    f"{f}: input {n!r} has shape {shape}; axis {axis} should be "
                    f"{want} per {package.manifest_path} {where}"
                )
    outs = session.get_outputs()
    names = [o.name for o in outs]
    if names != [stage.output]:
        raise PackageError(
            f"{f}: ONNX outputs {names} disagree with {package.manifest_path} "
            f"{where}.output {stage.output!r} (a stage network has one output)"
        )
    o = outs[0]
    if o.type != "tensor(float)":
        raise PackageError(f"{f}: output {o.name!r} has type {o.type}, expected tensor(float)")
    if o.shape is not None and len(o.shape) != 4:
        raise PackageError(f"{f}: output {o.name!r} has shape {list(o.shape)}, expected rank 4 like 'sample'")


def check_text_encoder_io(package: Package, session) -> None:
    """Check the text encoder session: int64 input_ids (and attention_mask, where the encoder takes
    one: CLIP as Stable Diffusion runs it takes none) -> last_hidden_state."""
    te = package.text_encoder
    f = te.onnx
    got = {i.name: i for i in session.get_inputs()}
    for n in ("input_ids", "attention_mask"):
        if n not in got and n == "attention_mask":
            continue
        if n not in got:
            raise PackageError(f"{f}: the text encoder has no input {n!r} (inputs {sorted(got)})")
        if got[n].type != "tensor(int64)":
            raise PackageError(
                f"{f}: text encoder input {n!r} has type {got[n].type}, expected tensor(int64)"
            )
    extra = [n for n in got if n not in ("input_ids", "attention_mask", "token_type_ids")]
    if extra:
        raise PackageError(f"{f}: the text encoder has inputs {extra} that the format does not feed")
    outs = {o.name: o for o in session.get_outputs()}
    if "last_hidden_state" not in outs:
        raise PackageError(
            f"{f}: the text encoder has no output 'last_hidden_state' (outputs {sorted(outs)})"
        )
    shape = outs["last_hidden_state"].shape
    if shape is not None and len(shape) == 3 and te.hidden_size:
        have = _static(shape[2])
        if have is not None and have != te.hidden_size:
            raise PackageError(
                f"{f}: last_hidden_state has size {have}, but "
                f"{package.manifest_path} text_encoder.hidden_size is {te.hidden_size}"
            )
