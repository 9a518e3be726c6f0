"""`pydiff eval WHAT`: evaluate a shapes or digits package (alignment, accuracy, PSNR), or sweep
guidance types and scales (`pydiff eval guidance`: quality against diversity). No torch; digits
needs scikit-learn."""

from __future__ import annotations

import json
import math
import sys

from pydiff.cli.common import EXIT_OK
from pydiff.errors import UsageError
from pydiff.tools.eval import guidance_sweep
from pydiff.tools.eval.packages import (
    evaluate_digits,
    evaluate_shapes,
    evaluate_shapes_colorize,
    evaluate_shapes_img2img,
    evaluate_shapes_inpaint,
    evaluate_shapes_sr,
    evaluate_shapes_uncrop,
)

PACKAGE_EVALUATIONS = (
    ("shapes", "alignment of a shapes package on seen and held-out prompts"),
    (
        "shapes-sr",
        "a shapes package's super-resolution stage alone, on rendered low-resolution images "
        "(alignment, PSNR; bilinear beside)",
    ),
    (
        "shapes-inpaint",
        "inpainting with a shapes package: completing half a shape (PSNR) and replacing a shape (alignment)",
    ),
    (
        "shapes-img2img",
        "SDEdit with a shapes package: alignment to an edited caption against the layout kept, per strength",
    ),
    (
        "shapes-uncrop",
        "uncropping with a shapes package: the far side of a seam through the shape regenerated "
        "(alignment, PSNR just beyond the seam)",
    ),
    (
        "shapes-colorize",
        "colorization with a shapes colorization package: the colours read back from grey images, "
        "unambiguous and ambiguous greys apart, with and without the caption",
    ),
    ("digits", "SVM accuracy, diversity and memorisation of a digits package"),
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a shapes or digits package (alignment / accuracy), or "
        "sweep guidance types and scales (quality against diversity)",
    )
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    for what, help_ in PACKAGE_EVALUATIONS:
        q = sub.add_parser(what, help=help_, description=help_)
        q.add_argument("--model", default=None, help="package path (default: the bundled one)")
        q.add_argument(
            "--n",
            type=int,
            default=None,
            help="shapes: images per split (default 200); shapes-sr, shapes-inpaint, shapes-uncrop: "
            "images (default 40); shapes-img2img: images (default 24); shapes-colorize: images (default 100); digits: "
            "per class (default 30)",
        )
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--guidance-scale", type=float)
        q.add_argument("--steps", type=int)
        q.add_argument("--grid", help="save a PNG grid of samples here")
        q.add_argument(
            "--settings",
            type=json.loads,
            default=None,
            metavar="JSON",
            help="more generate/inpaint/img2img keywords, per-stage dicts allowed, e.g. "
            '\'{"jump_n_sample": {"base": 1}}\'; shapes-img2img also takes '
            '"later_strength": the strength of the stages after the first',
        )
        q.set_defaults(func=_run_package)
    g = sub.add_parser(
        "guidance",
        help="quality against diversity per guidance type and scale (JSON + PNG)",
        description=guidance_sweep.__doc__.split("\n\n")[0],
    )
    _add_guidance_arguments(g)
    g.set_defaults(func=_run_guidance)


def _run_package(a) -> int:
    settings = {k: v for k, v in (("guidance_scale", a.guidance_scale), ("steps", a.steps)) if v is not None}
    if a.settings is not None:
        if not isinstance(a.settings, dict):
            raise UsageError("--settings: expected a JSON object")
        settings.update(a.settings)
    if a.what == "shapes":
        rep = evaluate_shapes(a.model, a.n or 200, seed=a.seed, save_grid=a.grid, **settings)
    elif a.what == "shapes-inpaint":
        rep = evaluate_shapes_inpaint(
            a.model, 40 if a.n is None else a.n, seed=a.seed, save_grid=a.grid, **settings
        )
    elif a.what == "shapes-img2img":
        later = settings.pop("later_strength", None)
        rep = evaluate_shapes_img2img(
            a.model,
            24 if a.n is None else a.n,
            seed=a.seed,
            save_grid=a.grid,
            later_strength=later,
            **settings,
        )
    elif a.what == "shapes-uncrop":
        rep = evaluate_shapes_uncrop(
            a.model, 40 if a.n is None else a.n, seed=a.seed, save_grid=a.grid, **settings
        )
    elif a.what == "shapes-colorize":
        if a.model is None:
            raise UsageError("shapes-colorize: --model names the colorization package (none is bundled)")
        rep = evaluate_shapes_colorize(
            a.model, 100 if a.n is None else a.n, seed=a.seed, save_grid=a.grid, **settings
        )
    elif a.what == "shapes-sr":
        rep = evaluate_shapes_sr(
            a.model, 40 if a.n is None else a.n, seed=a.seed, save_grid=a.grid, **settings
        )
    else:
        rep = evaluate_digits(a.model or "digits", a.n or 30, seed=a.seed, save_grid=a.grid, **settings)
    print(json.dumps(rep, indent=1))
    return EXIT_OK


# ------------------------------------------------------------------------------- eval guidance


def _add_guidance_arguments(p) -> None:
    G = guidance_sweep
    p.add_argument(
        "--dataset",
        choices=G.DATASETS,
        default="digits",
        help="which scorer, and the bundled package used by default (default: digits)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="package directory or bundled name (default: the bundled DATASET package)",
    )
    p.add_argument(
        "--types",
        default=None,
        metavar="T[,T...]",
        help=f"guidance types to sweep, from {', '.join(G.TYPES)} (default: digits "
        f"{','.join(G.DEFAULT_TYPES['digits'])}; shapes {','.join(G.DEFAULT_TYPES['shapes'])}; "
        f"those the package has guidance models for)",
    )
    p.add_argument(
        "--scales",
        action="append",
        default=None,
        metavar="[TYPE=]S[,S...]",
        help="guidance scales; a plain list applies to every type, TYPE=list to one; "
        "repeatable (default: "
        + "; ".join(
            f"{d} " + " ".join(f"{t}={','.join(f'{v:g}' for v in ss)}" for t, ss in per.items())
            for d, per in G.DEFAULT_SCALES.items()
        )
        + ")",
    )
    p.add_argument(
        "--n", type=int, default=None, help="digits: samples per class; shapes: prompts (default 10)"
    )
    p.add_argument(
        "--num-images", type=int, default=4, metavar="K", help="shapes: images per prompt (default 4)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps (default: the package's recommended; classifier_ddpm100 keeps 100)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--thresholding-scales",
        default=None,
        metavar="S[,S...]|none",
        help="classifier-free scales at which to compare thresholding none / static / dynamic "
        "(default: shapes 3,8,15; digits none)",
    )
    p.add_argument(
        "--base-only", action="store_true", help="run only the package's first stage (shapes: 16x16, fast)"
    )
    p.add_argument("--note", default=None, help="a note stored in the JSON and drawn on the PNG")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for guidance_sweep_DATASET.json and .png (made if needed)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or per-point lines")


def _scale_list(text: str, flag: str) -> tuple[float, ...]:
    """ "0,1.5,3" -> (0.0, 1.5, 3.0), each once; finite and >= 0."""
    parts = [v.strip() for v in text.split(",")]
    if not any(parts):
        raise UsageError(f"{flag} {text!r}: empty scale list")
    out = []
    for v in parts:
        try:
            s = float(v)
        except ValueError:
            raise UsageError(f"{flag} {text!r}: invalid scale {v!r}") from None
        if not math.isfinite(s) or s < 0:
            raise UsageError(f"{flag} {text!r}: scales must be finite and >= 0, got {v!r}")
        if s not in out:
            out.append(s)
    return tuple(out)


def _scales(values) -> tuple[tuple[float, ...] | None, dict[str, tuple[float, ...]]]:
    """The --scales values: (the plain list for every type or None, {type: list})."""
    plain, per_type = None, {}
    for v in values or []:
        head, eq, rest = v.partition("=")
        if eq:
            t = head.strip()
            if t in per_type:
                raise UsageError(f"--scales: {t} given twice")
            per_type[t] = _scale_list(rest, f"--scales {t}=")
        else:
            if plain is not None:
                raise UsageError("--scales: give one plain list (for every type) at most")
            plain = _scale_list(v, "--scales")
    return plain, per_type


def _run_guidance(a) -> int:
    types = None if a.types is None else [t for t in (v.strip() for v in a.types.split(",")) if t]
    scales, scales_by_type = _scales(a.scales)
    if a.thresholding_scales is None:
        th_scales = None
    elif a.thresholding_scales.strip().lower() == "none":
        th_scales = ()
    else:
        th_scales = _scale_list(a.thresholding_scales, "--thresholding-scales")
    result = guidance_sweep.sweep(
        out=a.out,
        dataset=a.dataset,
        model=a.model,
        types=types,
        scales=scales,
        scales_by_type=scales_by_type,
        n=a.n,
        num_images=a.num_images,
        steps=a.steps,
        seed=a.seed,
        thresholding_scales=th_scales,
        base_only=a.base_only,
        note=a.note,
        progress=not a.quiet,
    )
    if not a.quiet:
        json_path, png_path = guidance_sweep.output_paths(a.out, a.dataset)
        print(f"wrote {json_path} and {png_path} ({result['seconds']} s)", file=sys.stderr)
    return EXIT_OK
