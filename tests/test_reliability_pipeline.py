"""Soak and concurrency of pydiff.generate on one pipeline (a tiny synthetic package, ONNX Runtime)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("onnx")  # the tiny package is built with onnx.helper

from pydiff import load  # noqa: E402
from pydiff.tools.testing import make_tiny_package  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "green triangle", "yellow circle on a red background"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load(make_tiny_package(tmp_path_factory.mktemp("soak") / "text"))


def gen(pipe, k):
    return pipe.generate(PROMPTS[k % 4], seed=100 + k, num_images=2, output_type="numpy", progress=False)


def test_8_threads_many_calls_equal_sequential(pipe):
    calls = 40  # 8 threads x 5 calls
    want = [gen(pipe, k) for k in range(calls)]
    got = [None] * calls
    errors = []
    barrier = threading.Barrier(8)

    def work(w):
        try:
            barrier.wait()
            for k in range(w, calls, 8):
                got[k] = gen(pipe, k)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(calls):
        np.testing.assert_array_equal(got[k], want[k])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_200_generate_calls_keep_memory_bounded(pipe):
    for k in range(20):  # warm up ONNX Runtime's arenas and the allocators
        gen(pipe, k)
    before = _rss_bytes()
    for k in range(200):
        gen(pipe, k)
    growth = _rss_bytes() - before
    assert growth < 16 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 200 generate calls"
