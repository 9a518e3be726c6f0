"""End-to-end benchmark of the bundled cascade: pydiff vs a diffusers-style PyTorch loop.

Same as `pydiff bench`; see pydiff/tools/bench.py for what is measured. Example (README figures):

    python benchmarks/bench_e2e.py --batch 8 --steps 25 --thresholding dynamic --repeats 3 \
        --json-out benchmarks/results/e2e.json --chart benchmarks/results/e2e.png
"""

from __future__ import annotations

import sys

from pydiff.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
