"""How much super-resolution training runs use their low-resolution input, per noise level.

    python benchmarks/sr_lowres_use.py runs/shapes_sr64 runs/shapes_sr64_v [--t 300 600 900 950 990]

For each run (a `pydiff train shapes-sr64` directory, EMA weights), one batch of 32 shapes training
images at 64x64 (the training stream of the first run's config: captions encoded one at a time,
augmentation levels drawn in [0, max_noise_level]; the same batch for every run) is noised to x_t at
each t, and the network's x0 (from its eps or v output, clipped
to [-1, 1]) is compared with the truth, once with each image's own `low_res` and once with its
neighbour's. A stage that uses `low_res` has a small error with the right one and a large one with
the wrong one; an error that barely moves means the stage is drawing from x_t and the text alone.
Needs the `train` extra (torch) and the runs' text encoder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def x0_errors(run_dirs, timesteps, seed: int = 11, n: int = 32) -> dict:
    import torch

    from pydiff.reference import predict_x0
    from pydiff.tools.training.schedule import alphas_cumprod
    from pydiff.tools.training.tasks import ShapesTask
    from pydiff.tools.training.trainer import load_run_model

    models = {str(r): load_run_model(r) for r in run_dirs}
    cfg = next(iter(models.values()))[1]
    cfg.crop, cfg.cond_drop = None, 0.0  # whole 64x64 images, every caption kept
    task = ShapesTask(cfg, None)
    batch = task.batch(np.random.default_rng(seed), n)
    eps = torch.randn(batch["x0"].shape, generator=torch.Generator().manual_seed(seed))
    shuffled = torch.roll(torch.arange(n), 1)
    rest = {k: v for k, v in batch.items() if k not in ("x0", "low_res")}
    out: dict = {}
    for name, (model, c) in models.items():
        abar = torch.from_numpy(alphas_cumprod(c.num_train_timesteps, c.beta_schedule)).float()
        rows = out[name] = {}
        for t in timesteps:
            a = abar[t]
            xt = a.sqrt() * batch["x0"] + (1 - a).sqrt() * eps
            errs = []
            for low in (batch["low_res"], batch["low_res"][shuffled]):
                with torch.no_grad():
                    y = model(xt, torch.full((n,), float(t)), low_res=low, **rest)
                # the sampler's own formula (the oracle of the native kernels), float32
                x0 = predict_x0(
                    xt.numpy(), y.numpy(), float(a.sqrt()), float((1 - a).sqrt()), c.prediction_type
                )
                errs.append(float(((np.clip(x0, -1, 1) - batch["x0"].numpy()) ** 2).mean()))
            rows[int(t)] = {"right_low_res": round(errs[0], 4), "shuffled_low_res": round(errs[1], 4)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--t", type=int, nargs="+", default=[300, 600, 900, 950, 990])
    p.add_argument("--seed", type=int, default=11)
    a = p.parse_args(argv)
    res = x0_errors(a.runs, a.t, seed=a.seed)
    print("x0 mean squared error, right low_res / neighbour's low_res")
    print(f"{'t':>5}  " + "  ".join(f"{Path(r).name:>24}" for r in res))
    for t in a.t:
        print(
            f"{t:5d}  "
            + "  ".join(
                f"{res[r][t]['right_low_res']:.4f} / {res[r][t]['shuffled_low_res']:.4f}".rjust(24)
                for r in res
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
