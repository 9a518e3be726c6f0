"""Cost of a step per row: pydiff.ops.fused_step_rows against fused_step on the same batch.

fused_step_rows gives every row its own StepParams (coefficients, modes, noise key), which is what
step-level batching across requests needs; fused_step shares one StepParams over the batch. Both run
on the same inputs at (16, 3, 64, 64) with guidance, measured side by side in one run: the two
alternate over rounds and the ratio is the median of the rounds' ratios (with its range). Three
row tables: every row the same step as fused_step's ("same"); rows at different steps of the same
sampler with their own seeds ("steps"); and a mix of samplers, thresholding modes and steps
("mixed": another workload than fused_step's, which cannot run it in one call; its time is the
figure, its ratio only says how it compares with that line's fused_step). The table is built once (pydiff.ops.step_params_table), as a
scheduler keeps it; the list-of-StepParams form is timed too.

    python benchmarks/bench_rows.py                 # table on stdout
    python benchmarks/bench_rows.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

import pydiff
from pydiff import ops

SHAPE = (16, 3, 64, 64)
GUIDANCE = 5.0
STEPS = 50
STEP_INDEX = 20


def median_time(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def interleaved(fns: dict, rounds: int, per_round: int) -> dict:
    for fn in fns.values():
        for _ in range(3):
            fn()
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].append(median_time(fn, per_round))
    return out


def sampler(name: str, thresholding: bool):
    sched = pydiff.Schedule(
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        thresholding=thresholding,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.5,
    )
    return pydiff.make_sampler(name, sched, STEPS)


def inputs(alpha: float, sigma: float):
    rng = np.random.default_rng(0)
    x0 = 0.5 * rng.standard_normal(SHAPE)
    eps = rng.standard_normal(SHAPE)
    x = (alpha * x0 + sigma * eps).astype(np.float32)
    both = np.concatenate([eps + 0.02 * rng.standard_normal(SHAPE), eps + 0.02 * rng.standard_normal(SHAPE)])
    prev = (0.5 * rng.standard_normal(SHAPE)).astype(np.float32)
    return x, both.astype(np.float32), prev


def tables(name: str, thresholding: bool, B: int):
    s = sampler(name, thresholding)
    same = [s.params(STEP_INDEX, seed=0)] * B
    steps = [s.params(1 + (STEP_INDEX + 7 * b) % (STEPS - 2), seed=b) for b in range(B)]
    mixed = []
    for b in range(B):
        other = sampler(["ddpm", "ddim", "dpmpp_2m"][b % 3], b % 2 == 0)
        mixed.append(other.params(1 + (5 * b) % (STEPS - 2), seed=100 + b))
    return s.params(STEP_INDEX, seed=0), {"same": same, "steps": steps, "mixed": mixed}


def run(rounds: int, per_round: int) -> list[dict]:
    B = SHAPE[0]
    rows_out = []
    for name in ("ddpm", "ddim", "dpmpp_2m"):
        for thresholding in (False, True):
            base, kinds = tables(name, thresholding, B)
            x, mo, prev = inputs(base["alpha"], base["sigma"])
            out, x0 = np.empty_like(x), np.empty_like(x)
            p = ops.step_params(**base)
            kw = dict(guidance_scale=GUIDANCE, out=out, x0_out=x0)
            fns = {
                "fused_step": lambda: ops.fused_step(x, mo, p, x0_prev=prev if base["c_d"] else None, **kw)
            }
            for kind, fields in kinds.items():
                table = ops.step_params_table(fields)
                has_prev = any(f["c_d"] for f in fields)
                fns[kind] = lambda t=table, h=has_prev: ops.fused_step_rows(
                    x, mo, t, x0_prev=prev if h else None, **kw
                )
            listed = [ops.step_params(**f) for f in kinds["steps"]]
            fns["steps (list)"] = lambda: ops.fused_step_rows(x, mo, listed, x0_prev=prev, **kw)
            times = interleaved(fns, rounds, per_round)
            ref = times["fused_step"]
            res = {
                "sampler": name,
                "thresholding": "dynamic" if thresholding else "none",
                "fused_step_us": 1e6 * statistics.median(ref),
            }
            for kind in fns:
                if kind == "fused_step":
                    continue
                ratios = [t / r for t, r in zip(times[kind], ref)]
                res[kind] = {
                    "us": 1e6 * statistics.median(times[kind]),
                    "ratio": statistics.median(ratios),
                    "ratio_range": [min(ratios), max(ratios)],
                }
            rows_out.append(res)
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="CPU kernel threads (0: OpenMP's default)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    ops.set_num_threads(args.threads)
    results = run(args.rounds, args.per_round)
    kinds = ["same", "steps", "mixed", "steps (list)"]
    print(f"fused_step_rows vs fused_step, {SHAPE}, guidance {GUIDANCE}, {ops.get_num_threads()} threads")
    print(f"{'sampler':10} {'threshold':9} {'fused_step':>11} " + " ".join(f"{k:>22}" for k in kinds))
    for r in results:
        cells = [f"{r[k]['us']:7.0f} us x{r[k]['ratio']:.2f}" for k in kinds]
        print(
            f"{r['sampler']:10} {r['thresholding']:9} {r['fused_step_us']:8.0f} us "
            + " ".join(f"{c:>22}" for c in cells)
        )
    if args.json:
        meta = {
            "shape": SHAPE,
            "threads": ops.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
