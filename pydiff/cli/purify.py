"""`pydiff purify WHAT`: DiffPure with the digits model (docs/discriminative.md).

run: purify images (.npy [N, 1, 8, 8] in [-1, 1]) at t*; benchmark: clean and robust accuracy of a
CNN against t* under PGD with BPDA+EOT, the undefended classifier beside."""

from __future__ import annotations

import numpy as np

from pydiff.cli.common import EXIT_OK
from pydiff.cli.segment import _ints, _load_images
from pydiff.discriminative import Purifier
from pydiff.errors import UsageError
from pydiff.tools.discriminative import purification


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "purify", help="adversarial purification (DiffPure) with a diffusion model", description=__doc__
    )
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    r = sub.add_parser("run", help="purify images at t*")
    r.add_argument("images", help=".npy float32 [N, C, R, R] in [-1, 1] at the stage's resolution")
    r.add_argument("-o", "--out", required=True, help="output .npy")
    r.add_argument("--model", default="digits")
    r.add_argument("--t-star", type=int, default=100)
    r.add_argument("--steps", type=int, default=5, help="DDIM steps from t* to 0")
    r.add_argument("--seed", type=int, default=None)
    r.set_defaults(func=_run)
    b = sub.add_parser("benchmark", help="clean and robust accuracy vs t* (PGD, BPDA+EOT)")
    b.add_argument("out_dir", nargs="?", default="benchmarks/results/discriminative")
    b.add_argument("--t-stars", default="0,50,100,200")
    b.add_argument("--seeds", default="0,1,2")
    b.add_argument("-n", type=int, default=100, help="test images")
    b.add_argument("--pgd-steps", type=int, default=7)
    b.add_argument("--eot", type=int, default=2)
    b.add_argument("--purify-steps", type=int, default=4)
    b.set_defaults(func=_benchmark)


def _run(args) -> int:
    x = _load_images(args.images)
    try:
        out = Purifier(args.model, steps=args.steps)(x, args.t_star, args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    np.save(args.out, out)
    return EXIT_OK


def _benchmark(args) -> int:
    purification.benchmark(args.out_dir, t_stars=_ints(args.t_stars, "--t-stars"), seeds=_ints(args.seeds, "--seeds"),
                           n=args.n, steps=args.pgd_steps, eot=args.eot, purify_steps=args.purify_steps)  # fmt: skip
    return EXIT_OK
