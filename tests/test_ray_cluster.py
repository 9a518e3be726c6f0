"""`pydiff serve --ray` on a real two-node Ray cluster (head + a second node, one machine), inside a
network namespace of the test's own with only loopback up, Ray's token authentication on.

One `unshare -n` subprocess (this file run as a script) starts the two nodes, deploys the Serve
application, runs the load and writes a JSON report; the tests assert on it:

- fault: 200 requests from 16 clients while one engine replica is SIGKILLed half-way: every
  request answered 200, each image equal (PNG bytes) to a solo run of the same request (seedless
  requests: of the seed the ingress gave them), the retries counted, the replica replaced;
- autoscale: a step in load takes the engine deployment from 1 replica to 2 and back to 1;
- the same HTTP API through the ingress: /v1/models, a 400 naming the field, 401 without the
  key, a streamed request's progress events;
- `pydiff serve --ray` itself (stopped by SIGTERM) and a Serve config file (`serve run`).

Every process the run starts lives in the namespace; at the end they are ended by PID (every
process whose network namespace is this one), never by `ray stop`, which matches processes by
name on the whole machine. Skipped without `ray[serve]`, without root (unshare) or on request
(PYDIFF_SKIP_RAY=1); CI runs it in a step of its own (.ci/run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

DRIVER_TIMEOUT_S = 600  # the whole run: two nodes, two deployments, ~400 requests
LOAD_TIMEOUT_S = 240  # the fault load: every request answered within it, or the test fails
REQUESTS, CLIENTS, STEPS = 200, 16, 8
API_KEY = "ray-test-key"
HEAD_PORT, HTTP_PORT = 6379, 8000


# ------------------------------------------------------------------ the pytest side


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("ray.serve")
    pytest.importorskip("httpx")
    if os.environ.get("PYDIFF_SKIP_RAY"):
        pytest.skip("PYDIFF_SKIP_RAY is set")
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip: the cluster runs in a network namespace of its own")
    work = tmp_path_factory.mktemp("ray")
    out = work / "report.json"
    log = work / "driver.log"
    script = f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()} --out {out}"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            ["unshare", "-n", "bash", "-c", script],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=work,  # Ray puts the driver's directory first on its workers' sys.path: not the checkout
        )
        try:
            proc.wait(timeout=DRIVER_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver's own group; it ends the cluster itself
            proc.wait(30)
    _end_namespace(out.with_suffix(".netns"))  # whatever a killed driver left behind
    tail = log.read_text(errors="replace")[-6000:]
    if not out.exists():
        pytest.fail(f"the cluster driver wrote no report (exit {proc.returncode}):\n{tail}")
    rep = json.loads(out.read_text())
    rep["log_tail"] = tail
    return rep


def _end_namespace(netns_file: Path) -> None:
    """SIGKILL every process left in the driver's namespace (all of them the driver's)."""
    if not netns_file.exists():
        return
    ns = netns_file.read_text().strip()
    for pid in _pids_in_netns(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _pids_in_netns(ns: str, exclude=()) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") == ns:
                pids.append(int(entry))
        except OSError:
            pass
    return pids


def test_cluster_is_two_nodes_on_loopback_with_token_auth(report):
    assert report.get("error") is None, report["log_tail"]
    c = report["cluster"]
    assert c["interfaces"] == ["lo"]
    assert len(c["nodes"]) == 2 and all(ip == "127.0.0.1" for ip in c["nodes"]), c
    assert c["auth_mode"] == "token"
    assert c["wrong_token_refused"], c
    assert c["listening_off_loopback"] == [], c


def test_ingress_has_pydiff_serve_api(report):
    assert report.get("error") is None, report["log_tail"]
    api = report["api"]
    assert api["models"] == ["digits"]
    assert api["readyz"] == 200
    assert api["no_key"] == 401
    assert api["bad_steps"] == [400, "steps"]
    assert api["openai_digits"] == [400, "model"]  # digits is class-conditional: the OpenAI route says so
    assert api["stream_steps"] == STEPS and api["stream_done"]
    assert api["stream_equals_plain"]


def test_no_request_lost_when_a_replica_is_killed(report):
    assert report.get("error") is None, report["log_tail"]
    f = report["fault"]
    assert f["answered"] == REQUESTS, f["statuses"]
    assert f["statuses"] == {"200": REQUESTS}
    assert f["load_s"] < LOAD_TIMEOUT_S
    assert f["killed_pid"] > 0 and f["killed_at_done"] >= REQUESTS // 4
    assert f["clients_busy_at_kill"] > 0
    assert f["retries"] >= 1, f  # the killed replica's requests in flight were sent again
    assert f["mismatched"] == [], f["mismatched"][:5]
    assert f["compared"] == REQUESTS
    assert f["seedless_got_seed"]
    assert f["replaced_s"] is not None  # Serve started a new replica in its place


def test_pydiff_serve_ray_command_serves_and_stops_on_sigterm(report):
    assert report.get("error") is None, report["log_tail"]
    cli = report["cli"]
    assert "error" not in cli, cli["error"]
    assert cli["status"] == 200, cli["output_tail"]
    assert cli["same_images"]  # a fresh deployment, the same request: the same image
    assert cli["exit"] == 0, cli["output_tail"]


def test_a_serve_config_file_deploys_pydiff(report):
    assert report.get("error") is None, report["log_tail"]
    cfg = report["config_file"]
    assert "error" not in cfg, cfg["error"]
    assert cfg["status"] == 200 and cfg["same_images"], cfg["output_tail"]
    assert cfg["over_limit"] == [400, "num_images"]  # the file's max_images: 1 reached the replicas


def test_autoscaler_scales_up_and_down_with_a_step_in_load(report):
    assert report.get("error") is None, report["log_tail"]
    a = report["autoscale"]
    assert "error" not in a, a["error"]
    assert a["before"] == 1
    assert a["peak"] == 2, a["timeline"][-20:]
    assert a["after"] == 1, a["timeline"][-20:]
    assert a["statuses"] == {"200": a["requests"]}
    assert a["up_s"] is not None and a["down_s"] is not None


# ------------------------------------------------------------------ the driver (inside the namespace)


def _interfaces() -> list[str]:
    """This network namespace's interfaces (/proc/self/net/dev: /sys/class/net is sysfs's namespace)."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":")[0].strip() for line in lines)


def _run(cmd, env, timeout):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
    return r


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
WILDCARD = {"00000000", "00000000000000000000000000000000"}  # every interface: here, only lo


def _listening_off_loopback() -> list[str]:
    """Listening TCP sockets of this namespace bound to an address other than loopback's."""
    off = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(path).read_text().splitlines()[1:]:
            fields = line.split()
            addr, state = fields[1].split(":")[0], fields[3]
            if state == "0A" and addr not in LOOPBACK | WILDCARD:
                off.append(fields[1])
    return off


def _replicas(app: str, deployment: str) -> int:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None or deployment not in st.deployments:
        return 0
    return int(st.deployments[deployment].replica_states.get("RUNNING", 0))


def _engine_actors():
    import ray

    out = []
    for a in ray._private.state.actors().values():  # the GCS actor table (pid, node): no dashboard needed
        if a["State"] == "ALIVE" and a["ActorClassName"].endswith(":PydiffEngine"):
            out.append({"pid": a["Pid"], "node": a["Address"]["NodeID"]})
    return out


def _post(client, path, body, headers=None, timeout=120.0):
    h = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
    return client.post(f"http://127.0.0.1:{HTTP_PORT}{path}", json=body, headers=h, timeout=timeout)


def _load(bodies, clients, deadline, on_done=None):
    """Send `bodies` from `clients` threads; returns [(status, json or None, seconds, t_end)]."""
    import httpx

    results = [None] * len(bodies)
    nxt = iter(range(len(bodies)))
    lock = threading.Lock()
    t0 = time.monotonic()

    def client_loop():
        with httpx.Client() as c:
            while time.monotonic() < deadline:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                start = time.monotonic()
                try:
                    r = _post(c, "/v1/generate", bodies[i], timeout=max(1.0, deadline - start))
                    res = (r.status_code, r.json() if r.status_code == 200 else r.text[:300])
                except Exception as e:  # noqa: BLE001 - a lost request is what the test counts
                    res = (f"{type(e).__name__}", None)
                end = time.monotonic()
                results[i] = (res[0], res[1], end - start, end - t0)
                if on_done is not None:
                    on_done()

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5)
    return results


def _statuses(results) -> dict:
    out = {}
    for r in results:
        key = "unanswered" if r is None else str(r[0])
        out[key] = out.get(key, 0) + 1
    return out


def driver(out: Path) -> None:
    ns = os.readlink("/proc/self/ns/net")
    out.with_suffix(".netns").write_text(ns)
    report: dict = {"error": None}
    tmp = Path(tempfile.mkdtemp(prefix="pdray"))  # short: Ray's socket paths have a length limit
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",
        PYTHONUNBUFFERED="1",
    )
    os.environ.update(env)
    try:
        report["cluster"] = cluster = {
            "interfaces": _interfaces(),
            "auth_mode": "token",
        }
        assert cluster["interfaces"] == ["lo"], cluster
        t = time.monotonic()
        _run(
            ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(HEAD_PORT),
             "--num-cpus", "1", "--resources", '{"pydiff_head": 1}', "--include-dashboard", "false",
             "--temp-dir", str(tmp), "--disable-usage-stats"],
            env, 180,
        )  # fmt: skip
        _run(
            ["ray", "start", "--address", f"127.0.0.1:{HEAD_PORT}", "--node-ip-address", "127.0.0.1",
             "--num-cpus", "1", "--resources", '{"pydiff_node2": 1}', "--disable-usage-stats"],
            env, 180,
        )  # fmt: skip
        cluster["start_s"] = round(time.monotonic() - t, 1)
        bad = dict(env, RAY_AUTH_TOKEN=secrets.token_hex(32))
        r = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{HEAD_PORT}'); print('CONNECTED')"],
            env=bad, capture_output=True, text=True, timeout=120, cwd=tmp,
        )  # fmt: skip
        cluster["wrong_token_refused"] = r.returncode != 0 and "CONNECTED" not in r.stdout

        import httpx
        import ray
        from ray import serve

        from pydiff.serving.ray_serve import ENGINE, build_app, deploy

        ray.init(address=f"127.0.0.1:{HEAD_PORT}", log_to_driver=False, _node_ip_address="127.0.0.1")
        cluster["nodes"] = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
        node2 = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "pydiff_node2" in n["Resources"]][0]

        # ---- the fault run: two engine replicas, one per node (each reserves the node's one CPU)
        t = time.monotonic()
        app = build_app(
            ["digits"], num_replicas=2, threads=1, api_key=API_KEY, backoff_s=0.25, health_check_period_s=2.0
        )
        deploy(app, host="127.0.0.1", port=HTTP_PORT)
        report["deploy_s"] = round(time.monotonic() - t, 1)
        cluster["listening_off_loopback"] = _listening_off_loopback()
        client = httpx.Client()
        base = f"http://127.0.0.1:{HTTP_PORT}"
        auth = {"Authorization": f"Bearer {API_KEY}"}
        api = report["api"] = {}
        api["readyz"] = client.get(f"{base}/readyz", timeout=30).status_code
        api["models"] = [
            m["id"] for m in client.get(f"{base}/v1/models", headers=auth, timeout=30).json()["data"]
        ]
        api["no_key"] = client.post(f"{base}/v1/generate", json={"class_label": 1}, timeout=30).status_code
        r = _post(client, "/v1/generate", {"class_label": 1, "steps": -1})
        api["bad_steps"] = [r.status_code, r.json()["error"]["param"]]
        r = _post(client, "/v1/images/generations", {"model": "digits", "prompt": "a three"})
        api["openai_digits"] = [r.status_code, r.json()["error"]["param"]]
        body = {"class_label": 7, "steps": STEPS, "seed": 5}
        events = []
        with client.stream(
            "POST", f"{base}/v1/generate?stream=true", json=body, headers=auth, timeout=60
        ) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        api["stream_steps"] = sum(e.get("event") == "step" for e in events)
        api["stream_done"] = events[-1].get("event") == "done"
        plain = _post(client, "/v1/generate", body).json()
        reference = plain["images"][0]["b64_json"]  # the command's run below must make the same image
        api["stream_equals_plain"] = (
            api["stream_done"] and events[-1]["images"][0]["b64_json"] == plain["images"][0]["b64_json"]
        )

        def metric_retries() -> float:
            text = client.get(f"{base}/metrics", headers=auth, timeout=30).text
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("pydiff_ray_retries_total")
            )

        bodies = []
        for i in range(REQUESTS):
            b = {"class_label": i % 10, "steps": STEPS, "num_images": 2 if i % 5 == 0 else 1}
            if i % 4 != 3:
                b["seed"] = 1000 + i % 50
            bodies.append(b)
        fault = report["fault"] = {"killed_pid": 0, "killed_at_done": 0, "clients_busy_at_kill": 0}
        done = [0]
        lock = threading.Lock()
        kill_evt = threading.Event()

        def on_done():
            with lock:
                done[0] += 1
                if done[0] == REQUESTS // 2:
                    kill_evt.set()

        retries0 = metric_retries()
        t0 = time.monotonic()
        loader = concurrent.futures.ThreadPoolExecutor(1).submit(
            _load, bodies, CLIENTS, t0 + LOAD_TIMEOUT_S, on_done
        )
        kill_evt.wait(LOAD_TIMEOUT_S)
        victims = [a for a in _engine_actors() if a["node"] == node2]
        if victims:
            pid = victims[0]["pid"]
            assert os.readlink(f"/proc/{pid}/ns/net") == ns  # ours: started in this namespace
            fault["clients_busy_at_kill"] = min(CLIENTS, REQUESTS - done[0])
            os.kill(pid, signal.SIGKILL)
            t_kill = time.monotonic()
            fault.update(killed_pid=pid, killed_at_done=done[0], killed_at_s=round(t_kill - t0, 2))
        results = loader.result(LOAD_TIMEOUT_S + 30)
        fault["load_s"] = round(time.monotonic() - t0, 2)
        fault["answered"] = sum(1 for r in results if r is not None and r[0] == 200)
        fault["statuses"] = _statuses(results)
        fault["retries"] = metric_retries() - retries0
        ok = [r for r in results if r is not None and r[0] == 200]
        lat = sorted(r[2] for r in ok)
        if lat:
            fault["p50_s"], fault["p99_s"] = (
                round(lat[len(lat) // 2], 3),
                round(lat[int(0.99 * (len(lat) - 1))], 3),
            )
        if fault["killed_pid"]:
            after = [r[2] for r in ok if r[3] > t_kill - t0]
            fault["max_latency_after_kill_s"] = round(max(after), 3) if after else None
            stop = time.monotonic() + 120
            fault["replaced_s"] = None
            while time.monotonic() < stop:
                alive = _engine_actors()
                if (
                    len(alive) == 2
                    and all(a["pid"] != fault["killed_pid"] for a in alive)
                    and _replicas("pydiff", ENGINE) == 2
                ):
                    fault["replaced_s"] = round(time.monotonic() - t_kill, 2)
                    break
                time.sleep(0.5)
        # solo runs: each request alone on the idle cluster, seedless ones with the seed they were given
        fault["seedless_got_seed"] = all(
            isinstance(r[1].get("seed"), int)
            for b, r in zip(bodies, results)
            if r is not None and r[0] == 200
        )
        solo: dict[str, dict] = {}
        mismatched, compared = [], 0
        for b, r in zip(bodies, results):
            if r is None or r[0] != 200:
                continue
            key_body = {**b, "seed": r[1]["seed"]}
            key = json.dumps(key_body, sort_keys=True)
            if key not in solo:
                solo[key] = _post(client, "/v1/generate", key_body).json()
            want = [im["b64_json"] for im in solo[key]["images"]]
            got = [im["b64_json"] for im in r[1]["images"]]
            compared += 1
            if want != got:
                mismatched.append(key)
        fault.update(mismatched=mismatched, compared=compared, solo_requests=len(solo))
        serve.delete("pydiff")

        # ---- autoscaling: 1 replica idle, a step to 16 clients, then idle again
        auto = report["autoscale"] = {"timeline": []}
        with _phase(report, "autoscale"):
            app = build_app(
                ["digits"],
                autoscaling={
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 2,
                    "upscale_delay_s": 2.0,
                    "downscale_delay_s": 6.0,
                    "metrics_interval_s": 0.5,
                    "look_back_period_s": 2.0,
                },
                threads=1,
                api_key=API_KEY,
            )
            deploy(app, host="127.0.0.1", port=HTTP_PORT)
            t0 = time.monotonic()
            sampling = threading.Event()

            def sample():
                while not sampling.is_set():
                    auto["timeline"].append([round(time.monotonic() - t0, 2), _replicas("pydiff", ENGINE)])
                    time.sleep(0.5)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            time.sleep(3.0)
            auto["before"] = _replicas("pydiff", ENGINE)
            step_start = time.monotonic()
            n = 600  # more than the step's time lets through: the load stops at its deadline or once scaled up
            step_bodies = [{"class_label": i % 10, "steps": 20, "seed": i} for i in range(n)]
            stop_flag = {"t": step_start + 90}

            def watch():
                while time.monotonic() < stop_flag["t"]:
                    if _replicas("pydiff", ENGINE) >= 2:
                        auto["up_s"] = round(time.monotonic() - step_start, 2)
                        stop_flag["t"] = min(stop_flag["t"], time.monotonic() + 10)  # 10 s on two replicas
                        return
                    time.sleep(0.5)

            auto["up_s"] = None
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            results = _load_until(step_bodies, CLIENTS, stop_flag)
            step_end = time.monotonic()
            auto["requests"] = sum(r is not None for r in results)
            auto["statuses"] = _statuses([r for r in results if r is not None])
            auto["peak"] = max(c for _, c in auto["timeline"]) if auto["timeline"] else 0
            auto["down_s"] = None
            stop = time.monotonic() + 120
            while time.monotonic() < stop:
                if _replicas("pydiff", ENGINE) == 1 and len(_engine_actors()) == 1:
                    auto["down_s"] = round(time.monotonic() - step_end, 2)
                    break
                time.sleep(0.5)
            auto["after"] = _replicas("pydiff", ENGINE)
            sampling.set()
            sampler.join(5)
            serve.shutdown()

        # ---- the command: pydiff serve --ray on this cluster, one request, SIGTERM
        report["cli"] = cli = {}
        with _phase(report, "cli"):
            serve.shutdown()  # the command starts Serve afresh, its proxy on its own port
            port = HTTP_PORT + 1
            cmd = [
                shutil.which("pydiff") or "pydiff",
                "serve",
                "--ray",
                "--ray-address",
                f"127.0.0.1:{HEAD_PORT}",
            ]
            cmd += ["--model", "digits", "--port", str(port), "--api-key", API_KEY, "--max-replicas", "2"]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                stop = time.monotonic() + 180
                while time.monotonic() < stop and proc.poll() is None:
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(1.0)
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/generate",
                    json=body,
                    headers={"Authorization": f"Bearer {API_KEY}"},
                    timeout=60,
                )
                cli["status"] = r.status_code
                cli["same_images"] = r.status_code == 200 and r.json()["images"][0]["b64_json"] == reference
                proc.send_signal(signal.SIGTERM)
                cli["exit"] = proc.wait(60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                cli["output_tail"] = (proc.stdout.read() if proc.stdout else "")[-1500:]

        # ---- a Serve config file: serve run with pydiff's app builder and its args
        report["config_file"] = cfg = {}
        with _phase(report, "config_file"):
            serve.shutdown()  # `serve run` starts Serve with the file's http_options
            port = HTTP_PORT + 2
            (tmp / "pydiff-serve.yaml").write_text(
                f"proxy_location: EveryNode\nhttp_options: {{host: 127.0.0.1, port: {port}}}\napplications:\n"
                "  - name: pydiff\n    route_prefix: /\n    import_path: pydiff.serving.ray_serve:app_builder\n"
                f"    args: {{models: [digits], num_replicas: 1, max_images: 1, api_key: {API_KEY}}}\n"
            )
            serve_cmd = [shutil.which("serve") or "serve", "run", str(tmp / "pydiff-serve.yaml")]
            serve_cmd += ["--address", f"127.0.0.1:{HEAD_PORT}"]
            proc = subprocess.Popen(
                serve_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            try:
                stop = time.monotonic() + 180
                while time.monotonic() < stop and proc.poll() is None:
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(1.0)
                h = {"Authorization": f"Bearer {API_KEY}"}
                r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json=body, headers=h, timeout=60)
                cfg["status"] = r.status_code
                cfg["same_images"] = r.status_code == 200 and r.json()["images"][0]["b64_json"] == reference
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/generate",
                    json={**body, "num_images": 2},
                    headers=h,
                    timeout=60,
                )
                cfg["over_limit"] = [
                    r.status_code,
                    r.json()["error"]["param"] if r.status_code != 200 else None,
                ]
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                cfg["output_tail"] = (proc.stdout.read() if proc.stdout else "")[-1500:]
    except BaseException as e:  # noqa: BLE001 - the report says what failed
        import traceback

        report["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-4000:]}"
    finally:
        out.write_text(json.dumps(report, indent=1, default=str))
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        _end_all(ns)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _phase(report: dict, name: str):
    """Run one phase of the driver; its failure goes to report[name]["error"] and the next runs."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - the report says what failed
        import traceback

        report[name]["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"


def _load_until(bodies, clients, stop_flag):
    """`_load` whose deadline `stop_flag["t"]` may move earlier while it runs."""
    import httpx

    results = [None] * len(bodies)
    nxt = iter(range(len(bodies)))
    lock = threading.Lock()

    def client_loop():
        with httpx.Client() as c:
            while time.monotonic() < stop_flag["t"]:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                t = time.monotonic()
                try:
                    r = _post(c, "/v1/generate", bodies[i], timeout=120)
                    results[i] = (r.status_code, None, time.monotonic() - t, 0)
                except Exception as e:  # noqa: BLE001
                    results[i] = (type(e).__name__, None, time.monotonic() - t, 0)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(200)
    return results


def _end_all(ns: str) -> None:
    """End every process of this namespace but this one: SIGTERM, then SIGKILL after 10 s."""
    me = {os.getpid(), os.getppid()}
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        pids = _pids_in_netns(ns, exclude=me)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        stop = time.monotonic() + wait
        while pids and time.monotonic() < stop:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
            time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="the Ray cluster run of tests/test_ray_cluster.py (in a netns)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    assert _interfaces() == ["lo"], "run inside unshare -n with only lo"
    driver(args.out)
