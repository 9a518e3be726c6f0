"""The HTTP API's request and response bodies: JSON (or multipart) fields -> pydiff request
objects, the server's limits, and the OpenAI error shape. No web framework here.

Validation is the pipeline's own (`Pipeline.plan`): this module checks only what JSON adds (field
names, where images come from) and the server's limits on the plan that was built, and turns a
ValueError/TypeError into a 400 that names the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import time
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP

from PIL import Image

from pydiff.pipeline import Pipeline
from pydiff.pipeline.requests import REQUESTS, Plan, Request
from pydiff.serving.engine import Result, png_bytes, stage_step_counts

# pydiff's settings, as in `pydiff.generate` (per-stage dicts allowed where it allows them)
COMMON_FIELDS = (
    "model",
    "prompt",
    "negative_prompt",
    "class_label",
    "num_images",
    "steps",
    "sampler",
    "guidance_scale",
    "guidance_interval",
    "thresholding",
    "eta",
    "seed",
    "noise_aug_level",
    "guidance_type",
    "classifier_scale",
    "clip_scale",
    "response_format",
    "user",
)
KIND_FIELDS = {
    "generate": (),
    "inpaint": ("image", "mask", "jump_length", "jump_n_sample", "mask_convention"),
    "img2img": ("image", "strength"),
    "upscale": ("image", "stage"),
    "colorize": ("image",),
}
IMAGE_FIELDS = ("image", "mask")
# The OpenAI Images API's fields, and pydiff's settings accepted beside them as extra fields
OPENAI_FIELDS = ("model", "prompt", "n", "size", "response_format", "user", "output_format")
OPENAI_IGNORED = ("quality", "style", "background", "moderation")  # accepted, no meaning here
OPENAI_EXTRA = (
    "negative_prompt",
    "steps",
    "sampler",
    "guidance_scale",
    "guidance_interval",
    "thresholding",
    "eta",
    "seed",
    "noise_aug_level",
)
# multipart fields that are always text (others are parsed as JSON where they parse)
TEXT_FIELDS = (
    "model",
    "prompt",
    "negative_prompt",
    "sampler",
    "thresholding",
    "guidance_type",
    "stage",
    "mask_convention",
    "size",
)
TEXT_FIELDS += ("response_format", "user", "output_format", "quality", "style", "background", "moderation")


class ApiError(Exception):
    """An answer other than 200, in the OpenAI error shape."""

    def __init__(self, status, message, param=None, type="invalid_request_error", code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for; past a limit, a 400 naming the field."""

    max_prompt_chars: int = 1000
    max_images: int = 16  # rows per request (prompts x images)
    max_steps: int = 1000  # steps a stage runs (RePaint's passes included)
    max_image_side: int = 1024  # pixels, uploaded images
    max_body_bytes: int = 16 * 2**20

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------- bodies


def parse_body(raw: bytes, content_type: str) -> dict:
    """A JSON object, or multipart/form-data fields (files as bytes), as a dict."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return _multipart(raw, content_type)
    # curl's -d says application/x-www-form-urlencoded: a JSON body is taken whatever it says
    if ctype not in ("", "application/json", "text/plain", "application/x-www-form-urlencoded"):
        raise ApiError(
            415, f"unsupported content type {ctype!r}: send application/json or multipart/form-data"
        )
    try:
        body = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _multipart(raw: bytes, content_type: str) -> dict:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    try:
        msg = BytesParser(policy=HTTP).parsebytes(head + raw)
    except Exception as e:  # noqa: BLE001 - the stdlib parser on client bytes
        raise ApiError(400, f"the multipart body does not parse: {e}") from None
    if not msg.is_multipart():
        raise ApiError(400, "the multipart body has no parts (check the boundary)")
    out = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise ApiError(400, "a multipart part has no name")
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is not None or name in IMAGE_FIELDS:
            out[name] = data
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, f"field {name!r} is not UTF-8 text", param=name) from None
        if name in TEXT_FIELDS and not text.startswith(("[", "{")):
            out[name] = text
        else:
            try:
                out[name] = json.loads(text)
            except (json.JSONDecodeError, RecursionError):
                out[name] = text
    return out


def decode_image(value, field: str, mode: str, limits: Limits):
    """A base64 string (a data: URL too) or raw bytes -> a PIL image in `mode` ("RGB" or "L")."""
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            value = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{field}: not valid base64", param=field) from None
    if not isinstance(value, (bytes, bytearray)):
        raise ApiError(400, f"{field}: expected a base64-encoded image (PNG, JPEG, ...)", param=field)
    try:
        img = Image.open(io.BytesIO(value))
        w, h = img.size
        if max(w, h) > limits.max_image_side:
            raise ApiError(
                400,
                f"{field} is {w}x{h}; this server takes at most {limits.max_image_side} pixels a side",
                param=field,
            )
        img.load()
        return img.convert(mode)
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow on client bytes: any failure is a bad image
        raise ApiError(
            400, f"{field}: not an image Pillow can read ({type(e).__name__})", param=field
        ) from None


# ---------------------------------------------------------------- requests


@dataclass
class Parsed:
    model: str
    request: Request
    fields: dict  # the settings the client gave (pydiff names), for the response's "request"
    seed_given: bool
    response_format: str = "b64_json"


def pick_model(body: dict, pipelines: dict[str, Pipeline]) -> str:
    name = body.get("model")
    if name is None:
        return next(iter(pipelines))
    if not isinstance(name, str) or name not in pipelines:
        raise ApiError(
            400,
            f"unknown model {name!r}; this server has {list(pipelines)}",
            param="model",
            code="model_not_found",
        )
    return name


def _response_format(body: dict) -> str:
    fmt = body.get("response_format", "b64_json")
    if fmt != "b64_json":
        raise ApiError(
            400,
            f"response_format {fmt!r} is not supported: this server answers with b64_json only (no image URLs)",
            param="response_format",
        )
    return fmt


def parse_request(kind: str, body: dict, pipelines: dict[str, Pipeline], limits: Limits) -> Parsed:
    """A /v1/{generate,inpaint,img2img,upscale,colorize} body -> the model's name and a request object."""
    allowed = COMMON_FIELDS + KIND_FIELDS[kind]
    _unknown(body, allowed)
    model = pick_model(body, pipelines)
    fmt = _response_format(body)
    fields = {k: v for k, v in body.items() if k not in ("model", "response_format", "user", *IMAGE_FIELDS)}
    kwargs = dict(fields)
    pkg = pipelines[model].package
    for name in IMAGE_FIELDS:
        if name in KIND_FIELDS[kind] and name in body:
            grey = (
                name == "mask" or kind == "colorize" or (kind != "upscale" and pkg.stages[-1].channels == 1)
            )
            mode = "L" if grey else "RGB"
            kwargs[name] = decode_image(body[name], name, mode, limits)
    if kind != "generate":
        for name in IMAGE_FIELDS:
            if name in KIND_FIELDS[kind]:
                kwargs.setdefault(name, None)
    return Parsed(model, _build(kind, kwargs), fields, body.get("seed") is not None, fmt)


def parse_openai(body: dict, pipelines: dict[str, Pipeline], limits: Limits) -> Parsed:
    """A /v1/images/generations body (OpenAI's Images API, pydiff's settings as extra fields)."""
    if body.get("stream"):
        raise ApiError(
            400,
            "stream is not supported here; POST /v1/generate?stream=true streams per-step progress",
            param="stream",
        )
    body = {k: v for k, v in body.items() if k not in OPENAI_IGNORED and not (k == "stream" and not v)}
    _unknown(body, OPENAI_FIELDS + OPENAI_EXTRA)
    model = pick_model(body, pipelines)
    fmt = _response_format(body)
    if body.get("output_format", "png") != "png":
        raise ApiError(400, "output_format: this server writes png only", param="output_format")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt: a string is required", param="prompt")
    pkg = pipelines[model].package
    if not any(s.conditioning == "text" for s in pkg.stages):
        raise ApiError(
            400,
            f"model {model!r} is not text-conditional; use POST /v1/generate with class_label",
            param="model",
        )
    size = body.get("size")
    res = pkg.stages[-1].resolution
    if size not in (None, "auto", f"{res}x{res}"):
        raise ApiError(400, f"size {size!r}: model {model!r} makes {res}x{res} images only", param="size")
    fields = {k: v for k, v in body.items() if k in OPENAI_EXTRA or k == "prompt"}
    if "n" in body:
        fields["num_images"] = body["n"]
    return Parsed(model, _build("generate", dict(fields)), fields, body.get("seed") is not None, fmt)


def _unknown(body: dict, allowed) -> None:
    extra = [k for k in body if k not in allowed]
    if extra:
        raise ApiError(
            400, f"unknown field {extra[0]!r}; this endpoint takes {sorted(allowed)}", param=extra[0]
        )


def _build(kind: str, kwargs: dict) -> Request:
    kwargs.update(output_type="pil", progress=False)
    try:
        return REQUESTS[kind](**kwargs)
    except TypeError as e:  # a field the request object does not take
        raise ApiError(400, str(e)) from None


def plan_request(pipe: Pipeline, parsed: Parsed, limits: Limits, openai: bool = False) -> Plan:
    """Validate with the pipeline (ValueError/TypeError -> 400 naming the field), then the limits."""
    try:
        plan = pipe.plan(parsed.request)
    except (ValueError, TypeError, OverflowError) as e:
        raise ApiError(400, str(e), param=param_of(str(e), parsed.fields, openai)) from None
    n_field = "n" if openai else "num_images"
    if plan.batch > limits.max_images:
        raise ApiError(
            400,
            f"{plan.n_prompts} prompt(s) x {plan.num_images} images is {plan.batch} images; this server makes at "
            f"most {limits.max_images} per request",
            param=n_field,
        )
    for what in ("prompts", "negative_prompts"):
        for p in getattr(plan, what) or ():
            if len(p) > limits.max_prompt_chars:
                field = "prompt" if what == "prompts" else "negative_prompt"
                raise ApiError(
                    400,
                    f"{field} is {len(p)} characters; the limit is {limits.max_prompt_chars}",
                    param=field,
                )
    for stage, n in stage_step_counts(plan).items():
        if n > limits.max_steps:
            param = (
                "jump_n_sample"
                if plan.kind == "inpaint" and plan.settings[stage].steps <= limits.max_steps
                else "steps"
            )
            raise ApiError(
                400,
                f"stage {stage!r} would run {n} steps; this server runs at most {limits.max_steps}",
                param=param,
            )
    return plan


def param_of(message: str, fields: dict, openai: bool = False) -> str | None:
    """The field a validation message is about: the given field it names first."""
    best = None
    for f in sorted(fields, key=len, reverse=True):
        m = re.search(rf"(?<![A-Za-z_]){re.escape(f)}(?![A-Za-z_])", message)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), f)
    if best is None:
        for f in ("prompt", "class_label", "steps", "seed", "num_images", "image", "mask"):
            if re.search(rf"(?<![A-Za-z_]){f}(?![A-Za-z_])", message):
                best = (0, f)
                break
    if best is None:
        return None
    return "n" if openai and best[1] == "num_images" else best[1]


# ---------------------------------------------------------------- responses


def settings_of(plan: Plan) -> dict:
    return {name: s.as_dict() for name, s in plan.settings.items()}


def remake_request(parsed: Parsed, plan: Plan, result: Result) -> dict:
    """The /v1/generate-style body that remakes these images (all settings explicit)."""
    body = {"model": parsed.model}
    if plan.prompts is not None:
        body["prompt"] = plan.prompts if len(plan.prompts) > 1 else plan.prompts[0]
    if plan.negative_prompts is not None:
        body["negative_prompt"] = plan.negative_prompts
    if plan.class_labels is not None and any(c is not None for c in plan.class_labels):
        body["class_label"] = plan.class_labels
    body["num_images"] = plan.num_images
    st = settings_of(plan)
    keys = (
        "steps",
        "sampler",
        "guidance_scale",
        "guidance_interval",
        "thresholding",
        "eta",
        "noise_aug_level",
    )
    for key in (*keys, "strength"):
        per = {n: d[key] for n, d in st.items() if key in d and (key != "eta" or d["sampler"] == "ddim")}
        if per:
            body[key] = per
    for key in (
        "jump_length",
        "jump_n_sample",
        "mask_convention",
        "guidance_type",
        "classifier_scale",
        "clip_scale",
        "stage",
    ):
        if key in parsed.fields:
            body[key] = parsed.fields[key]
    if result.seed is not None:
        body["seed"] = result.seed
    return body


def image_entries(plan: Plan, result: Result, with_b64: bool = True) -> list[dict]:
    out = []
    for k, img in enumerate(result.images):
        j = k // plan.num_images
        entry = {"index": k}
        if with_b64:
            entry["b64_json"] = base64.b64encode(png_bytes(img)).decode("ascii")
        if plan.prompts is not None:
            entry["prompt"] = plan.prompts[j]
        if plan.class_labels is not None and plan.class_labels[j] is not None:
            entry["class_label"] = plan.class_labels[j]
        entry["seed"] = result.seed
        settings = settings_of(plan)
        for name, s in plan.settings.items():
            settings[name]["guidance_scale"] = float(s.guidance_scale[k])
        entry["settings"] = settings
        out.append(entry)
    return out


def generate_response(job_id: str, parsed: Parsed, plan: Plan, result: Result) -> dict:
    return {
        "id": job_id,
        "object": "pydiff.images",
        "created": int(time.time()),
        "model": parsed.model,
        "kind": plan.kind,
        "seed": result.seed,
        "batch": result.batch,
        "settings": settings_of(plan),
        "request": remake_request(parsed, plan, result),
        "images": image_entries(plan, result),
        "timings": {"queued_s": round(result.queued_seconds, 4), "run_s": round(result.seconds, 4)},
    }


def openai_response(parsed: Parsed, plan: Plan, result: Result) -> dict:
    res = plan.stages[-1].resolution
    data = [
        {"b64_json": e["b64_json"], "revised_prompt": None, "seed": e["seed"], "index": e["index"]}
        for e in image_entries(plan, result)
    ]
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": "png",
        "size": f"{res}x{res}",
        "pydiff": {
            "model": parsed.model,
            "seed": result.seed,
            "batch": result.batch,
            "settings": settings_of(plan),
        },
    }


__all__ = [
    "ApiError",
    "Limits",
    "Parsed",
    "parse_body",
    "parse_request",
    "parse_openai",
    "plan_request",
    "param_of",
    "decode_image",
    "generate_response",
    "openai_response",
]
