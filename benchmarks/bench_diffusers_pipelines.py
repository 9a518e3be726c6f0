"""diffusers' own pipelines and pydiff on the same imported folders, side by side: time per call and
the largest difference between their images (same x_T and noise).

Tiny random-weight components built from configs (pydiff.tools.export.tiny_diffusers; no hub), saved
with `save_pretrained`, imported with `pydiff import diffusers`. diffusers runs in PyTorch (eager,
float32, `torch.set_num_threads(--threads)`), pydiff on ONNX Runtime's CPU provider with the same
thread count. Each figure is the median of `--repeats` calls after one warm-up call.
`sensitivity` is how far diffusers' own images move when its x_T moves by 1e-6 (normal noise): a
random-weight network can make sampling chaotic (DDIM with clipped x0 and linear betas moves 0.87
there), and then no float32 difference between two implementations says anything; the pixel models
use the cosine schedule, where it does not.

    python benchmarks/bench_diffusers_pipelines.py --threads 2 --repeats 3 \\
        --json-out benchmarks/results/diffusers_pipelines.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import diffusers
import numpy as np
import torch

import pydiff
from pydiff import ops
from pydiff.tools.export.diffusers_pipeline import import_pipeline
from pydiff.tools.export.tiny_diffusers import sd_components, tiny_unet2d


def _median(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (ONNX Runtime's first run, torch's allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _draws(seeds, shape):
    x_T = np.concatenate(
        [
            np.random.Generator(np.random.PCG64(s)).standard_normal((1, *shape), dtype=np.float32)
            for s in seeds
        ]
    )
    return x_T, lambda i: np.concatenate([ops.randn((1, *shape), s, i) for s in seeds])


class _Feed:
    def __init__(self, x_T, noise):
        self.x_T, self.noise, self.k = x_T, noise, 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        k, self.k = self.k, self.k + 1
        return torch.from_numpy(np.ascontiguousarray(self.x_T if k == 0 else self.noise(k - 1)))


def bench_pixel(kind: str, tmp: Path, batch: int, steps: int, size: int, repeats: int) -> dict:
    unet = tiny_unet2d(sample_size=size, block_out_channels=(32, 64), norm_num_groups=32)
    cls = diffusers.DDPMPipeline if kind == "ddpm" else diffusers.DDIMPipeline
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    cls(unet=unet, scheduler=sched).save_pretrained(tmp / kind)
    import_pipeline(tmp / kind, tmp / f"{kind}_pkg")
    pipe = pydiff.load(tmp / f"{kind}_pkg")
    seeds = list(range(batch))
    t_ours, ours = _median(
        lambda: pipe.generate(
            num_inference_steps=steps, num_images=batch, generator=seeds, output_type="np", progress=False
        ),
        repeats,
    )
    ref = cls.from_pretrained(tmp / kind)
    ref.set_progress_bar_config(disable=True)
    x_T, noise = _draws(seeds, (3, size, size))
    modules = [diffusers.pipelines.ddpm.pipeline_ddpm, diffusers.schedulers.scheduling_ddpm]
    if kind == "ddim":
        modules = [diffusers.pipelines.ddim.pipeline_ddim]

    def theirs(x_T=x_T):
        feed = _Feed(x_T, noise)
        with mock.patch.object(modules[0], "randn_tensor", feed):
            if len(modules) > 1:
                with mock.patch.object(modules[1], "randn_tensor", feed):
                    return ref(batch_size=batch, num_inference_steps=steps, output_type="np").images
            return ref(batch_size=batch, num_inference_steps=steps, output_type="np").images

    with torch.no_grad():
        t_theirs, out = _median(theirs, repeats)
        moved = theirs(
            x_T + np.float32(1e-6) * np.random.default_rng(1).standard_normal(x_T.shape, np.float32)
        )
    return {
        "pipeline": cls.__name__,
        "shape": [batch, 3, size, size],
        "steps": steps,
        "diffusers_s": round(t_theirs, 4),
        "pydiff_s": round(t_ours, 4),
        "speedup": round(t_theirs / t_ours, 2),
        "max_abs_diff": float(np.abs(ours - out).max()),
        "sensitivity": float(np.abs(moved - out).max()),
    }


def bench_sd(tmp: Path, batch: int, steps: int, size: int, repeats: int) -> dict:
    ref = diffusers.StableDiffusionPipeline(**sd_components(tmp, size=size))
    ref.save_pretrained(tmp / "sd")
    import_pipeline(tmp / "sd", tmp / "sd_pkg")
    pipe = pydiff.load(tmp / "sd_pkg")
    ref.set_progress_bar_config(disable=True)
    prompts = ["a red circle on a blue background"] * batch
    seeds = list(range(batch))
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, output_type="np")
    t_ours, ours = _median(lambda: pipe.generate(prompts, generator=seeds, progress=False, **kw), repeats)
    x_T, _ = _draws(seeds, (4, size, size))
    with torch.no_grad():
        t_theirs, out = _median(lambda: ref(prompts, latents=torch.from_numpy(x_T), **kw).images, repeats)
        x_moved = x_T + np.float32(1e-6) * np.random.default_rng(1).standard_normal(x_T.shape, np.float32)
        moved = ref(prompts, latents=torch.from_numpy(x_moved), **kw).images
    return {
        "pipeline": "StableDiffusionPipeline",
        "shape": [batch, 4, size, size],
        "image": [batch, 3, 2 * size, 2 * size],
        "steps": steps,
        "guidance_scale": 7.5,
        "diffusers_s": round(t_theirs, 4),
        "pydiff_s": round(t_ours, 4),
        "speedup": round(t_theirs / t_ours, 2),
        "max_abs_diff": float(np.abs(ours - out).max()),
        "sensitivity": float(np.abs(moved - out).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--size", type=int, default=32, help="pixel models' side; SD's latents are half of it")
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ops.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for kind in ("ddpm", "ddim"):
            rows.append(bench_pixel(kind, tmp, a.batch, a.steps, a.size, a.repeats))
            print(json.dumps(rows[-1]))
        rows.append(bench_sd(tmp, a.batch, a.steps, a.size // 2, a.repeats))
        print(json.dumps(rows[-1]))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "threads": a.threads,
        "repeats": a.repeats,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "rows": rows,
    }
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
