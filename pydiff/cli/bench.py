"""`pydiff bench`: the end-to-end benchmark, pydiff against a diffusers-style torch loop on the
same networks (pydiff.tools.bench says what is measured). Needs torch and diffusers."""

from __future__ import annotations

import json

from pydiff.cli.common import EXIT_OK, number, positive_int
from pydiff.errors import UsageError
from pydiff.files import write_json
from pydiff.tools.bench import bar_chart, format_table, run_benchmark


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="end-to-end benchmark: pydiff vs a diffusers-style "
        "torch loop on the same networks (needs torch)",
    )
    p.add_argument("--model", help="package (default: the bundled shapes cascade)")
    p.add_argument(
        "--run",
        action="append",
        metavar="STAGE=RUN_DIR",
        help="training run of a stage's torch network (default: the networks rebuilt from the package's own weights)",
    )
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--guidance", type=number)
    p.add_argument(
        "--thresholding",
        choices=["none", "static", "dynamic"],
        help="for every stage (default: the package's recommendation)",
    )
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--json-out", metavar="PATH")
    p.add_argument("--chart", metavar="PNG", help="write a bar chart")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    runs = None
    if args.run:
        runs = {}
        for r in args.run:
            if "=" not in r:
                raise UsageError(f"--run {r!r}: expected STAGE=RUN_DIR")
            k, _, v = r.partition("=")
            runs[k] = v
    rep = run_benchmark(
        args.model,
        runs,
        batch=args.batch,
        steps=args.steps,
        thresholding=args.thresholding,
        guidance_scale=args.guidance,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(format_table(rep))
    if args.json_out:
        write_json(rep, args.json_out)
    if args.chart:
        bar_chart(rep, args.chart)
    return EXIT_OK
