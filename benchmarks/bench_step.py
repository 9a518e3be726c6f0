"""Per-step cost of pydiff's fused native step against the NumPy reference and diffusers.

One denoising step = classifier-free guidance mix + the sampler's update (+ dynamic thresholding),
on the same inputs, measured side by side in one run: pydiff and diffusers alternate over rounds,
and the speed-up is the median of the rounds' ratios (with its range). Both sides allocate their
output every step, as a sampling loop does. Also the bandwidth floor: a copy that moves as many
bytes as the fused step must (x, eps_cond, eps_uncond in; x_prev out; plus the x0 state for DPM++),
timed at the same thread count (torch's copy_; NumPy's single-threaded copy without torch) in the
same rounds as the step: each step's ratio to its floor is the median of the rounds' ratios.

    python benchmarks/bench_step.py                 # table on stdout
    python benchmarks/bench_step.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

import pydiff
from pydiff import ops, reference

SHAPES = [(4, 3, 64, 64), (16, 3, 64, 64), (4, 3, 256, 256), (1, 4, 128, 128)]
SAMPLERS = ["ddpm", "ddim", "dpmpp_2m"]
GUIDANCE = 5.0
STEPS = 50
STEP_INDEX = 20  # a step in the middle of the chain (noise on, history on)


def median_time(fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def floor_copy(n_moved: int, threads: int, torch=None):
    """A callable that copies n_moved / 2 floats (n_moved floats read + written: the step's traffic)."""
    half = n_moved // 2
    if torch is not None:
        torch.set_num_threads(threads)
        a, b = torch.ones(half), torch.empty(half)
        return lambda: b.copy_(a)
    a = np.ones(half, np.float32)
    b = np.empty_like(a)
    return lambda: np.copyto(b, a)


def interleaved(fns: dict, rounds: int, per_round: int) -> dict:
    """Per-round median seconds of each callable, the callables alternating round by round."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].append(median_time(fn, per_round, warmup=0))
    return out


def realistic_inputs(shape, alpha: float, sigma: float):
    """x_t and [eps_cond; eps_uncond] of a good model: x_t = alpha x0 + sigma eps with x0 ~ N(0, 0.5^2),
    each prediction eps + N(0, 0.02^2). With guidance 5, the 0.995-quantile of |x0_pred| then falls
    in (1, 1.5): the dynamic threshold must really be selected, not settled by its clamp."""
    rng = np.random.default_rng(0)
    x0 = 0.5 * rng.standard_normal(shape)
    eps = rng.standard_normal(shape)
    x = (alpha * x0 + sigma * eps).astype(np.float32)
    both = np.concatenate([eps + 0.02 * rng.standard_normal(shape), eps + 0.02 * rng.standard_normal(shape)])
    return x, both.astype(np.float32)


def schedule_for(thresholding: bool) -> pydiff.Schedule:
    # sample_max_value > 1 so that the quantile is really selected (with 1.0 it is clamp(-1, 1)).
    return pydiff.Schedule(
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        thresholding=thresholding,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.5,
    )


def make_diffusers_step(sampler, sched_cfg, shape, alpha, sigma, torch, diffusers):
    cfg = dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        thresholding=sched_cfg.thresholding,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.5,
    )
    if sampler == "ddpm":
        s = diffusers.DDPMScheduler(**cfg, clip_sample=False)
    elif sampler == "ddim":
        s = diffusers.DDIMScheduler(**cfg, clip_sample=False)
    else:
        s = diffusers.DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2)
    s.set_timesteps(STEPS)
    t = s.timesteps[STEP_INDEX]
    g = torch.Generator().manual_seed(0)
    x, both = (torch.from_numpy(a) for a in realistic_inputs(shape, alpha, sigma))
    prev = torch.randn(shape, generator=g)
    if sampler == "dpmpp_2m":
        s.lower_order_nums = 1

    def step():
        c, u = both.chunk(2)
        eps = u + GUIDANCE * (c - u)  # the usual torch CFG mix
        if sampler == "dpmpp_2m":
            s._step_index = STEP_INDEX
            s.model_outputs = [None, prev]  # step() shifts it to [prev, this step's x0]
        s.step(eps, t, x, generator=g) if sampler == "ddpm" else s.step(eps, t, x)

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--repeat", type=int, default=30, help="timed calls per side, over --rounds rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shapes", default=None, help="e.g. 16x3x64x64,4x3x256x256")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) NumPy reference")
    ap.add_argument(
        "--markdown", metavar="JSON", help="print a Markdown table of an earlier --json run and exit"
    )
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown_table(args.markdown))
        return None
    shapes = (
        SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    )
    try:
        import diffusers
        import torch
    except ImportError:
        torch = diffusers = None
        print("(diffusers/torch not installed: their columns are skipped)")

    rows = []
    per_round = max(3, args.repeat // args.rounds)
    for shape in shapes:
        n = int(np.prod(shape))
        for thr in (False, True):
            sched = schedule_for(thr)
            for sampler in SAMPLERS:
                smp = pydiff.make_sampler(sampler, sched, STEPS)
                fields = smp.params(STEP_INDEX, seed=1)
                x, both = realistic_inputs(shape, fields["alpha"], fields["sigma"])
                # x, eps_cond, eps_uncond in and x_prev out (+ x0_prev in, x0 out for DPM++); dynamic
                # thresholding reads the inputs again, which the floor does not count.
                arrays = 4 + (2 if sampler == "dpmpp_2m" else 0)
                prev = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
                p = ops.step_params(**fields)
                kw = dict(guidance_scale=GUIDANCE)  # out=None: a new output each step, as diffusers
                if sampler == "dpmpp_2m":
                    kw.update(x0_prev=prev)
                thresholds = np.empty(shape[0], np.float32)
                ops.fused_step(
                    x,
                    both,
                    p,
                    guidance_scale=GUIDANCE,
                    thresholds=thresholds,
                    **({"x0_prev": prev} if sampler == "dpmpp_2m" else {}),
                )
                selected = float(np.mean((thresholds > 1) & (thresholds < 1.5))) if thr else 0.0
                for nt in args.threads:
                    ops.set_num_threads(nt)
                    # the floor is timed in the same rounds as the step, so that the ratio of each round
                    # compares the two under the same load (this machine is shared)
                    fns = {
                        "pydiff": lambda: ops.fused_step(x, both, p, **kw),
                        "floor": floor_copy(arrays * n, nt, torch),
                    }
                    if torch is not None:
                        torch.set_num_threads(nt)
                        fns["diffusers"] = make_diffusers_step(
                            sampler, sched, shape, fields["alpha"], fields["sigma"], torch, diffusers
                        )
                    times = interleaved(fns, args.rounds, per_round)
                    row = dict(
                        shape="x".join(map(str, shape)),
                        sampler=sampler,
                        thresholding="dynamic" if thr else "off",
                        threads=nt,
                        pydiff_ms=statistics.median(times["pydiff"]) * 1e3,
                        floor_ms=statistics.median(times["floor"]) * 1e3,
                        copy_GBps=arrays * 4 * n / statistics.median(times["floor"]) / 1e9,
                        # the median over rounds of pydiff / floor, each round's pair timed together
                        x_floor=statistics.median(q / f for q, f in zip(times["pydiff"], times["floor"])),
                        selected_fraction=selected,
                    )
                    if torch is not None:
                        ratios = [d / q for d, q in zip(times["diffusers"], times["pydiff"])]
                        row["diffusers_ms"] = statistics.median(times["diffusers"]) * 1e3
                        row["speedup_vs_diffusers"] = statistics.median(ratios)
                        row["speedup_range"] = [min(ratios), max(ratios)]
                    if not args.no_reference and nt == args.threads[0]:
                        ref = lambda: reference.fused_step(
                            x,
                            both,
                            fields,
                            guided=True,
                            guidance_scale=GUIDANCE,  # noqa: E731
                            x0_prev=prev if sampler == "dpmpp_2m" else None,
                        )
                        row["numpy_ms"] = median_time(ref, max(3, args.repeat // 10), warmup=1) * 1e3
                    rows.append(row)
                    print(_fmt(row), flush=True)
        ops.set_num_threads(0)
    if args.json:
        meta = dict(
            machine=platform.processor() or platform.machine(),
            python=platform.python_version(),
            pydiff=pydiff.__version__,
            guidance=GUIDANCE,
            steps=STEPS,
            step_index=STEP_INDEX,
            repeat=args.repeat,
            rounds=args.rounds,
            floor="torch copy_ at the row's threads, in the step's rounds"
            if torch is not None
            else "numpy copyto, 1 thread, in the step's rounds",
            diffusers=getattr(diffusers, "__version__", None),
            torch=getattr(torch, "__version__", None),
        )
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return rows


def markdown_table(path) -> str:
    """The README's table: one line per shape, sampler and thresholding; 1 and 2 threads side by side."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["sampler"], r["thresholding"]), {})[r["threads"]] = r
    out = [
        "| shape | sampler | thresholding | pydiff 1 thr | pydiff 2 thr | diffusers 2 thr | speed-up (2 thr) "
        "| floor (2 thr) | pydiff / floor (2 thr) | NumPy reference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (shape, sampler, thr), t in by.items():
        one, two = t.get(1, {}), t.get(2, {})
        sel = f" ({one['selected_fraction']:.0%} selected)" if thr == "dynamic" and one else ""
        out.append(
            f"| {shape} | {sampler} | {thr}{sel} | {one.get('pydiff_ms', float('nan')):.3f} ms "
            f"| {two.get('pydiff_ms', float('nan')):.3f} ms | {two.get('diffusers_ms', float('nan')):.3f} ms "
            f"| {_speedup(two)} | {two.get('floor_ms', float('nan')):.3f} ms "
            f"| {two.get('x_floor', float('nan')):.2f}x | {one.get('numpy_ms', float('nan')):.2f} ms |"
        )
    return "\n".join(out)


def _speedup(r) -> str:
    if "speedup_vs_diffusers" not in r:
        return "n/a"
    lo, hi = r.get("speedup_range", [r["speedup_vs_diffusers"]] * 2)
    return f"{r['speedup_vs_diffusers']:.1f}x ({lo:.1f}-{hi:.1f})"


def _fmt(r):
    s = f"{r['shape']:>13} {r['sampler']:>8} thr={r['thresholding']:<7} th={r['threads']}  pydiff {r['pydiff_ms']:7.3f} ms"
    if r["thresholding"] == "dynamic":
        s += f" (selected {r['selected_fraction']:.0%})"
    s += f"  floor {r['floor_ms']:6.3f} ms ({r['x_floor']:.2f}x)"
    if "diffusers_ms" in r:
        s += f"  diffusers {r['diffusers_ms']:7.3f} ms ({r['speedup_vs_diffusers']:5.1f}x faster)"
    if "numpy_ms" in r:
        s += f"  numpy-ref {r['numpy_ms']:8.2f} ms"
    return s


if __name__ == "__main__":
    main()
