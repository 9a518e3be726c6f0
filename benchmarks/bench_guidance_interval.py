"""Guidance in an interval on the bundled shapes cascade: network evaluations (NFE) and images/s per
interval of the base stage, side by side in one run (issue 21, part 2). The alignment of the same
intervals is `benchmarks/guidance_interval_sweep.sh` (pydiff eval shapes).

    python benchmarks/bench_guidance_interval.py --rounds 5 --batch 8 \\
        --json-out benchmarks/results/guidance_interval/speed.json

Each round generates one batch of `--batch` prompts per interval, the intervals in a rotated order
(round r starts at interval r), at the package's recommended settings otherwise; the rows the base
and SR networks evaluate are counted, so NFE per image is measured, not computed. The figure per
interval is the median of its rounds' images/s, and the ratio to "all" (guidance at every step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pydiff
from pydiff.tools.bench import PROMPTS

INTERVALS = {
    "all": "all",
    "edm2 (0.28, 5.42]": [0.28, 5.42],
    "(0.5, inf)": [0.5, 1e30],
    "(1.0, inf)": [1.0, 1e30],
    "(0, 5.42]": [0.0, 5.42],
    "(0, 2]": [0.0, 2.0],
}


class Counting:
    """A stage model that counts the rows it evaluates."""

    def __init__(self, inner, counts, name):
        self.inner, self.counts, self.name = inner, counts, name
        self.stage = getattr(inner, "stage", None)

    def __call__(self, x, t, cond=None):
        self.counts[self.name] = self.counts.get(self.name, 0) + x.shape[0]
        return self.inner(x, t, cond)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args(argv)
    if not 1 <= a.rounds <= 50 or not 1 <= a.batch <= 64:
        ap.error("--rounds in 1..50, --batch in 1..64")
    pipe = pydiff.load("shapes")
    counts: dict[str, int] = {}
    pipe.backend.stage_models = {n: Counting(m, counts, n) for n, m in pipe.backend.stage_models.items()}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(a.batch)]
    names = list(INTERVALS)
    rates: dict[str, list[float]] = {n: [] for n in names}
    nfe: dict[str, dict[str, float]] = {}
    pipe.generate(prompts[:2], steps={"base": 2, "sr64": 2}, seed=0, progress=False)  # warm the sessions
    for r in range(a.rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            counts.clear()
            t0 = time.perf_counter()
            pipe.generate(prompts, guidance_interval={"base": INTERVALS[name]}, seed=r, progress=False)
            rates[name].append(a.batch / (time.perf_counter() - t0))
            nfe[name] = {s: c / a.batch for s, c in counts.items()}
        print(f"round {r + 1}/{a.rounds}", flush=True)
    base_rate = statistics.median(rates["all"])
    rows = []
    for name in names:
        med = statistics.median(rates[name])
        rows.append(
            {
                "interval": name,
                "guidance_interval": INTERVALS[name],
                "nfe_per_image": nfe[name],
                "nfe_total": sum(nfe[name].values()),
                "images_per_s": round(med, 3),
                "speedup_vs_all": round(med / base_rate, 3),
                "rounds": [round(v, 3) for v in rates[name]],
            }
        )
    print(f"{'interval':<20} {'NFE/image':>10} {'images/s':>9} {'x all':>6}")
    for row in rows:
        print(
            f"{row['interval']:<20} {row['nfe_total']:>10.0f} {row['images_per_s']:>9.2f} {row['speedup_vs_all']:>6.2f}"
        )
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps({"batch": a.batch, "rounds": a.rounds, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
