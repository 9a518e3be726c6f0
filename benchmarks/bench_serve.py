"""Load benchmark of `pydiff serve`: images/s and p50/p99 latency against concurrency, through HTTP on
127.0.0.1, for the three policies side by side in one run (issue 19, item 4), next to the ceiling the
networks' own batch scaling allows.

    python benchmarks/bench_serve.py --concurrency 1,4,16 --requests-per-client 2 \\
        --json-out benchmarks/results/serve/serve.json --chart benchmarks/results/serve/serve.png

Every load loop is bounded (clients x requests each, and a wall-clock limit); the server binds
127.0.0.1 and runs on a thread of this process. Each request is one image of the bundled shapes
cascade at the benchmark's steps, a different prompt and seed per request.

The ceiling: for each stage network, the best rows/s over batch sizes 1..64 (guided rows count twice,
as the network sees [x; x]; a batch size's rate is from the median of `--ceiling-repeats` timed
calls, on sessions with ONNX Runtime's default spinning threads, its fastest setting for calls
alone); an image needs `steps` calls of each stage, so the cascade's ceiling is
1 / sum over stages of (network calls per image / best rows per second). It is measured before
and after the load runs, and the higher of the two is the one reported (`ceiling`), so that a
quieter moment of the machine counts against the policies, not for them.

The servers run on `pydiff.serving.load_pipeline`'s sessions, whose idle threads block;
`--spinning-too` adds a run of the step policy on sessions with ONNX Runtime's default spinning
threads ("step-spin"), for the comparison.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

import pydiff
from pydiff.files import atomic_write_bytes, write_json
from pydiff.serving import BackgroundServer, load_pipeline

PROMPTS = [
    f"a {c} {s} on a {b} background"
    for c in ("red", "green", "blue", "yellow")
    for s in ("circle", "square", "triangle")
    for b in ("white", "black", "purple")
    if c != b
]


def network_ceiling(pipe, steps: dict, batches=(1, 2, 4, 8, 16, 32, 64), repeats: int = 5) -> dict:
    """Best rows/s of each stage network at any batch size, and the cascade's images/s from them."""
    rng = np.random.default_rng(0)
    enc = pipe.backend.text_encoder
    states, mask = enc.encode(["a red circle on a blue background"])
    out = {"stages": {}}
    per_image_s = 0.0
    for st in pipe.package.stages:
        model = pipe.backend.model(st.name)
        R = st.resolution
        best = 0.0
        by_batch = {}
        for b in batches:
            x = rng.standard_normal((b, st.channels, R, R)).astype(np.float32)
            cond = {
                "encoder_hidden_states": np.repeat(states, b, 0),
                "encoder_attention_mask": np.repeat(mask, b, 0),
            }
            if st.is_super_resolution:
                cond["low_res"] = rng.standard_normal((b, 3, R, R)).astype(np.float32)
                cond["noise_level"] = np.full(b, 100, np.float32)
            t = np.full(b, 500, np.float32)
            model(x, t, cond)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x, t, cond)
                times.append(time.perf_counter() - t0)
            rate = b / statistics.median(times)
            by_batch[b] = round(rate, 1)
            best = max(best, rate)
        guided = float(np.any(pipe.package.stage(st.name).recommended.get("guidance_scale", 1.0) != 1.0))
        rows_per_image = steps[st.name] * (2 if guided else 1)
        per_image_s += rows_per_image / best
        out["stages"][st.name] = {
            "rows_per_s_by_batch": by_batch,
            "best_rows_per_s": round(best, 1),
            "network_rows_per_image": rows_per_image,
        }
    out["images_per_s"] = 1.0 / per_image_s
    return out


def run_load(
    url: str, concurrency: int, per_client: int, steps: dict, limit_s: float, offset: int, seeded: bool = True
) -> dict:
    """`concurrency` clients, `per_client` sequential requests each; latencies and images/s."""
    deadline = time.monotonic() + limit_s

    def client(c: int) -> list[float]:
        lat = []
        with httpx.Client(timeout=limit_s) as http:
            for k in range(per_client):
                if time.monotonic() > deadline:
                    break
                n = offset + c * per_client + k
                body = {"model": "shapes", "prompt": PROMPTS[n % len(PROMPTS)], "n": 1, "steps": steps}
                if seeded:  # the batch policy batches only requests that name no seed
                    body["seed"] = n
                t0 = time.perf_counter()
                r = http.post(url + "/v1/images/generations", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                lat.append(time.perf_counter() - t0)
        return lat

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
        lats = [x for part in ex.map(client, range(concurrency)) for x in part]
    wall = time.perf_counter() - t0
    lats.sort()
    return {
        "concurrency": concurrency,
        "requests": len(lats),
        "wall_s": round(wall, 3),
        "images_per_s": round(len(lats) / wall, 3),
        "p50_s": round(statistics.median(lats), 3),
        "p99_s": round(lats[min(len(lats) - 1, int(0.99 * len(lats)))], 3),
    }


def chart(rep: dict, path: str) -> None:
    """A PNG with two panels (PIL only): images/s and p99 latency against the clients, per policy."""
    from PIL import Image, ImageDraw

    W, H, pad = 900, 380, 60
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    colors = {
        "single": (220, 120, 40),
        "batch": (120, 160, 60),
        "step": (40, 110, 200),
        "step-spin": (150, 150, 220),
    }
    levels = sorted({r["concurrency"] for rows in rep["policies"].values() for r in rows})
    panels = [("images/s (higher is better)", "images_per_s"), ("p99 latency, s (lower is better)", "p99_s")]
    for k, (title, key) in enumerate(panels):
        x0, x1 = k * (W // 2) + pad, (k + 1) * (W // 2) - 20
        y0, y1 = 40, H - pad
        vals = [r[key] for rows in rep["policies"].values() for r in rows]
        if key == "images_per_s":
            vals.append(rep["ceiling"]["images_per_s"])
        top = max(vals) * 1.1 or 1.0
        d.text((x0, 12), title, fill="black")
        d.line([x0, y1, x1, y1], fill="black")
        d.line([x0, y0, x0, y1], fill="black")
        for j in range(5):
            v = top * j / 4
            y = y1 - (y1 - y0) * j / 4
            d.text((x0 - 45, y - 6), f"{v:.2f}", fill="black")

        def px(i, v):
            x = x0 + (x1 - x0) * (i + 0.5) / len(levels)
            return x, y1 - (y1 - y0) * v / top

        for i, c in enumerate(levels):
            d.text((px(i, 0)[0] - 6, y1 + 8), str(c), fill="black")
        d.text(((x0 + x1) // 2 - 50, y1 + 26), "concurrent clients", fill="black")
        if key == "images_per_s":
            yc = px(0, rep["ceiling"]["images_per_s"])[1]
            d.line([x0, yc, x1, yc], fill=(150, 150, 150))
            d.text((x1 - 150, yc - 14), "networks' ceiling", fill=(110, 110, 110))
        for n, (policy, rows) in enumerate(rep["policies"].items()):
            pts = [px(levels.index(r["concurrency"]), r[key]) for r in rows]
            col = colors.get(policy, (0, 0, 0))
            d.line(pts, fill=col, width=3)
            for x, y in pts:
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col)
            d.text((x0 + 10 + 80 * n, y0 + 4), policy, fill=col)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,4,16", help="comma list of client counts")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--ceiling-repeats", type=int, default=5)
    p.add_argument("--spinning-too", action="store_true", help="also the step policy on spinning threads")
    p.add_argument("--policies", default="single,batch,step")
    p.add_argument("--base-steps", type=int, default=10)
    p.add_argument("--sr-steps", type=int, default=5)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--limit-s", type=float, default=600.0, help="wall-clock limit of each load level")
    p.add_argument("--json-out")
    p.add_argument("--chart")
    a = p.parse_args(argv)
    steps = {"base": a.base_steps, "sr64": a.sr_steps}
    levels = [int(c) for c in a.concurrency.split(",")]
    spinning = pydiff.load("shapes")  # ONNX Runtime's defaults: the ceiling's sessions
    served = load_pipeline("shapes")
    rep = {
        "steps": steps,
        "threads": os.cpu_count(),
        "pydiff": pydiff.__version__,
        "requests_per_client": a.requests_per_client,
        "max_batch": a.max_batch,
        "ceiling_before": network_ceiling(spinning, steps, repeats=a.ceiling_repeats),
        "policies": {},
    }
    print(f"ceiling before: {rep['ceiling_before']['images_per_s']:.2f} images/s", file=sys.stderr)
    offset = 0
    runs = [(p, p, served) for p in a.policies.split(",")]
    if a.spinning_too:
        runs.append(("step-spin", "step", spinning))
    for label, policy, pipe in runs:
        rows = []
        with BackgroundServer(
            {"shapes": pipe}, policy=policy, max_batch=a.max_batch, max_queue=1024, warm=False
        ) as s:
            run_load(s.url, 1, 1, steps, a.limit_s, 10**6)  # warm-up
            for c in levels:
                r = run_load(
                    s.url, c, a.requests_per_client, steps, a.limit_s, offset, seeded=policy != "batch"
                )
                offset += c * a.requests_per_client
                rows.append(r)
                print(
                    f"{label:9s} c={c:3d}: {r['images_per_s']:.2f} images/s, p50 {r['p50_s']:.2f} s, "
                    f"p99 {r['p99_s']:.2f} s",
                    file=sys.stderr,
                )
        rep["policies"][label] = rows
    rep["ceiling_after"] = network_ceiling(spinning, steps, repeats=a.ceiling_repeats)
    print(f"ceiling after: {rep['ceiling_after']['images_per_s']:.2f} images/s", file=sys.stderr)
    rep["ceiling"] = max(rep["ceiling_before"], rep["ceiling_after"], key=lambda c: c["images_per_s"])
    for label, rows in rep["policies"].items():
        for r in rows:
            r["of_ceiling"] = round(r["images_per_s"] / rep["ceiling"]["images_per_s"], 3)
    print(json.dumps(rep, indent=1))
    if a.json_out:
        write_json(rep, a.json_out)
    if a.chart:
        chart(rep, a.chart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
