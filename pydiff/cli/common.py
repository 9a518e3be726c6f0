"""What the `pydiff` commands share: the exit codes, the parser that fails in one line, per-stage
values (`--steps base=25 --steps sr64=10`), the sampling and output arguments of the image
commands, messages, and opening image files in a mode the pipeline takes."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pydiff.errors import UsageError
from pydiff.files import check_writable, is_stream
from pydiff.imageio import load_image

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_IO = 74  # sysexits.h EX_IOERR: the output could not be written (a full disk, a closed pipe)
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a command SIGTERM ended

FLOAT32_MAX = float(np.finfo(np.float32).max)


class InternalError(Exception):
    """A failure past validation: pydiff's bug, not the user's (exit code 1, its cause named)."""


class Terminated(BaseException):
    """SIGTERM arrived (raised by the command line's handler; exit code 143). A BaseException, as
    KeyboardInterrupt is, so that every `finally` and atomic write cleans up on the way out."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints usage first)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------------- values


def per_stage(values, what, convert_one):
    """["25"] -> 25 ; ["base=25", "sr64=10"] -> {"base": 25, "sr64": 10}."""
    if not values:
        return None
    plain, staged = None, {}
    for v in values:
        if "=" in v:
            k, _, rest = v.partition("=")
            staged[k.strip()] = convert(rest, what, convert_one)
        else:
            plain = convert(v, what, convert_one)
    if staged and plain is not None:
        raise UsageError(f"--{what}: give one value for all stages or STAGE=VALUE pairs, not both")
    return staged or plain


def convert(text, what, convert_one):
    """`convert_one(text)`, its ValueError as a UsageError naming the option `--what`."""
    try:
        return convert_one(text)
    except ValueError:
        hint = " (numbers must be finite in float32)" if convert_one in (number, scale_list, interval) else ""
        raise UsageError(f"--{what}: invalid value {text!r}{hint}") from None


def number(text) -> float:
    """A float that is finite in float32, the precision the sampler uses it in (1e39 is not)."""
    v = float(text)
    if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
        raise ValueError(text)
    return v


def positive_int(text) -> int:
    """An argparse type: an integer >= 1 (argparse's message names the option)."""
    v = int(text)
    if v < 1:
        raise ValueError(text)
    return v


def positive_number(text) -> float:
    """An argparse type: a number > 0, finite in float32."""
    v = number(text)
    if v <= 0:
        raise ValueError(text)
    return v


def scale_list(text):
    """ "3" -> 3.0 ; "1,4" -> [1.0, 4.0] (one scale per prompt or class label)."""
    parts = [p for p in text.split(",") if p.strip()]
    vals = [number(p) for p in parts]
    return vals[0] if len(vals) == 1 else vals


def interval(text):
    """ "0.3,5" -> [0.3, 5.0] (guidance_interval's noise levels); "all" -> "all"."""
    if text.strip() == "all":
        return "all"
    vals = [number(p) for p in text.split(",")]
    if len(vals) != 2:
        raise ValueError(text)
    return vals


def thresholding_mode(text):
    if text not in ("none", "static", "dynamic"):
        raise ValueError(text)
    return text


# ------------------------------------------------------------------------------- arguments


def add_sampling_arguments(p, *, prompts=True) -> None:
    """The model, sampling and output arguments of generate, inpaint, img2img and upscale."""
    g = p.add_argument_group("model and sampling")
    g.add_argument(
        "--model",
        metavar="PATH",
        help="model package directory or bundled name (default: the bundled shapes cascade)",
    )
    g.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "onnxruntime", "tensorrt"],
        help="runtime for the networks (default: onnxruntime; tensorrt needs pydiff[tensorrt] and a GPU)",
    )
    g.add_argument(
        "--fp16",
        action="store_true",
        help="TensorRT backend: float16 engines (TensorRT 10: the FP16 builder flag; "
        "11: the ONNX graph rewritten to float16, inputs and outputs float32)",
    )
    g.add_argument(
        "--provider",
        choices=["auto", "cpu", "cuda", "tensorrt"],
        default=None,
        help="ONNX Runtime execution provider (default: CUDA when this onnxruntime "
        "has it, else CPU; cuda/tensorrt need onnxruntime-gpu)",
    )
    g.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt")
    g.add_argument("--steps", action="append", metavar="[STAGE=]N", help="sampling steps")
    g.add_argument("--sampler", action="append", metavar="[STAGE=]NAME", help="ddpm, ddim or dpmpp_2m")
    g.add_argument(
        "--guidance",
        action="append",
        metavar="[STAGE=]G[,G...]",
        help="classifier-free guidance scale; a comma list gives one per prompt",
    )
    g.add_argument(
        "--guidance-interval",
        action="append",
        metavar="[STAGE=]LO,HI",
        help="guide only the steps whose noise level sigma_t = sqrt((1 - abar_t) / abar_t) is in "
        "(LO, HI], one network pass at the others (Kynkaanniemi et al. 2024); 'all': every step "
        "(default: the package's recommendation)",
    )
    g.add_argument(
        "--guidance-type",
        choices=["cfg", "classifier", "clip"],
        default=None,
        help="cfg (classifier-free, default) or a guidance model of the package: "
        "classifier or clip (packages with such guidance_models)",
    )
    g.add_argument(
        "--classifier-scale",
        metavar="S[,S...]",
        help="classifier guidance scale (default: the package's recommended); "
        "a comma list gives one per class label",
    )
    g.add_argument(
        "--clip-scale",
        metavar="S[,S...]",
        help="CLIP guidance scale (default: the package's recommended); a comma list gives one per prompt",
    )
    g.add_argument("--thresholding", action="append", metavar="[STAGE=]MODE", help="none, static or dynamic")
    g.add_argument("--eta", action="append", metavar="[STAGE=]ETA", help="DDIM eta")
    g.add_argument(
        "--noise-aug-level",
        action="append",
        metavar="[STAGE=]LEVEL",
        help="augmentation timestep of the low-resolution input (SR stages)",
    )
    g.add_argument("--seed", type=int, help="random seed (default: random, reported by --json)")
    if prompts:
        g.add_argument("--negative-prompt", metavar="TEXT")
    o = p.add_argument_group("output")
    o.add_argument(
        "--out",
        default="out.png",
        metavar="PATH",
        help="PNG to write (missing folders are made once the images are); several images "
        "make a grid, one column per prompt, unless --no-grid",
    )
    o.add_argument(
        "--no-grid",
        action="store_true",
        help="several images: one PNG each, OUT-0.png, OUT-1.png, ... (one image: OUT)",
    )
    o.add_argument("--json", action="store_true", help="print what was made as JSON on stdout")
    o.add_argument("--json-out", metavar="PATH", help="also write that JSON to a file")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bars or messages")


# ------------------------------------------------------------------------------- files, messages


def text_argument(text: str, what: str) -> str:
    """A command-line text (a prompt): valid Unicode, which the tokenizer needs; bytes that are
    not UTF-8 reach Python as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what}: not valid UTF-8 text ({ascii(text[:40])})") from None
    return text


def say(args, msg) -> None:
    """A message on stderr, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


def check_out(path) -> None:
    """--out: a .png file, or a stream ("-" for stdout, a FIFO, a character device)."""
    if is_stream(path):
        check_writable(path, "--out")
        return
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UsageError(f"--out {path}: must end in .png (or be - for stdout)")
    check_writable(path, "--out")


def open_image(path, what):
    """The image file `path` (`what`: "image" or "mask", for messages; a mask comes back as 'L')."""
    try:
        img = load_image(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except Image.DecompressionBombError as e:  # a header claiming a size Pillow refuses to decode
        raise UsageError(f"{what} {path}: too large to decode ({e})") from None
    except (UnidentifiedImageError, OSError, EOFError, ValueError, SyntaxError) as e:  # Pillow's decoders
        raise UsageError(f"{what} {path}: cannot read the image ({e})") from None
    return plain_mode(img, "L") if what == "mask" else img


def plain_mode(img, want: str | None):
    """A file's image in a mode the pipeline takes: 8-bit 'L' or 'RGB' (16-bit and float images
    rescaled, palettes expanded, alpha dropped), so that a command-line user need not convert it.
    `want`: 'L' (masks, 1-channel models) or 'RGB'."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, np.float64)
        top = (
            65535.0
            if img.mode.startswith("I") and a.max(initial=0) > 255
            else (1.0 if img.mode == "F" else 255.0)
        )
        img = Image.fromarray(np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8), "L")
    return img if img.mode == want else img.convert(want)


def command_line(args) -> str:
    """How this command was run, as `pydiff ...` that a shell reads back (run folders record it)."""
    return shlex.join(["pydiff", *getattr(args, "argv", [])])
