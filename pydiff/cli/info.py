"""`pydiff info`: version, native kernels, CUDA twin, ONNX Runtime providers, bundled models."""

from __future__ import annotations

import importlib.util
import json
import sys

from pydiff import __version__, ops
from pydiff.cli.common import EXIT_OK
from pydiff.package import bundled_packages, bundled_path


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="version, native kernels, providers, bundled models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def info() -> dict:
    """What this installation has: version, native kernels, CUDA twin, ORT providers, models."""
    d = {"version": __version__, "python": sys.version.split()[0]}
    try:
        d["native_kernels"] = bool(ops.native_available())
        d["cuda_twin"] = bool(ops.cuda_available())
    except Exception as e:  # a missing or broken build must not break `info`
        d["native_kernels"] = False
        d["cuda_twin"] = False
        d["native_error"] = f"{type(e).__name__}: {e}"
    try:
        # imported here: a broken onnxruntime install is something `info` reports, not dies of
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


def run(args) -> int:
    d = info()
    if args.json:
        print(json.dumps(d, indent=2))
        return EXIT_OK

    def yn(v):
        return "unknown" if v is None else ("yes" if v else "no")

    print(f"pydiff {d['version']} (Python {d['python']})")
    print(
        f"native kernels built: {yn(d['native_kernels'])}"
        + (f"  ({d['native_error']})" if "native_error" in d else "")
    )
    print(f"CUDA twin available:  {yn(d['cuda_twin'])}")
    print(f"ONNX Runtime:         {d['onnxruntime']}  providers: {', '.join(d['ort_providers'])}")
    print(f"torch installed:      {yn(d['torch_installed'])}")
    models = d["bundled_models"]
    print(
        "bundled models:       " + (", ".join(f"{k} ({v})" for k, v in models.items()) if models else "none")
    )
    return EXIT_OK
