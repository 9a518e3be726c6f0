"""RePaint on an exact model: how far replacement alone and resampling land from the true conditional.

    python benchmarks/repaint_gaussian.py

Data x0 ~ N(0, [[1, rho], [rho, 1]]), rho = 0.95, with its closed-form eps (pydiff.tools.testing); the
first coordinate is kept at 2, so the second's exact conditional is N(2 rho, 1 - rho^2) =
N(1.90, 0.312^2). 4000 samples per row, linear beta schedule, seed 1 (tests/test_repaint.py
asserts the first six rows' gap).
"""

import numpy as np

import pydiff
from pydiff.tools.testing import gaussian_eps_model

RHO = 0.95
ROWS = [
    ("ddpm", 50, 5, 1),
    ("ddpm", 50, 5, 10),
    ("ddim", 50, 5, 1),
    ("ddim", 50, 5, 10),
    ("dpmpp_2m", 25, 5, 1),
    ("dpmpp_2m", 25, 5, 10),
    ("ddpm", 250, 10, 1),
    ("ddpm", 250, 10, 10),
]


def main() -> int:
    sched = pydiff.Schedule(beta_schedule="linear", prediction_type="epsilon", clip_sample=False)
    model = gaussian_eps_model([[1.0, RHO], [RHO, 1.0]], sched)
    x_T = np.random.default_rng(0).standard_normal((4000, 2)).astype(np.float32)
    known = np.array([[2.0, 0.0]], np.float32)
    mask = np.array([[0.0, 1.0]], np.float32)
    print(f"exact conditional: mean {2 * RHO:.3f}, sd {np.sqrt(1 - RHO**2):.3f}")
    print("| sampler | steps | jump_length | jump_n_sample | mean | sd |\n|---|---|---|---|---|---|")
    for sampler, steps, L, r in ROWS:
        b = pydiff.repaint(
            model,
            x_T,
            known,
            mask,
            schedule=sched,
            sampler=sampler,
            steps=steps,
            jump_length=L,
            jump_n_sample=r,
            seed=1,
        )[:, 1]
        print(f"| {sampler} | {steps} | {L} | {r} | {b.mean():.3f} | {b.std():.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
