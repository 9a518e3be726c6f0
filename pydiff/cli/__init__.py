"""The `pydiff` command line: generate, inpaint, img2img, upscale, info (+ train/export/bench).

Exit codes: 0 success; 2 bad usage or input (one line on stderr, no traceback); 1 internal error;
130 interrupted. Images and JSON files are written atomically (temp file + os.replace).
Set PYDIFF_DEBUG=1 to get tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
OWN_COMMANDS = ("generate", "inpaint", "img2img", "upscale", "info")


class UsageError(Exception):
    """Bad input found by the CLI itself (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints usage first)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------------- arguments


def _per_stage(values, what, convert):
    """["25"] -> 25 ; ["base=25", "sr64=10"] -> {"base": 25, "sr64": 10}."""
    if not values:
        return None
    plain, staged = None, {}
    for v in values:
        if "=" in v:
            k, _, rest = v.partition("=")
            staged[k.strip()] = _convert(rest, what, convert)
        else:
            plain = _convert(v, what, convert)
    if staged and plain is not None:
        raise UsageError(f"--{what}: give one value for all stages or STAGE=VALUE pairs, not both")
    return staged or plain


def _convert(text, what, convert):
    try:
        return convert(text)
    except ValueError:
        raise UsageError(f"--{what}: invalid value {text!r}") from None


def _guidance(text):
    parts = [p for p in text.split(",") if p.strip()]
    vals = [float(p) for p in parts]
    return vals[0] if len(vals) == 1 else vals


def _thresholding(text):
    if text not in ("none", "static", "dynamic"):
        raise ValueError(text)
    return text


def _common(p, *, prompts=True):
    g = p.add_argument_group("model and sampling")
    g.add_argument("--model", metavar="PATH", help="model package directory or bundled name "
                                                   "(default: the bundled shapes cascade)")
    g.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                   help="runtime for the networks (default: onnxruntime; tensorrt needs "
                        "pydiff[tensorrt] and a GPU)")
    g.add_argument("--fp16", action="store_true",
                   help="TensorRT backend: float16 engines (TensorRT 10: the FP16 builder flag; "
                        "11: the ONNX graph rewritten to float16, inputs and outputs float32)")
    g.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"], default=None,
                   help="ONNX Runtime execution provider (default: CUDA when this onnxruntime "
                        "has it, else CPU; cuda/tensorrt need onnxruntime-gpu)")
    g.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt")
    g.add_argument("--steps", action="append", metavar="[STAGE=]N", help="sampling steps")
    g.add_argument("--sampler", action="append", metavar="[STAGE=]NAME",
                   help="ddpm, ddim or dpmpp_2m")
    g.add_argument("--guidance", action="append", metavar="[STAGE=]G[,G...]",
                   help="classifier-free guidance scale; a comma list gives one per prompt")
    g.add_argument("--guidance-type", choices=["cfg", "classifier", "clip"], default=None,
                   help="cfg (classifier-free, default) or a guidance model of the package: "
                        "classifier or clip (packages with such guidance_models)")
    g.add_argument("--classifier-scale", metavar="S[,S...]",
                   help="classifier guidance scale (default: the package's recommended); "
                        "a comma list gives one per class label")
    g.add_argument("--clip-scale", metavar="S[,S...]",
                   help="CLIP guidance scale (default: the package's recommended); a comma list "
                        "gives one per prompt")
    g.add_argument("--thresholding", action="append", metavar="[STAGE=]MODE",
                   help="none, static or dynamic")
    g.add_argument("--eta", action="append", metavar="[STAGE=]ETA", help="DDIM eta")
    g.add_argument("--noise-aug-level", action="append", metavar="[STAGE=]LEVEL",
                   help="augmentation timestep of the low-resolution input (SR stages)")
    g.add_argument("--seed", type=int, help="random seed (default: random, reported by --json)")
    if prompts:
        g.add_argument("--negative-prompt", metavar="TEXT")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="out.png", metavar="PATH",
                   help="PNG to write (missing folders are made once the images are); several images "
                        "make a grid, one column per prompt, unless --no-grid")
    o.add_argument("--no-grid", action="store_true",
                   help="several images: one PNG each, OUT-0.png, OUT-1.png, ... (one image: OUT)")
    o.add_argument("--json", action="store_true", help="print what was made as JSON on stdout")
    o.add_argument("--json-out", metavar="PATH", help="also write that JSON to a file")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bars or messages")


def build_parser(with_extras: bool = True) -> argparse.ArgumentParser:
    from pydiff import __version__

    parser = _Parser(prog="pydiff", description="Cascaded conditional diffusion on a compiled "
                                                "sampling core.")
    parser.add_argument("--version", action="version", version=f"pydiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("generate", help="make images from prompts or class labels")
    p.add_argument("prompt", nargs="*", help="text prompt(s); several make one batch")
    p.add_argument("--class-label", type=int, action="append", metavar="N",
                   help="class index (class-conditional packages); repeat for several")
    _common(p)
    p.set_defaults(func=_cmd_images, mode="generate")

    p = sub.add_parser("inpaint", help="regenerate the white part of a mask")
    p.add_argument("image")
    p.add_argument("mask", help="white (255) = regenerate, black = keep")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--class-label", type=int, action="append", metavar="N")
    p.add_argument("--jump-length", action="append", metavar="[STAGE=]L",
                   help="RePaint: steps redone per resampling jump (default: the package's, else 10)")
    p.add_argument("--jump-n-sample", action="append", metavar="[STAGE=]R",
                   help="RePaint: passes over each stretch of steps, 1 = no resampling "
                        "(default: the package's, else 1)")
    _common(p)
    p.set_defaults(func=_cmd_images, mode="inpaint")

    p = sub.add_parser("img2img", help="edit an image (SDEdit)")
    p.add_argument("image")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--class-label", type=int, action="append", metavar="N")
    p.add_argument("--strength", action="append", metavar="[STAGE=]S",
                   help="how far to noise the image, in (0, 1] (default 0.75)")
    _common(p)
    p.set_defaults(func=_cmd_images, mode="img2img")

    p = sub.add_parser("upscale", help="super-resolve an image with an SR stage")
    p.add_argument("image")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--class-label", type=int, action="append", metavar="N")
    p.add_argument("--stage", help="super-resolution stage to start at (default: the first)")
    _common(p)
    p.set_defaults(func=_cmd_images, mode="upscale")

    p = sub.add_parser("info", help="version, native kernels, providers, bundled models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    if with_extras:
        _register_extras(sub)
    return parser


def _register_extras(sub) -> None:
    """`train`/`export` (pydiff.training: needs torch) and `bench`, when importable."""
    try:
        from pydiff.tools.training import cli as training_cli
    except ImportError:
        pass
    else:
        training_cli.register(sub)
    try:
        from pydiff import bench as bench_cli  # optional module: the end-to-end benchmark
    except ImportError:
        pass
    else:
        bench_cli.register(sub)


# ------------------------------------------------------------------------------- commands


def _say(args, msg):
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


def _check_writable_dir(path: Path, flag: str) -> None:
    """The file can be written: its nearest existing folder is writable (missing folders are made
    when the file is, after a successful run), and the path is no directory."""
    parent = path.parent if str(path.parent) else Path(".")
    base = parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UsageError(f"{flag} {path}: {base} is not a directory")
    try:  # the real test (os.access says yes to root everywhere): make and drop a temp file
        with tempfile.NamedTemporaryFile(dir=base, prefix=".pydiff-check-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {base} ({e.strerror})") from None
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")


def _check_out(path: Path) -> None:
    if path.suffix.lower() != ".png":
        raise UsageError(f"--out {path}: must end in .png")
    _check_writable_dir(path, "--out")


def _open_image(path, what):
    from PIL import UnidentifiedImageError

    from pydiff.imageio import load_image

    try:
        img = load_image(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{what} {path}: cannot read the image ({e})") from None
    return _plain_mode(img, "L") if what == "mask" else img


def _plain_mode(img, want: str | None):
    """A file's image in a mode the pipeline takes: 8-bit 'L' or 'RGB' (16-bit and float images
    rescaled, palettes expanded, alpha dropped), so that a command-line user need not convert it.
    `want`: 'L' (masks, 1-channel models) or 'RGB'."""
    import numpy as np
    from PIL import Image

    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, np.float64)
        top = 65535.0 if img.mode.startswith("I") and a.max(initial=0) > 255 else (1.0 if img.mode == "F" else 255.0)
        img = Image.fromarray(np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8), "L")
    return img if img.mode == want else img.convert(want)


def _cmd_images(args) -> int:
    from pydiff import imageio
    from pydiff.pipeline import _pipeline

    out = Path(args.out)
    _check_out(out)
    if args.json_out:
        _check_writable_dir(Path(args.json_out), "--json-out")
        j = Path(args.json_out).resolve()
        if j == out.resolve() or (args.no_grid and j.parent == out.resolve().parent
                                  and j.name.startswith(out.stem + "-") and j.suffix == out.suffix):
            raise UsageError(f"--json-out {args.json_out}: would overwrite an image (--out {args.out})")
    kwargs = dict(
        num_images=args.num_images,
        steps=_per_stage(args.steps, "steps", int),
        sampler=_per_stage(args.sampler, "sampler", str),
        guidance_scale=_per_stage(args.guidance, "guidance", _guidance),
        thresholding=_per_stage(args.thresholding, "thresholding", _thresholding),
        eta=_per_stage(args.eta, "eta", float),
        noise_aug_level=_per_stage(args.noise_aug_level, "noise-aug-level", int),
        seed=args.seed, progress=not args.quiet, output_type="pil",
    )
    if args.guidance_type is not None:
        kwargs["guidance_type"] = args.guidance_type
    if args.classifier_scale is not None:
        kwargs["classifier_scale"] = _convert(args.classifier_scale, "classifier-scale", _guidance)
    if args.clip_scale is not None:
        kwargs["clip_scale"] = _convert(args.clip_scale, "clip-scale", _guidance)
    prompts = list(args.prompt) or None
    if prompts is not None and len(prompts) == 1:
        prompts = prompts[0]
    if args.class_label:
        kwargs["class_label"] = args.class_label if len(args.class_label) > 1 else args.class_label[0]
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    mode = args.mode
    if mode in ("inpaint", "img2img", "upscale"):
        kwargs["image"] = _open_image(args.image, "image")
    if mode == "inpaint":
        kwargs["mask"] = _open_image(args.mask, "mask")
        kwargs["jump_length"] = _per_stage(args.jump_length, "jump-length", int)
        kwargs["jump_n_sample"] = _per_stage(args.jump_n_sample, "jump-n-sample", int)
    if mode == "img2img":
        strength = _per_stage(args.strength, "strength", float)
        kwargs["strength"] = 0.75 if strength is None else strength
    if mode == "upscale":
        kwargs["start_stage"] = args.stage
    if kwargs["seed"] is None:
        import secrets

        kwargs["seed"] = secrets.randbits(53)   # exact in JSON readers that use doubles (jq, JavaScript)

    t0 = time.perf_counter()
    options = {"providers": args.provider} if args.provider else {}
    if args.fp16:
        if args.backend != "tensorrt":
            raise UsageError("--fp16 builds float16 TensorRT engines: it needs --backend tensorrt")
        options["fp16"] = True
    pipe = _pipeline(args.model, args.backend, **options)
    if "image" in kwargs:   # the image file as the model takes it (grey for 1-channel models)
        channels = 3 if mode == "upscale" else pipe.package.stages[-1].channels
        kwargs["image"] = _plain_mode(kwargs["image"], "L" if channels == 1 else "RGB")
    plan = pipe.plan(prompt=prompts, mode=mode, **kwargs)   # validation: errors exit 2
    from pydiff.backends.base import ModelOutputError
    from pydiff.samplers.base import NonFiniteError

    try:
        images = pipe.execute(plan)
    except (NonFiniteError, ModelOutputError) as e:           # a broken network: the model's fault
        raise UsageError(f"the model failed: {e}") from e
    except (ValueError, TypeError) as e:                     # past validation: our bug
        raise InternalError(str(e)) from e
    elapsed = time.perf_counter() - t0

    written = []
    if len(images) == 1 or not args.no_grid:
        # one column per prompt (or class), its images down the column
        img = images[0] if len(images) == 1 else imageio.make_grid(
            _columns_by_prompt(images, plan.n_prompts, plan.num_images),
            cols=plan.n_prompts if plan.n_prompts > 1 else None)
        imageio.save_png(img, out)
        written.append(str(out))
        paths = [str(out)] * len(images)
    else:
        paths = []
        for i, img in enumerate(images):
            p = out.with_name(f"{out.stem}-{i}{out.suffix}")
            imageio.save_png(img, p)
            paths.append(str(p))
        written = paths
    for p in written:
        _say(args, f"wrote {p}")

    per_prompt = plan.prompts or [None] * plan.n_prompts
    labels = plan.class_labels or [None] * plan.n_prompts
    report = {
        "command": mode, "model": str(pipe.package.path), "package": pipe.package.name,
        "backend": pipe.backend.describe(), "seed": plan.seed, "num_images": len(images),
        "grid": str(out) if len(images) > 1 and not args.no_grid else None,
        "size": list(images[0].size),
        "images": [{"index": i, "path": paths[i], "prompt": per_prompt[i // plan.num_images],
                    "class_label": labels[i // plan.num_images]} for i in range(len(images))],
        "stages": {n: s.as_dict() for n, s in plan.settings.items()},
        "guidance": _guidance_report(plan),
        "elapsed_s": round(elapsed, 4),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    if args.json_out:
        imageio.write_json(report, args.json_out)
    return EXIT_OK


def _columns_by_prompt(images: list, n_prompts: int, num_images: int) -> list:
    """Prompt-major images reordered row by row for a grid with one column per prompt."""
    if n_prompts <= 1:
        return images
    return [images[p * num_images + r] for r in range(num_images) for p in range(n_prompts)]


def _guidance_report(plan) -> dict:
    d = {"type": plan.guidance_type}
    if plan.guidance_model is not None:
        sc = plan.guidance_model_scale
        d.update(model=plan.guidance_model.name, stage=plan.guidance_model.stage,
                 scale=float(sc[0]) if (sc == sc[0]).all() else [float(v) for v in sc])
    return d


def info() -> dict:
    """What this installation has: version, native kernels, CUDA twin, ORT providers, models."""
    import importlib.util

    from pydiff import __version__
    from pydiff.pipeline.pipeline import bundled_packages, bundled_path

    d = {"version": __version__, "python": sys.version.split()[0]}
    try:
        from pydiff import ops

        fn = getattr(ops, "native_available", None)
        d["native_kernels"] = bool(fn()) if callable(fn) else None
        fn = getattr(ops, "cuda_available", None)
        d["cuda_twin"] = bool(fn()) if callable(fn) else None
    except Exception as e:  # a missing or broken build must not break `info`
        d["native_kernels"] = False
        d["cuda_twin"] = False
        d["native_error"] = f"{type(e).__name__}: {e}"
    try:
        import onnxruntime as ort

        d["onnxruntime"] = ort.__version__
        d["ort_providers"] = ort.get_available_providers()
    except ImportError as e:
        d["onnxruntime"] = None
        d["ort_providers"] = []
        d["onnxruntime_error"] = str(e)
    d["torch_installed"] = importlib.util.find_spec("torch") is not None
    d["bundled_models"] = {n: str(bundled_path(n)) for n in bundled_packages()}
    return d


def _cmd_info(args) -> int:
    d = info()
    if args.json:
        print(json.dumps(d, indent=2))
        return EXIT_OK

    def yn(v):
        return "unknown" if v is None else ("yes" if v else "no")

    print(f"pydiff {d['version']} (Python {d['python']})")
    print(f"native kernels built: {yn(d['native_kernels'])}"
          + (f"  ({d['native_error']})" if "native_error" in d else ""))
    print(f"CUDA twin available:  {yn(d['cuda_twin'])}")
    print(f"ONNX Runtime:         {d['onnxruntime']}  providers: {', '.join(d['ort_providers'])}")
    print(f"torch installed:      {yn(d['torch_installed'])}")
    models = d["bundled_models"]
    print("bundled models:       " + (", ".join(f"{k} ({v})" for k, v in models.items())
                                      if models else "none"))
    return EXIT_OK


class InternalError(Exception):
    pass


# ------------------------------------------------------------------------------- entry point


def _needs_extras(argv) -> bool:
    """Import the torch-based subcommands only when asked for (keeps `generate` torch-free)."""
    for a in argv:
        if a.startswith("-"):
            if a in ("-h", "--help"):
                return True
            continue
        return a not in OWN_COMMANDS
    return True


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("PYDIFF_DEBUG"))
    parser = build_parser(with_extras=_needs_extras(argv))
    if argv[:1] == ["guidance"] and len(argv) > 1 and argv[1].startswith("-"):
        argv = ["guidance", "--", *argv[1:]]   # `guidance --help`: its own parser answers it
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from pydiff.backends.base import BackendUnavailableError
    from pydiff.package import PackageError

    try:
        rc = args.func(args)
        return EXIT_OK if rc is None else int(rc)
    except KeyboardInterrupt:
        print("pydiff: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, PackageError, ValueError, TypeError, FileNotFoundError,
            BackendUnavailableError) as e:
        if debug:
            raise
        msg = str(e).replace("\n", " ") or type(e).__name__
        print(f"pydiff: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            raise
        cause = e.__cause__ if isinstance(e, InternalError) and e.__cause__ else e
        print(f"pydiff: internal error: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
              f" (set PYDIFF_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
