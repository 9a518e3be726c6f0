"""`pydiff export WHAT`: write model packages (from training runs, from diffusers, the text
encoder) and rewrite ONNX files (float16, static shapes; the CUDA placement prediction).
Needs the [train] extra (torch); `diffusers` also needs diffusers."""

from __future__ import annotations

import contextlib
import json

from pydiff.backends import float16
from pydiff.cli.common import EXIT_OK
from pydiff.cli.importing import add_diffusers_arguments
from pydiff.errors import UsageError
from pydiff.tools.export import ort_placement, static_shapes
from pydiff.tools.export.from_runs import export_digits, export_shapes
from pydiff.tools.export.minilm import export_text_encoder


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a pydiff model package (ONNX + manifest.json), or "
        "rewrite ONNX files (float16, static shapes)",
    )
    esub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    s = esub.add_parser("shapes", help="the shapes cascade from a base run and an SR run (or one stage)")
    s.add_argument("--base", required=True)
    s.add_argument("--sr", help="the SR run (leave out for a one-stage package, e.g. colorization)")
    s.add_argument("--text-encoder", required=True)
    s.add_argument("--out", required=True)
    s.add_argument(
        "--base-recommended",
        type=json.loads,
        default=None,
        help='JSON merged into the base stage\'s "recommended", e.g. \'{"guidance_scale": 4}\'',
    )
    s.add_argument("--sr-recommended", type=json.loads, default=None)
    s.add_argument("--noise-aug-level", type=int, default=100)
    s.add_argument("--notes", default="", help="Markdown appended to TRAINING.md (e.g. eval figures)")
    s.add_argument("--name", default="shapes", help="the package's name (manifest)")
    s.add_argument("--description", help="the package's description (manifest)")
    s.add_argument(
        "--shared-text-encoder",
        metavar="PACKAGE",
        help="name the bundled PACKAGE's text encoder (the same file) instead of shipping a copy",
    )
    s.set_defaults(func=_run_shapes)
    d = esub.add_parser("digits", help="the digits class-conditional model from a run")
    d.add_argument("--run", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--recommended", type=json.loads, default=None)
    d.add_argument("--notes", default="")
    d.set_defaults(func=_run_digits)
    f = esub.add_parser(
        "diffusers",
        help="a diffusers pipeline or UNet folder (the same command as `pydiff import diffusers`)",
    )
    add_diffusers_arguments(f, legacy=True)
    e = esub.add_parser("text-encoder", help="export all-MiniLM-L6-v2 to int8 ONNX")
    e.add_argument("--out", required=True)
    e.add_argument("--max-length", type=int, default=16)
    e.set_defaults(func=_run_text_encoder)
    h = esub.add_parser(
        "float16",
        help="rewrite ONNX networks to compute in float16 (float32 inputs and "
        "outputs), for fp16 TensorRT 11 engines",
        description="rewrite ONNX networks to compute in float16 (float32 inputs and "
        "outputs), for fp16 TensorRT 11 engines",
    )
    h.add_argument(
        "--package", action="store_true", help="SRC and DST are model packages: convert every stage network"
    )
    h.add_argument("src", metavar="SRC")
    h.add_argument("dst", metavar="DST")
    h.set_defaults(func=_run_float16)
    q = esub.add_parser(
        "static-shapes",
        help="fold shape arithmetic of batch-dynamic ONNX files in place",
        description="fold shape arithmetic of batch-dynamic ONNX files in place",
    )
    q.add_argument("files", nargs="+", metavar="FILE")
    q.set_defaults(func=_run_static_shapes)
    first_line = ort_placement.__doc__.splitlines()[0]
    o = esub.add_parser(
        "ort-placement",
        help="predict the CPU nodes and Memcpy of ONNX Runtime's CUDA provider for ONNX files",
        description=first_line,
    )
    o.add_argument("files", nargs="+", metavar="FILE")
    o.set_defaults(func=_run_ort_placement)


def _run_shapes(a) -> int:
    print(
        json.dumps(
            export_shapes(
                a.base,
                a.sr,
                a.text_encoder,
                a.out,
                base_recommended=a.base_recommended,
                sr_recommended=a.sr_recommended,
                noise_aug_level=a.noise_aug_level,
                extra_md=a.notes,
                name=a.name,
                description=a.description,
                shared_text_encoder=a.shared_text_encoder,
            ),
            indent=1,
        )
    )
    return EXIT_OK


def _run_digits(a) -> int:
    print(json.dumps(export_digits(a.run, a.out, recommended=a.recommended, extra_md=a.notes), indent=1))
    return EXIT_OK


def _run_text_encoder(a) -> int:
    print(json.dumps(export_text_encoder(a.out, max_length=a.max_length)))
    return EXIT_OK


def _run_float16(a) -> int:
    with _model_file(a.src):
        return _float16(a)


@contextlib.contextmanager
def _model_file(path):
    """A file onnx or ONNX Runtime cannot parse (their own exception types) is the user's: exit 2."""
    try:
        yield
    except Exception as e:
        if not type(e).__module__.startswith(("onnxruntime", "onnx", "google.protobuf")):
            raise
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise UsageError(f"{path}: not an ONNX model that can be read ({first})") from None


def _float16(a) -> int:
    if a.package:
        for name, counts in float16.convert_package(a.src, a.dst).items():
            print(f"{name}: {counts}")
    else:
        print(float16.convert_file(a.src, a.dst))
    return EXIT_OK


def _run_static_shapes(a) -> int:
    for f in a.files:
        with _model_file(f):
            r = static_shapes.freeze_shapes_file(f)
        print(
            f"{f}: nodes {r['nodes_before']} -> {r['nodes_after']}, "
            f"Shape/Size {r['shape_ops_before']} -> {r['shape_ops_after']}"
        )
    return EXIT_OK


def _run_ort_placement(a) -> int:
    for f in a.files:
        with _model_file(f):
            r = ort_placement.predict_file(f)
        top = ", ".join(f"{op} {c}" for op, c in r.cpu_nodes.most_common(4))
        print(f"{f}: {r.nodes} nodes, {r.n_cpu} on the CPU ({top or 'none'}), {r.memcpy} Memcpy")
    return EXIT_OK
