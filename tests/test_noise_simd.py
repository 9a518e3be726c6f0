"""The in-kernel noise on every instruction set the CPU has (PYDIFF_SIMD_ISA), bit for bit the same.

The vector loops (AVX-512, AVX2) and the scalar loop must give the values of the stream as it was
before the vector loops existed: the hashes below were taken from that build (2026-12-03, commit
a6b68d8), and pydiff.reference.randn is the oracle for the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pydiff import ops, reference

# (seed, step, count, offset) -> the first 32 hex digits of sha256 of the float32 values
GOLDEN = {
    (0, 0, 1 << 20, 0): "d3a51ad9e83936a81ed6dffa39dd3d7f",
    (12345678901234, 7, 100003, 5): "e864d69c52904f02cba160081ad8c5d8",
    (2**64 - 1, 2**32 - 1, 65536, 2**34 - 3): "f1ab7b6fca0e1179194b5657f1d2a642",  # counter word 1 wraps
}

TESTS = Path(__file__).resolve().parent  # no pydiff/ here: subprocesses import the installed one

_PROBE = r"""
import hashlib, json, sys
import numpy as np
from pydiff import ops

cases = json.loads(sys.argv[1])
out = {}
for seed, step, count, offset in cases:
    z = ops.randn((count,), seed, step, offset=offset)
    out[f"{seed},{step},{count},{offset}"] = hashlib.sha256(z.tobytes()).hexdigest()[:32]
# a DDPM step with in-kernel noise, odd sizes so that runs start and end inside a vector
x = np.linspace(-2, 2, 3 * 1237, dtype=np.float32).reshape(3, 1237)
p = ops.step_params(alpha=0.6, sigma=0.8, c_x=0.9, c_x0=0.3, c_eps=0.2, c_noise=0.5, seed=5, noise_step=3)
res = ops.fused_step(x, x[::-1].copy(), p)
res = res[0] if isinstance(res, tuple) else res
out["step"] = hashlib.sha256(np.ascontiguousarray(res).tobytes()).hexdigest()[:32]
print(json.dumps(out))
"""


def _run(isa: str | None) -> dict:
    env = dict(os.environ)
    env.pop("PYDIFF_SIMD_ISA", None)
    if isa is not None:
        env["PYDIFF_SIMD_ISA"] = isa
    cases = [list(k) for k in GOLDEN]
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(cases)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=TESTS,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def by_isa():
    return {isa: _run(isa) for isa in (None, "scalar", "avx2", "avx512")}


def test_every_instruction_set_gives_todays_stream(by_isa):
    for isa, got in by_isa.items():
        for key, want in GOLDEN.items():
            assert got[",".join(map(str, key))] == want, (isa, key)


def test_every_instruction_set_gives_the_same_step(by_isa):
    steps = {isa: got["step"] for isa, got in by_isa.items()}
    assert len(set(steps.values())) == 1, steps


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4, 61, 64, 65, 127])
@pytest.mark.parametrize("count", [1, 3, 63, 64, 65, 255, 257, 4099])
def test_runs_of_any_alignment_match_the_oracle(count, offset):
    got = ops.randn((count,), seed=2**33 + 7, step=11, offset=offset)
    assert np.array_equal(got, reference.randn(2**33 + 7, 11, count, offset))
