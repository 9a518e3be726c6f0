"""Digits classifier accuracy and diversity of a package (default: the bundled one); `pydiff eval digits`.

python benchmarks/eval_digits.py [--model DIR] [--n 30]   # n samples per class
"""

import sys

from pydiff.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["eval", "digits", *sys.argv[1:]]))
