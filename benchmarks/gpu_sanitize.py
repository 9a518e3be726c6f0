"""A short workload of the CUDA twin's kernels for compute-sanitizer (memcheck, racecheck, synccheck):
    compute-sanitizer --tool racecheck --error-exitcode 3 python benchmarks/gpu_sanitize.py
Every kernel family runs at least once: the fused step with each thresholding mode (the dynamic one
with a short and a long compacted list, several stats blocks per sample, the caller's workspace and
its own), 16-bit storage, the step table with its counter, the noise and the CFG mix. Inputs are
copied from the host, so torch launches no kernels of its own and the sanitizer sees pydiff's alone.
Exits 1 when a dynamic threshold differs from the CPU twin's (a race can show as a wrong answer too).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from pydiff import _C, cuda, ops


def dev(a):
    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


def params(**kw):
    base = dict(
        alpha=0.6,
        sigma=0.8,
        prediction_type=0,
        threshold_mode=2,
        clip_range=1.0,
        dynamic_ratio=0.995,
        sample_max_value=1.5,
        use_clipped_eps=0,
        c_x=0.9,
        c_x0=0.3,
        c_eps=0.2,
        c_d=0.0,
        c_noise=0.3,
        seed=77,
        noise_step=4,
    )
    base.update(kw)
    return ops.step_params(**base)


def main() -> int:
    rng = np.random.default_rng(0)
    failures = 0
    cases = [
        ((3, 5, 9), {}, 0.45),
        ((2, 3, 64, 64), {}, 0.45),
        ((2, 3, 64, 64), {"sample_max_value": 10.0}, 2.0),
        ((2, 3, 64, 64), {"threshold_mode": 1}, 1.0),
        ((1, 3, 64, 64), {"threshold_mode": 0}, 1.0),
    ]
    for shape, kw, spread in cases:
        B = shape[0]
        eps = rng.standard_normal(shape)
        x = (0.6 * spread * rng.standard_normal(shape) + 0.8 * eps).astype(np.float32)
        mo = np.concatenate([eps, eps + 0.02 * rng.standard_normal(shape)]).astype(np.float32)
        p = params(**kw)
        thr_cpu = np.empty(B, np.float32)
        ops.fused_step(x, mo, p, guidance_scale=3.0, thresholds=thr_cpu)
        out, thr = torch.empty(shape, device="cuda"), torch.empty(B, device="cuda")
        ws = torch.empty(cuda.workspace_bytes(B, int(np.prod(shape[1:]))), dtype=torch.uint8, device="cuda")
        for workspace in (None, ws):
            cuda.fused_step(
                dev(x), dev(mo), p, out=out, guidance_scale=3.0, thresholds=thr, workspace=workspace
            )
            torch.cuda.synchronize()
            got = thr.cpu().numpy()
            if kw.get("threshold_mode", 2) == 2 and not np.array_equal(got, thr_cpu):
                print(f"threshold mismatch at {shape} {kw}: {got} != {thr_cpu}")
                failures += 1
        # 16-bit storage
        for dtype in (torch.float16, torch.bfloat16):
            o16 = torch.empty(shape, device="cuda", dtype=dtype)
            cuda.fused_step(dev(x).to(dtype), dev(mo).to(dtype), p, out=o16, guidance_scale=3.0)
    # the step table and its counter
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    mo = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    table = dev(
        np.frombuffer(bytearray(_C.pack_step_params([params(noise_step=i) for i in range(3)])), np.uint8)
    )
    counter = dev(np.zeros(1, np.int32))
    out = torch.empty(x.shape, device="cuda")
    for _ in range(3):
        cuda.fused_step(
            dev(x), dev(mo), params(), out=out, guidance_scale=3.0, param_table=table, step_counter=counter
        )
    noise = torch.empty(100_003, device="cuda")
    cuda.randn(noise, seed=5, step=2, offset=17)
    torch.cuda.synchronize()
    print("sanitizer workload done" + (f", {failures} threshold mismatches" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
