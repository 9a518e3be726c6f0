"""`pydiff generate`, `inpaint`, `img2img`, `upscale` and `colorize`: one implementation, five modes of the
pipeline. Runtime modules only (no torch): these are the commands a plain install runs."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from pydiff import imageio
from pydiff.cli.common import (
    EXIT_OK,
    InternalError,
    add_sampling_arguments,
    check_out,
    convert,
    interval,
    number,
    open_image,
    per_stage,
    plain_mode,
    say,
    scale_list,
    text_argument,
    thresholding_mode,
)
from pydiff.errors import ModelOutputError, NonFiniteError, UsageError
from pydiff.files import check_writable, is_stream, write_files_atomic, write_output
from pydiff.pipeline import _pipeline
from pydiff.pipeline.requests import REQUESTS

MODES = ("generate", "inpaint", "img2img", "upscale", "colorize")


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="make images from prompts or class labels")
    p.add_argument("prompt", nargs="*", help="text prompt(s); several make one batch")
    p.add_argument(
        "--class-label",
        type=int,
        action="append",
        metavar="N",
        help="class index (class-conditional packages); repeat for several",
    )
    add_sampling_arguments(p)
    p.set_defaults(func=run, kind="generate")

    p = subparsers.add_parser("inpaint", help="regenerate the white part of a mask")
    p.add_argument("image")
    p.add_argument(
        "mask", help="white (255) = regenerate, black = keep (--mask-convention glide: the reverse)"
    )
    p.add_argument("prompt", nargs="*")
    p.add_argument("--class-label", type=int, action="append", metavar="N")
    p.add_argument(
        "--jump-length",
        action="append",
        metavar="[STAGE=]L",
        help="RePaint: steps redone per resampling jump (default: the package's, else 10)",
    )
    p.add_argument(
        "--jump-n-sample",
        action="append",
        metavar="[STAGE=]R",
        help="RePaint: passes over each stretch of steps, 1 = no resampling (default: the package's, else 1)",
    )
    p.add_argument(
        "--mask-convention",
        choices=["diffusers", "glide"],
        default="diffusers",
        help="diffusers: white = regenerate (default); glide: white = keep",
    )
    add_sampling_arguments(p)
    p.set_defaults(func=run, kind="inpaint")

    p = subparsers.add_parser("img2img", help="edit an image (SDEdit)")
    p.add_argument("image")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--class-label", type=int, action="append", metavar="N")
    p.add_argument(
        "--strength",
        action="append",
        metavar="[STAGE=]S",
        help="how far to noise the image, in (0, 1] (default 0.75)",
    )
    add_sampling_arguments(p)
    p.set_defaults(func=run, kind="img2img")

    p = subparsers.add_parser("upscale", help="super-resolve an image with an SR stage")
    p.add_argument("image")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--class-label", type=int, action="append", metavar="N")
    p.add_argument("--stage", help="super-resolution stage to start at (default: the first)")
    add_sampling_arguments(p)
    p.set_defaults(func=run, kind="upscale")

    p = subparsers.add_parser("colorize", help="colour a grey image (a package with a colorization stage)")
    p.add_argument("image", help="a grey image (a colour one is taken by its luma)")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--class-label", type=int, action="append", metavar="N")
    add_sampling_arguments(p)
    p.set_defaults(func=run, kind="colorize")


def run(args) -> int:
    out = Path(args.out)
    out_stream = is_stream(args.out)
    check_out(args.out)
    json_stream = bool(args.json_out) and is_stream(args.json_out)
    if args.out == "-" and args.json:
        raise UsageError(
            "--out - writes the PNG to stdout: --json would print there too; use --json-out FILE"
        )
    if args.json_out == "-" and (args.out == "-" or args.json):
        raise UsageError("--json-out - prints the JSON on stdout, as --json or --out - would: give one")
    if args.json_out:
        check_writable(args.json_out, "--json-out")
    if args.json_out and not json_stream and not out_stream:
        j = Path(args.json_out).resolve()
        if j == out.resolve() or (
            args.no_grid
            and j.parent == out.resolve().parent
            and j.name.startswith(out.stem + "-")
            and j.suffix == out.suffix
        ):
            raise UsageError(f"--json-out {args.json_out}: would overwrite an image (--out {args.out})")
    kwargs = dict(
        num_images=args.num_images,
        steps=per_stage(args.steps, "steps", int),
        sampler=per_stage(args.sampler, "sampler", str),
        guidance_scale=per_stage(args.guidance, "guidance", scale_list),
        guidance_interval=per_stage(args.guidance_interval, "guidance-interval", interval),
        thresholding=per_stage(args.thresholding, "thresholding", thresholding_mode),
        eta=per_stage(args.eta, "eta", number),
        noise_aug_level=per_stage(args.noise_aug_level, "noise-aug-level", int),
        seed=args.seed,  # None: the pipeline draws one (reported as plan.seed)
        progress=not args.quiet,
        output_type="pil",
    )
    if args.guidance_type is not None:
        kwargs["guidance_type"] = args.guidance_type
    if args.classifier_scale is not None:
        kwargs["classifier_scale"] = convert(args.classifier_scale, "classifier-scale", scale_list)
    if args.clip_scale is not None:
        kwargs["clip_scale"] = convert(args.clip_scale, "clip-scale", scale_list)
    prompts = [text_argument(p, f"prompt {i + 1}") for i, p in enumerate(args.prompt)] or None
    if prompts is not None and len(prompts) == 1:
        prompts = prompts[0]
    if args.class_label:
        kwargs["class_label"] = args.class_label if len(args.class_label) > 1 else args.class_label[0]
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = text_argument(args.negative_prompt, "--negative-prompt")
    kind = args.kind
    if kind in ("inpaint", "img2img", "upscale", "colorize"):
        kwargs["image"] = open_image(args.image, "image")
    if kind == "inpaint":
        kwargs["mask"] = open_image(args.mask, "mask")
        kwargs["jump_length"] = per_stage(args.jump_length, "jump-length", int)
        kwargs["jump_n_sample"] = per_stage(args.jump_n_sample, "jump-n-sample", int)
        kwargs["mask_convention"] = args.mask_convention
    if kind == "img2img":
        strength = per_stage(args.strength, "strength", number)
        kwargs["strength"] = 0.75 if strength is None else strength
    if kind == "upscale":
        kwargs["stage"] = args.stage

    t0 = time.perf_counter()
    options = {"providers": args.provider} if args.provider else {}
    if args.fp16:
        if args.backend != "tensorrt":
            raise UsageError("--fp16 builds float16 TensorRT engines: it needs --backend tensorrt")
        options["fp16"] = True
    pipe = _pipeline(args.model, args.backend, **options)
    if "image" in kwargs:  # the image file as the model takes it (grey for 1-channel models)
        channels = {"upscale": 3, "colorize": 1}.get(kind, pipe.package.stages[-1].channels)
        kwargs["image"] = plain_mode(kwargs["image"], "L" if channels == 1 else "RGB")
    plan = pipe.plan(REQUESTS[kind](prompt=prompts, **kwargs))  # validation: errors exit 2
    n_images = plan.batch
    grid = n_images == 1 or not args.no_grid
    if grid:
        targets = [out]
    else:  # OUT-0.png, OUT-1.png, ...: their names checked now, before any work
        if out_stream:
            raise UsageError(f"--out {args.out}: --no-grid writes {n_images} files; give a file name")
        targets = [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n_images)]
        for p in targets:
            check_writable(p, "--out")
    try:
        images = pipe.execute(plan)
    except (NonFiniteError, ModelOutputError) as e:  # a broken network: the model's fault
        raise UsageError(f"the model failed: {e}") from e
    except (ValueError, TypeError) as e:  # past validation: our bug
        raise InternalError(str(e)) from e
    elapsed = time.perf_counter() - t0

    if grid:
        # one column per prompt (or class), its images down the column
        img = (
            images[0]
            if len(images) == 1
            else imageio.make_grid(
                _columns_by_prompt(images, plan.n_prompts, plan.num_images),
                cols=plan.n_prompts if plan.n_prompts > 1 else None,
            )
        )
        outputs = [(args.out if out_stream else out, _png(img))]
        paths = [str(args.out)] * len(images)
    else:
        outputs = [(p, _png(img)) for p, img in zip(targets, images)]
        paths = [str(p) for p in targets]

    per_prompt = plan.prompts or [None] * plan.n_prompts
    image_seeds = plan.image_seeds()
    labels = plan.class_labels or [None] * plan.n_prompts
    report = {
        "command": kind,
        "model": str(pipe.package.path),
        "package": pipe.package.name,
        "backend": pipe.backend.describe(),
        "seed": plan.seed,
        "num_images": len(images),
        "grid": str(args.out) if len(images) > 1 and not args.no_grid else None,
        "size": list(images[0].size),
        "images": [
            {
                "index": i,
                "path": paths[i],
                "prompt": per_prompt[i // plan.num_images],
                "class_label": labels[i // plan.num_images],
                "seed": image_seeds[i],  # --seed remakes this image alone
            }
            for i in range(len(images))
        ],
        "stages": {n: s.as_dict() for n, s in plan.settings.items()},
        "guidance": _guidance_report(plan),
        "elapsed_s": round(elapsed, 4),
    }
    n_image_files = len(outputs)
    if args.json_out:
        outputs.append((args.json_out, (json.dumps(report, indent=2) + "\n").encode("utf-8")))
    # the files of this run (images and JSON) to temporaries first, then all renamed: a failure
    # leaves the older run's files as they were; streams are written after
    write_files_atomic([(p, data) for p, data in outputs if not is_stream(p)])
    for p, data in outputs:
        if is_stream(p):
            write_output(p, data)
    for p, _ in outputs[:n_image_files]:
        say(args, f"wrote {'stdout' if p == '-' else p}")
    if args.json:
        print(json.dumps(report, indent=2))
    return EXIT_OK


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _columns_by_prompt(images: list, n_prompts: int, num_images: int) -> list:
    """Prompt-major images reordered row by row for a grid with one column per prompt."""
    if n_prompts <= 1:
        return images
    return [images[p * num_images + r] for r in range(num_images) for p in range(n_prompts)]


def _guidance_report(plan) -> dict:
    d = {"type": plan.guidance_type}
    if plan.guidance_model is not None:
        sc = plan.guidance_model_scale
        d.update(
            model=plan.guidance_model.name,
            stage=plan.guidance_model.stage,
            scale=float(sc[0]) if (sc == sc[0]).all() else [float(v) for v in sc],
        )
    return d
