"""Shapes alignment of a package (default: the bundled cascade); `pydiff eval shapes` (pydiff.tools.eval.packages).

python benchmarks/eval_shapes.py [--model DIR] [--n 200] [--grid samples.png]
"""

import sys

from pydiff.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["eval", "shapes", *sys.argv[1:]]))
