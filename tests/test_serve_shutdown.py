"""Graceful shutdown of a real `pydiff serve` process: on SIGTERM the request in flight finishes,
new work gets 503, and the process exits 0. Also the command's own argument checks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from pydiff.cli import main

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_in_flight_work_and_refuses_new(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pydiff.cli",
            "serve",
            "--model",
            "digits",
            "--port",
            str(port),
            "--no-warm",
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYDIFF_API_KEY": ""},
        # not the checkout: `python -m` puts the working folder first on sys.path, and a
        # non-editable install's checkout has no compiled module
        cwd=tmp_path,
    )
    try:
        stop = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < stop, "the server did not become ready"
            time.sleep(0.1)

        started, events, done = threading.Event(), [], {}

        def long_request():  # 8 images x 120 steps: seconds of work, streamed
            body = {"class_label": list(range(8)), "steps": 120, "seed": 4}
            with httpx.stream("POST", url + "/v1/generate?stream=true", json=body, timeout=60) as r:
                done["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith(("event: step", "event: error")):
                        started.set()
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))

        t = threading.Thread(target=long_request)
        t.start()
        # a fresh install loads the package on the first request (--no-warm): give it time
        assert started.wait(90), (
            f"the long request never started: {done}, {(tmp_path / 'serve.log').read_text()[-2000:]}"
        )
        assert not any(e["event"] == "error" for e in events), events
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = httpx.post(url + "/v1/generate", json={"class_label": 1, "steps": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(url + "/readyz", timeout=10).json()["status"] == "draining"
        assert proc.poll() is None  # still draining
        t.join(60)
        assert done["status"] == 200 and events[-1]["event"] == "done"
        assert len(events[-1]["images"]) == 8
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()  # the server this test started, by its PID
            proc.wait(10)
        log.close()


def test_serve_command_checks_its_arguments(capsys):
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--timeout", "0"]) == 2
    assert main(["serve", "--max-queue", "0"]) == 2


def test_serve_refuses_to_listen_without_the_native_module(monkeypatch, capsys):
    from pydiff import ops

    monkeypatch.setattr(ops, "_C", None)
    assert main(["serve", "--model", "digits", "--port", "0"]) == 2
    assert "native module is not built" in capsys.readouterr().err
