"""Shapes alignment of a package (default: the bundled cascade); see pydiff.training.eval.

    python benchmarks/eval_shapes.py [--model DIR] [--n 200] [--grid samples.png]
"""
import sys

from pydiff.tools.eval.packages import main

if __name__ == "__main__":
    raise SystemExit(main(["shapes", *sys.argv[1:]]))
