"""The README's inpainting picture: plain replacement against RePaint's resampling, same seeds.

    python benchmarks/inpaint_picture.py [--model DIR] [--n 8] [--out docs/images/inpaint.png]

Rows: each task's input (the regenerated region in grey), then the result without resampling
(jump_n_sample 1), then with the package's resampling; the tasks are pydiff.tools.eval.packages'
`inpaint_cases` (complete half a shape from its own caption; replace a shape by another).
"""

from __future__ import annotations

import argparse

import numpy as np

from pydiff.pipeline import load
from pydiff.tools.eval.packages import inpaint_cases, save_image_grid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--out", default="docs/images/inpaint.png")
    a = p.parse_args(argv)
    pipe = load(a.model)
    base = pipe.package.stages[0].name
    rows = []
    cases = inpaint_cases(a.n)
    for task in ("complete", "replace"):
        shown = [np.where(c[task][0][..., None], 0.85, c["image"] / 255.0) for c in cases]
        rows.append(np.stack(shown))
        for extra in ({"jump_n_sample": {base: 1}}, {}):
            rows.append(
                np.concatenate(
                    [
                        pipe.inpaint(
                            c["image"],
                            c[task][0],
                            c[task][1],
                            seed=i,
                            progress=False,
                            output_type="numpy",
                            **extra,
                        )
                        for i, c in enumerate(cases)
                    ]
                )
            )
    save_image_grid(np.concatenate(rows), a.out, cols=a.n, scale=2)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
