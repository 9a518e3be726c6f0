"""Reliability of the native core: determinism across thread counts, concurrency, and memory under soak."""

from __future__ import annotations

import threading

import numpy as np

import pydiff
from pydiff import ops

SCHED = pydiff.Schedule(
    beta_schedule="squaredcos_cap_v2", clip_sample=False, thresholding=True, sample_max_value=1.5
)


def model(x, t, c):
    return (0.6 * x + 0.2 * np.sin(3 * x) + 0.1 * np.asarray(c, np.float32)[:, None, None, None]).astype(
        np.float32
    )


def run(sampler, threads):
    ops.set_num_threads(threads)
    try:
        x_T = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
        return pydiff.sample(
            model,
            x_T,
            schedule=SCHED,
            sampler=sampler,
            steps=6,
            seed=123,
            cond=np.ones(4),
            uncond=np.zeros(4),
            guidance_scale=4.0,
            eta=1.0 if sampler == "ddim" else 0.0,
        )
    finally:
        ops.set_num_threads(0)


def test_bit_identical_at_1_and_2_threads():
    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        assert np.array_equal(run(sampler, 1), run(sampler, 2)), sampler


def test_concurrent_native_steps_equal_sequential():
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((2, 3, 32, 32)).astype(np.float32) for _ in range(8)]
    mos = [rng.standard_normal((4, 3, 32, 32)).astype(np.float32) for _ in range(8)]
    p = ops.step_params(
        alpha=0.7,
        sigma=0.714,
        c_x=0.9,
        c_x0=0.2,
        c_noise=0.3,
        threshold_mode=2,
        dynamic_ratio=0.99,
        sample_max_value=1.5,
        seed=5,
        noise_step=2,
    )
    want = [ops.fused_step(x, m, p, guidance_scale=3.0)[0] for x, m in zip(xs, mos)]
    got = [None] * 8

    def work(k):
        for _ in range(20):
            got[k] = ops.fused_step(xs[k], mos[k], p, guidance_scale=3.0)[0]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_10000_native_steps_keep_memory_bounded():
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    mo = np.random.default_rng(3).standard_normal((4, 3, 16, 16)).astype(np.float32)
    out, x0 = np.empty_like(x), np.empty_like(x)
    smp = pydiff.make_sampler("dpmpp_2m", SCHED, 500)
    for i in range(200):  # warm up allocators
        smp.step(mo, x, i % 499, guidance_scale=2.0, seed=0, out=out)
    before = _rss_bytes()
    for i in range(10_000):
        if i % 499 == 0:
            smp.reset()
        smp.step(mo, x, i % 499, guidance_scale=2.0, seed=i, out=out)
        ops.dynamic_threshold(x, 0.99, 1.5, out=x0)
    growth = _rss_bytes() - before
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 10,000 steps"
