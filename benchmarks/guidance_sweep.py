"""The guidance comparison of issue 7 (quality against diversity per guidance type and scale):
`pydiff eval guidance` (pydiff/tools/eval/guidance_sweep.py), writing to benchmarks/results by default.

    python benchmarks/guidance_sweep.py                                  # digits, ~7 min on 2 busy cores
    python benchmarks/guidance_sweep.py --dataset shapes --base-only     # shapes, its 16x16 base stage
writes benchmarks/results/guidance_sweep_{digits,shapes}.{json,png}; options: pydiff eval guidance --help.
"""

import sys
from pathlib import Path

from pydiff.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", str(Path(__file__).resolve().parent / "results")]
    raise SystemExit(main(["eval", "guidance", *argv]))
