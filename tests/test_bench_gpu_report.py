"""The GPU benchmark's host side, on the CPU: alternating rounds and the README's tables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Clock:
    """Stands in for torch (synchronize) and time.perf_counter: each fn call costs its own time."""

    def __init__(self):
        self.now, self.log = 0.0, []
        self.cuda = type("Cuda", (), {"synchronize": staticmethod(lambda: None)})

    def fn(self, name, cost):
        def call():
            self.log.append(name)
            self.now += cost

        return call


def test_interleaved_rounds_alternate_and_time_each_contender(bench, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock.now)
    times = bench.interleaved(clock, {"a": clock.fn("a", 2e-6), "b": clock.fn("b", 5e-6)}, rounds=3)
    assert list(times) == ["a", "b"] and all(len(v) == 3 for v in times.values())
    assert times["a"] == pytest.approx([2e-6] * 3) and times["b"] == pytest.approx([5e-6] * 3)
    # a's calls, then b's, then a's again: one block per contender and round, never all of one first
    blocks = [clock.log[0]] + [n for p, n in zip(clock.log, clock.log[1:]) if n != p]
    assert blocks == ["a", "b"] * 3


def test_markdown_reads_old_and_new_results(bench, tmp_path):
    run = bench.markdown(ROOT / "benchmarks" / "results" / "gpu" / "gpu.json")  # the README's tables
    assert (
        "| 16x3x256x256 | ddpm | dynamic | 63.5 | 51.4 | 1235.4 | 19.4x (18.2-21.2 over 5 rounds) | 56.2 us, 21.9x |"
        in run
    )
    assert "| 16x3x256x256 | 16.1 | 12.8 | 3134 | 0.80 | 50.8 |" in run
    assert "| torch | 1 | 25 | 84 | 601 | 7.1x | 0 |" in run
    new = {
        "meta": {"gpu": "G", "torch": "T"},
        "per_step": [
            dict(
                shape="1x2",
                sampler="ddpm",
                thresholding="dynamic",
                pydiff_us=50.0,
                pydiff_workspace_us=40.0,
                diffusers_us=600.0,
                speedup=12.0,
                speedup_workspace=15.0,
                rounds=5,
                speedup_range=[10.5, 13.25],
                gpu_only_pydiff_us=30.0,
                agreement=1e-4,
            ),
            dict(
                shape="3x4",
                sampler="ddim",
                thresholding="off",
                pydiff_us=74.2,
                diffusers_us=589.6,
                speedup=7.9,
                gpu_only_pydiff_us=60.4,
                agreement=2.7e-4,
            ),
        ],  # an earlier run's format
        "graph": [
            dict(
                network="tensorrt",
                batch=8,
                steps=25,
                eager_steps_per_s=100.0,
                graph_steps_per_s=900.0,
                graph_speedup=9.0,
                graph_vs_eager_max_abs=0.0,
            ),
            dict(network="onnxruntime-cuda", batch=1, error="RuntimeError: capture failed"),
        ],
    }
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(new))
    md = bench.markdown(path)
    assert (
        "| 1x2 | ddpm | dynamic | 50.0 | 30.0 | 600.0 | 12.0x (10.5-13.2 over 5 rounds) | 40.0 us, 15.0x |"
        in md
    )
    assert "| tensorrt | 8 | 25 | 100 | 900 | 9.0x | 0 |" in md
    assert "| onnxruntime-cuda | 1 | failed: RuntimeError: capture failed |" in md
    assert "| 3x4 | ddim | off | 74.2 | 60.4 | 589.6 | 7.9x | not measured |" in md
    assert "fused step (us)" not in md  # no bandwidth rows in this run: no empty table
