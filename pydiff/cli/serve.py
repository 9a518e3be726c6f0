"""`pydiff serve`: the HTTP server (the `[serve]` extra). Without the extra the command is still
listed, and says how to install it."""

from __future__ import annotations

import os
import sys

from pydiff import ops
from pydiff.errors import UsageError

try:  # the [serve] extra: Starlette, uvicorn, prometheus_client
    from pydiff.serving import POLICIES, Limits, serve
except ImportError as e:  # only a missing extra leaves the command without its server
    if e.name not in ("starlette", "uvicorn", "prometheus_client"):
        raise
    serve, POLICIES, Limits, MISSING = None, ("single", "batch"), None, e.name
else:
    MISSING = None


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve model packages over HTTP (OpenAI-compatible images API)")
    p.add_argument(
        "--model",
        action="append",
        metavar="PACKAGE",
        help="a package folder or a bundled name (shapes, digits); repeat for several (default: shapes)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("PYDIFF_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $PYDIFF_API_KEY; none: no auth)",
    )
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="single",
        help="how requests share network calls: single (each alone, pydiff.generate's images), step (step-level batching), batch",
    )
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429 (default 64)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="rows per network call, step and batch policies (default 16)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="request deadline in seconds (default 300)")
    p.add_argument("--max-images", type=int, default=16, help="images per request (default 16)")
    p.add_argument("--max-steps", type=int, default=1000, help="steps per stage per request (default 1000)")
    p.add_argument("--max-prompt-chars", type=int, default=1000, help="characters per prompt (default 1000)")
    p.add_argument("--max-image-side", type=int, default=1024, help="uploaded images' side (default 1024)")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime, ... (as pydiff generate)")
    p.add_argument("--no-warm", action="store_true", help="ready without a warm-up image per model")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)


def run(args) -> int:
    if serve is None:
        raise UsageError(
            f"pydiff serve needs the [serve] extra ({MISSING} is missing): pip install 'pydiff[serve]'"
        )
    for name in (
        "port",
        "max_queue",
        "max_batch",
        "max_images",
        "max_steps",
        "max_prompt_chars",
        "max_image_side",
    ):
        value = getattr(args, name)
        if value < (0 if name == "port" else 1) or (name == "port" and value > 65535):
            raise UsageError(f"--{name.replace('_', '-')}: out of range: {value}")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    if not ops.native_available():  # before listening: every request would fail on its first step
        try:
            ops._native()
        except ImportError as e:
            raise UsageError(
                f"{e} (a checkout of a non-editable install shadows it: run from another folder)"
            ) from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"pydiff serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    limits = Limits(
        max_prompt_chars=args.max_prompt_chars,
        max_images=args.max_images,
        max_steps=args.max_steps,
        max_image_side=args.max_image_side,
    )
    serve(
        args.model or ["shapes"],
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        backend=args.backend,
        api_key=args.api_key,
        policy=args.policy,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        timeout_s=args.timeout,
        limits=limits,
        warm=not args.no_warm,
    )
    return 0
