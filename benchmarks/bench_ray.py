"""Benchmark of `pydiff serve --ray` (issue 20, item 4): images/s and p50/p99 latency at each
concurrency through Ray Serve with one and with two engine replicas, next to `pydiff serve` alone in
the same run; the time Ray adds per request; the memory of each replica.

    python benchmarks/bench_ray.py --concurrency 16,64 --requests-per-client 4 --steps 20 \\
        --json-out benchmarks/results/ray/ray.json --chart benchmarks/results/ray/ray.png

Everything runs inside a network namespace of its own with only loopback up (the script re-runs
itself under `unshare -n`, as root): Ray binds its ports on every interface otherwise. The cluster is
two Ray nodes on this machine (head and a second node), Ray's token authentication on. Each
configuration uses two threads in all, so that they compete for the same two cores:

- `serve`: `pydiff serve --policy step` in a process of its own (ONNX Runtime's and the fused
  step's default threads: one per core);
- `ray-1`: one engine replica with 2 threads, on the head node;
- `ray-2`: two engine replicas with 1 thread each, one per node.

Requests: one image of the bundled digits model (`--steps` DPM-Solver++ steps, guidance 3, a class
and seed per request) on POST /v1/generate, each client sending its requests one after the other;
every load is bounded by the requests and by `--limit-s`. The per-request overhead is the median,
over `--probe` sequential 2-step requests, of the client's latency minus the server's own
queued + run time (the `timings` of the answer): HTTP, parsing and, on Ray, the proxy, the ingress
and the handle call to the replica.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pydiff.files import atomic_write_bytes, write_json

HEAD_PORT = 6379
RAY_PORT, SERVE_PORT = 8000, 8100


def loopback_only() -> bool:
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return [line.split(":")[0].strip() for line in lines] == ["lo"]


def pids_in_netns(ns: str, exclude=()) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in exclude:
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == ns:
                    out.append(int(entry))
            except OSError:
                pass
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_ready(url: str, limit_s: float) -> None:
    stop = time.monotonic() + limit_s
    while time.monotonic() < stop:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {limit_s} s")


def body(n: int, steps: int) -> dict:
    return {"model": "digits", "class_label": n % 10, "steps": steps, "guidance_scale": 3.0, "seed": n}


def probe(url: str, n: int) -> dict:
    """Sequential 2-step requests: the client's latency, the server's own time, their difference."""
    lat, own = [], []
    with httpx.Client(timeout=60) as http:
        for k in range(n):
            t0 = time.perf_counter()
            r = http.post(url + "/v1/generate", json=body(10_000 + k, 2))
            dt = time.perf_counter() - t0
            r.raise_for_status()
            t = r.json()["timings"]
            lat.append(dt)
            own.append(t["queued_s"] + t["run_s"])
    over = sorted(a - b for a, b in zip(lat, own))
    return {
        "requests": n,
        "latency_p50_ms": round(1000 * statistics.median(lat), 2),
        "server_p50_ms": round(1000 * statistics.median(own), 2),
        "overhead_p50_ms": round(1000 * statistics.median(over), 2),
    }


def run_load(url: str, concurrency: int, per_client: int, steps: int, limit_s: float) -> dict:
    deadline = time.monotonic() + limit_s
    failures = []

    def client(c: int) -> list[float]:
        lat = []
        with httpx.Client(timeout=limit_s) as http:
            for k in range(per_client):
                if time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                r = http.post(url + "/v1/generate", json=body(c * per_client + k, steps))
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                lat.append(time.perf_counter() - t0)
        return lat

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
        lats = sorted(x for part in ex.map(client, range(concurrency)) for x in part)
    wall = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, e.g. {failures[0]}")
    return {
        "concurrency": concurrency,
        "requests": len(lats),
        "wall_s": round(wall, 3),
        "images_per_s": round(len(lats) / wall, 3),
        "p50_s": round(statistics.median(lats), 3),
        "p99_s": round(lats[min(len(lats) - 1, int(0.99 * len(lats)))], 3),
    }


def measure(url: str, args) -> dict:
    for k in range(4):  # warm: the first calls of each batch size allocate
        httpx.post(url + "/v1/generate", json=body(k, args.steps), timeout=60).raise_for_status()
    out = {"probe": probe(url, args.probe), "loads": []}
    for c in args.concurrency:
        out["loads"].append(run_load(url, c, args.requests_per_client, args.steps, args.limit_s))
        print(f"  c={c}: {out['loads'][-1]}", flush=True)
    return out


def inside(args) -> dict:
    """The benchmark proper, in the namespace: `pydiff serve`, then the cluster's two configurations."""
    rep = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "commit": subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "cpus": os.cpu_count(),
        "model": "digits",
        "steps": args.steps,
        "requests_per_client": args.requests_per_client,
        "configs": {},
    }
    pydiff_cmd = shutil.which("pydiff") or "pydiff"
    print("serve: pydiff serve --policy step", flush=True)
    server = subprocess.Popen(
        [pydiff_cmd, "serve", "--model", "digits", "--policy", "step", "--port", str(SERVE_PORT), "--max-queue", "512",
         "--log-level", "warning"],
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{SERVE_PORT}"
        wait_ready(url, 120)
        rep["configs"]["serve"] = {"replicas": 1, "threads": "default (2)", **measure(url, args)}
        rep["configs"]["serve"]["rss_mb"] = round(rss_mb(server.pid), 1)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    tmp = Path(tempfile.mkdtemp(prefix="pdbench"))
    env = dict(
        os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0"
    )
    os.environ.update(env)
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--resources", '{"pydiff_slot": 1}']
    subprocess.run(
        ["ray", "start", "--head", "--port", str(HEAD_PORT), "--num-cpus", "2", "--include-dashboard", "false",
         "--temp-dir", str(tmp), *common], env=env, check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    subprocess.run(
        ["ray", "start", "--address", f"127.0.0.1:{HEAD_PORT}", "--num-cpus", "1", *common],
        env=env, check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    import ray
    from ray import serve

    from pydiff.serving.ray_serve import build_app, deploy

    ray.init(address=f"127.0.0.1:{HEAD_PORT}", log_to_driver=False, _node_ip_address="127.0.0.1")
    url = f"http://127.0.0.1:{RAY_PORT}"
    for name, replicas, threads in (("ray-1", 1, 2), ("ray-2", 2, 1)):
        print(f"{name}: {replicas} replica(s) x {threads} thread(s)", flush=True)
        app = build_app(
            ["digits"],
            num_replicas=replicas,
            threads=threads,
            max_ongoing_requests=64,
            max_queue=512,
            engine_resources={"pydiff_slot": 1},  # one replica per node
        )
        deploy(app, host="127.0.0.1", port=RAY_PORT)
        wait_ready(url, 120)
        res = {"replicas": replicas, "threads": threads, **measure(url, args)}
        engines = [
            a["Pid"]
            for a in ray._private.state.actors().values()  # the GCS actor table: pid of each replica
            if a["State"] == "ALIVE" and a["ActorClassName"].endswith(":PydiffEngine")
        ]
        res["replica_rss_mb"] = [round(rss_mb(p), 1) for p in engines]
        ns = os.readlink("/proc/self/ns/net")
        res["cluster_rss_mb"] = round(sum(rss_mb(p) for p in pids_in_netns(ns, exclude={os.getpid()})), 1)
        rep["configs"][name] = res
        serve.delete("pydiff")
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    base = rep["configs"]["serve"]["probe"]["latency_p50_ms"]
    rep["ray_overhead_ms"] = {
        "latency_p50_minus_serve": round(rep["configs"]["ray-1"]["probe"]["latency_p50_ms"] - base, 2),
        "client_minus_server_time": {k: v["probe"]["overhead_p50_ms"] for k, v in rep["configs"].items()},
    }
    return rep


def chart(rep: dict, path: Path) -> None:
    """Two panels (PIL only): images/s and p99 latency per configuration, grouped by concurrency."""
    from PIL import Image, ImageDraw

    W, H, pad = 900, 380, 60
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    colors = {"serve": (220, 120, 40), "ray-1": (40, 110, 200), "ray-2": (120, 160, 60)}
    names = list(rep["configs"])
    levels = [r["concurrency"] for r in rep["configs"][names[0]]["loads"]]
    for k, (title, key) in enumerate(
        (("images/s (higher is better)", "images_per_s"), ("p99 latency, s", "p99_s"))
    ):
        x0, x1, y0, y1 = k * (W // 2) + pad, (k + 1) * (W // 2) - 20, 40, H - pad
        top = max(r[key] for c in rep["configs"].values() for r in c["loads"]) * 1.15 or 1.0
        d.text((x0, 12), title, fill="black")
        d.line([x0, y1, x1, y1], fill="black")
        d.line([x0, y0, x0, y1], fill="black")
        for j in range(5):
            y = y1 - (y1 - y0) * j / 4
            d.text((x0 - 45, y - 6), f"{top * j / 4:.2f}", fill="black")
        group = (x1 - x0) / len(levels)
        bar = group * 0.8 / len(names)
        for i, c in enumerate(levels):
            gx = x0 + group * i + group * 0.1
            d.text((gx + group * 0.3, y1 + 8), f"{c} clients", fill="black")
            for n, name in enumerate(names):
                v = rep["configs"][name]["loads"][i][key]
                bx = gx + bar * n
                d.rectangle([bx, y1 - (y1 - y0) * v / top, bx + bar - 3, y1], fill=colors[name])
        for n, name in enumerate(names):
            d.text((x0 + 10 + 70 * n, y0 + 2), name, fill=colors[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="16,64", help="comma list of client counts")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--probe", type=int, default=30, help="sequential requests for the per-request overhead")
    p.add_argument("--limit-s", type=float, default=300.0, help="wall-clock bound of each load")
    p.add_argument("--json-out", type=Path, default=Path("benchmarks/results/ray/ray.json"))
    p.add_argument("--chart", type=Path, default=Path("benchmarks/results/ray/ray.png"))
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # already in the namespace
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    if not args.inside:
        if os.geteuid() != 0 or not shutil.which("unshare"):
            sys.exit("bench_ray.py runs Ray inside `unshare -n` (loopback only): it needs root")
        inner = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--inside",
            "--concurrency",
            ",".join(map(str, args.concurrency)),
        ]
        inner += ["--requests-per-client", str(args.requests_per_client), "--steps", str(args.steps)]
        inner += ["--probe", str(args.probe), "--limit-s", str(args.limit_s)]
        inner += ["--json-out", str(args.json_out.resolve()), "--chart", str(args.chart.resolve())]
        with tempfile.TemporaryDirectory(prefix="pdbench") as cwd:
            # Ray puts the driver's directory first on its workers' sys.path: not a source checkout,
            # whose pydiff/ lacks the compiled module of a non-editable install
            proc = subprocess.Popen(
                ["unshare", "-n", "bash", "-c", f"ip link set lo up && exec {' '.join(inner)}"], cwd=cwd
            )
            return proc.wait()
    if not loopback_only():
        sys.exit("--inside: this network namespace has more than lo")
    ns = os.readlink("/proc/self/ns/net")
    try:
        rep = inside(args)
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json(rep, args.json_out)
        chart(rep, args.chart)
        print(json.dumps(rep, indent=1))
    finally:  # every process left in this namespace is this run's: end them by PID
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids_in_netns(ns, exclude={os.getpid()}):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3 if sig == signal.SIGTERM else 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
