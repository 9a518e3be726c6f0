"""`pydiff serve`: the HTTP server (the `[serve]` extra). Without the extra the command is still
listed, and says how to install it."""

from __future__ import annotations

import os
import signal
import sys
import threading

from pydiff import ops
from pydiff.errors import UsageError

try:  # the [serve] extra: Starlette, uvicorn, prometheus_client
    from pydiff.serving import POLICIES, Limits, ray_serve, serve
except ImportError as e:  # only a missing extra leaves the command without its server
    if e.name not in ("starlette", "uvicorn", "prometheus_client"):
        raise
    serve, ray_serve, POLICIES, Limits, MISSING = None, None, ("single", "batch"), None, e.name
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
        default=None,
        help="how requests share network calls: single (each alone, pydiff.generate's images; the default), "
        "step (step-level batching; the default with --ray), batch",
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
    r = p.add_argument_group("Ray Serve (the [ray] extra; docs/ray.md)")
    r.add_argument(
        "--ray",
        action="store_true",
        help="deploy on Ray Serve: an ingress with this API in front of engine replicas (policy step by default)",
    )
    r.add_argument(
        "--ray-address",
        default=None,
        help="the cluster (default: $RAY_ADDRESS or the one `ray start` began here, else a new local one)",
    )
    r.add_argument("--replicas", type=int, default=1, help="engine replicas, without autoscaling (default 1)")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas (default 1)")
    r.add_argument("--max-replicas", type=int, default=None, help="autoscaling on: most replicas")
    r.add_argument(
        "--target-ongoing",
        type=float,
        default=8.0,
        help="autoscaling: requests in flight per replica it aims at (default 8)",
    )
    r.add_argument("--threads", type=int, default=1, help="CPUs and threads per engine replica (default 1)")
    r.add_argument(
        "--max-ongoing", type=int, default=16, help="requests one engine replica takes at once (default 16)"
    )
    r.add_argument(
        "--attempts",
        type=int,
        default=4,
        help="tries per request when replicas die under it, with backoff from 0.5 s (default 4)",
    )
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
    if args.ray:
        return _run_ray(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"pydiff serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    serve(
        args.model or ["shapes"],
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        backend=args.backend,
        api_key=args.api_key,
        policy=args.policy or "single",
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        timeout_s=args.timeout,
        limits=_limits(args),
        warm=not args.no_warm,
    )
    return 0


def _limits(args):
    return Limits(
        max_prompt_chars=args.max_prompt_chars,
        max_images=args.max_images,
        max_steps=args.max_steps,
        max_image_side=args.max_image_side,
    )


def _run_ray(args) -> int:
    """Deploy on Ray Serve and wait for SIGTERM / Ctrl-C; then delete the application."""
    if not ray_serve.available():
        raise UsageError(
            "pydiff serve --ray needs the [ray] extra (ray is missing): pip install 'pydiff[ray]'"
        )
    for name in ("replicas", "threads", "max_ongoing", "attempts"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.policy == "batch":
        raise UsageError(
            "--policy batch with --ray: a batched request's images depend on its neighbours, so a request "
            "retried on another replica would not get the same ones; use step (the default) or single"
        )
    autoscaling = None
    if args.max_replicas is not None or args.min_replicas is not None:
        lo = 1 if args.min_replicas is None else args.min_replicas
        hi = args.max_replicas if args.max_replicas is not None else max(lo, args.replicas)
        if lo < 0 or hi < max(1, lo):
            raise UsageError(f"--min-replicas {lo} / --max-replicas {hi}: need 0 <= min <= max, max >= 1")
        if not args.target_ongoing > 0:
            raise UsageError(f"--target-ongoing must be > 0, got {args.target_ongoing}")
        autoscaling = {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": args.target_ongoing}
    app = ray_serve.build_app(
        args.model or ["shapes"],
        num_replicas=args.replicas,
        autoscaling=autoscaling,
        threads=args.threads,
        max_ongoing_requests=args.max_ongoing,
        policy=args.policy or "step",
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        timeout_s=args.timeout,
        limits=_limits(args),
        backend=args.backend,
        api_key=args.api_key,
        warm=not args.no_warm,
        max_attempts=args.attempts,
    )
    ray_serve.connect(args.ray_address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets a SIGTERM handler of its own
        signal.signal(sig, lambda *_: stop.set())
    url = ray_serve.deploy(app, host=args.host, port=args.port)
    print(f"pydiff serve --ray: {url} (Ray Serve application 'pydiff'; Ctrl-C ends it)", file=sys.stderr)
    while not stop.wait(1.0):
        pass
    ray_serve.undeploy("pydiff")
    return 0
