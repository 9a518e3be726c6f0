"""The end-to-end benchmark of a cascade (`pydiff bench`), pydiff against a diffusers-style loop.

Both sides run the same networks with the same settings, batch and starting noise, side by side
in one process, alternating repeats:

- pydiff: `Pipeline.generate` on ONNX Runtime with the fused native step;
- peer: the package's stages as PyTorch modules (rebuilt from the package's own weights,
  pydiff.tools.training.from_package; or from training runs with `--run`), eager, in the loop every diffusers pipeline runs: diffusers' scheduler (`step`, with its
  `_threshold_sample` when thresholding is dynamic), the torch CFG mix, `torch.nn.functional.
  interpolate` and `scheduler.add_noise` for the noise-conditioning augmentation.

Per step, the time spent outside the network = (time between two step ends) - (network time of
that step). Text encoding (ONNX Runtime, once per batch) is the same code on both sides.
torch is imported only here.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pydiff import __version__, ops
from pydiff.imageio import save_png, to_numpy
from pydiff.package import INPUT_SPECS
from pydiff.pipeline import Pipeline, bundled_path
from pydiff.tools.training.from_package import torch_modules
from pydiff.tools.training.trainer import load_torch_modules

PROMPTS = [
    "a red circle on a blue background",
    "a green square on a yellow background",
    "a blue triangle on a white background",
    "a yellow circle on a black background",
]


class _Timed:
    """Wraps a stage model; records (start, end) of every network call."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log
        self.stage = getattr(inner, "stage", None)

    def __call__(self, x, t, cond=None):
        t0 = time.perf_counter()
        out = self.inner(x, t, cond)
        self.log.append((t0, time.perf_counter()))
        return out


def _step_split(step_ends, calls, start):
    """Per-step (total, network) seconds from step end times and network call intervals."""
    totals, nets = [], []
    prev = start
    for end in step_ends:
        net = sum(b - a for a, b in calls if a >= prev and b <= end)
        totals.append(end - prev)
        nets.append(net)
        prev = end
    return totals, nets


def _scheduler(stage, settings):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    sc = dict(stage.scheduler)
    kw = dict(
        num_train_timesteps=int(sc.get("num_train_timesteps", 1000)),
        beta_schedule=sc.get("beta_schedule", "linear"),
        prediction_type=stage.prediction_type,
        timestep_spacing=sc.get("timestep_spacing", "leading"),
        thresholding=settings.thresholding == "dynamic",
        dynamic_thresholding_ratio=settings.dynamic_thresholding_ratio,
        sample_max_value=settings.sample_max_value,
    )
    for k in ("beta_start", "beta_end", "steps_offset"):
        if k in sc:
            kw[k] = sc[k]
    if settings.sampler == "dpmpp_2m":
        if settings.thresholding == "static":
            # DPMSolverMultistepScheduler has no clip_sample; its dynamic thresholding with
            # sample_max_value 1 clamps the per-sample scale s to [1, 1], i.e. clips x0 to [-1, 1].
            # Another range has no diffusers equivalent (s = r then rescales x0 by 1 / r).
            if settings.clip_sample_range != 1.0:
                raise ValueError(
                    f"stage {stage.name!r}: static clipping to +-{settings.clip_sample_range} "
                    f"with dpmpp_2m has no diffusers equivalent (its DPMSolverMultistep"
                    f"Scheduler clips only through thresholding, to [-1, 1]); benchmark "
                    f"another sampler or thresholding"
                )
            kw.update(thresholding=True, sample_max_value=1.0)
        return DPMSolverMultistepScheduler(**kw)
    kw["clip_sample"] = settings.thresholding == "static"
    kw["clip_sample_range"] = settings.clip_sample_range
    if settings.sampler == "ddim":
        return DDIMScheduler(**kw)
    return DDPMScheduler(**kw)


def _torch_cascade(pipe, modules, plan, record):
    """The diffusers-style loop over the cascade; returns float32 [B, H, W, C] in [0, 1]."""
    import torch
    import torch.nn.functional as F

    B = plan.batch
    rngs = pipe.generators(plan)  # the pipeline's draws: one generator per image, in stage order

    def normal(shape):
        return torch.from_numpy(
            np.concatenate([g.standard_normal((1, *shape), dtype=np.float32) for g in rngs])
        )

    states, mask = pipe.backend.text_encoder.encode(plan.prompts)
    es, em = pipe._empty()
    k = plan.num_images
    c_s = torch.from_numpy(np.repeat(states, k, 0))
    c_m = torch.from_numpy(np.repeat(mask, k, 0))
    u_s = torch.from_numpy(np.repeat(es, B, 0))
    u_m = torch.from_numpy(np.repeat(em, B, 0))
    ehs, eam = torch.cat([c_s, u_s]), torch.cat([c_m, u_m])
    x_prev = None
    with torch.inference_mode():
        for st in plan.stages:
            s = plan.settings[st.name]
            net = modules[st.name]
            sched = _scheduler(st, s)
            sched.set_timesteps(s.steps)
            R = st.resolution
            x = normal((st.channels, R, R))
            x = x * sched.init_noise_sigma
            extra = {}
            if st.is_super_resolution:
                from diffusers import DDPMScheduler

                up = F.interpolate(x_prev.clamp(-1, 1), size=(R, R), mode="bilinear", align_corners=False)
                n = normal(tuple(up.shape[1:]))
                aug = DDPMScheduler(
                    **{
                        k2: v
                        for k2, v in st.noise_aug_scheduler.items()
                        if k2 in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
                    }
                )
                lvl = torch.full((B,), s.noise_aug_level, dtype=torch.long)
                low = aug.add_noise(up, n, lvl)
            # diffusers' pipelines skip the unconditional half when guidance_scale <= 1
            # (`do_classifier_free_guidance`); the peer follows pydiff's per-stage test, any scale
            # != 1 (the same at 1, and scales below 1 are still a guidance mix here)
            cfg = s.uses_guidance
            reps = 2 if cfg else 1
            hs, hm = (ehs, eam) if cfg else (c_s, c_m)
            if st.is_super_resolution:
                extra = {
                    "low_res": torch.cat([low] * reps),
                    "noise_level": torch.full((reps * B,), float(s.noise_aug_level)),
                }
            g = torch.from_numpy(s.guidance_scale).view(B, 1, 1, 1)
            calls, ends = [], []
            start = time.perf_counter()
            for t in sched.timesteps:
                inp = torch.cat([x] * reps)
                tt = torch.full((reps * B,), float(t))
                t0 = time.perf_counter()
                out = net(
                    sample=inp, timestep=tt, encoder_hidden_states=hs, encoder_attention_mask=hm, **extra
                )
                calls.append((t0, time.perf_counter()))
                if cfg:
                    o_c, o_u = out.chunk(2)
                    out = o_u + g * (o_c - o_u)
                x = sched.step(out, t, x).prev_sample
                ends.append(time.perf_counter())
            record[st.name] = _step_split(ends, calls, start)
            x_prev = x
    return to_numpy(x_prev.clamp(-1, 1).numpy())


def check_same_networks(pipe, modules, batch=2, seed=0) -> dict[str, float]:
    """Max |ORT - torch| of one forward pass per stage on random inputs (same networks?)."""
    import torch

    rng = np.random.default_rng(seed)
    out = {}
    te = pipe.package.text_encoder
    for st in pipe.package.stages:
        feeds = {}
        for n in st.inputs:
            if n == "sample":
                feeds[n] = rng.standard_normal((batch, st.channels, st.resolution, st.resolution)).astype(
                    np.float32
                )
            elif n in ("timestep", "noise_level"):
                feeds[n] = rng.integers(0, 1000, batch).astype(np.float32)
            elif n == "encoder_hidden_states":
                feeds[n] = rng.standard_normal((batch, te.max_length, te.hidden_size or 384)).astype(
                    np.float32
                )
            elif n == "encoder_attention_mask":
                m = np.zeros((batch, te.max_length), np.float32)
                m[:, :5] = 1
                feeds[n] = m
            elif n == "class_labels":
                feeds[n] = rng.integers(0, st.num_classes, batch).astype(np.int64)
            elif n in ("low_res", "masked_image"):
                feeds[n] = rng.uniform(-1, 1, (batch, 3, st.resolution, st.resolution)).astype(np.float32)
            elif n == "mask":
                feeds[n] = (rng.uniform(0, 1, (batch, 1, st.resolution, st.resolution)) > 0.5).astype(
                    np.float32
                )
            assert n in INPUT_SPECS
        sess = pipe.backend.model(st.name).session
        a = sess.run([st.output], feeds)[0]
        with torch.inference_mode():
            b = modules[st.name](**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        out[st.name] = float(np.abs(a - b).max())
    return out


def _package_digest(path) -> str:
    """sha256 over the package's manifest and ONNX files: which networks and settings were timed."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file() and (f.name == "manifest.json" or f.suffix == ".onnx"):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def run_benchmark(
    model=None,
    runs=None,
    *,
    modules=None,
    batch=8,
    steps=None,
    guidance_scale=None,
    thresholding=None,
    repeats=3,
    warmup=1,
    seed=0,
    threads=None,
    progress=True,
) -> dict:
    """Time the cascade on pydiff and on the diffusers-style torch loop; returns a report dict."""
    import onnxruntime as ort
    import torch

    threads = threads or os.cpu_count()
    # the same thread count everywhere: torch, ONNX Runtime's intra-op pool, pydiff's kernels
    torch.set_num_threads(threads)

    ops.set_num_threads(threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    path = Path(model) if model else bundled_path("shapes")
    pipe = Pipeline(path, session_options=so)
    if pipe.package.text_encoder is None:
        raise ValueError("bench runs text-conditional cascades (the bundled shapes package)")
    if modules is None and runs:
        for name, r in runs.items():
            if not Path(r).is_dir():
                raise ValueError(f"training run {r} (stage {name!r}) is not a directory")
        missing = [s for s in pipe.package.stage_names if s not in runs]
        if missing:
            raise ValueError(
                f"no training run given for stage(s) {missing}: --run STAGE=RUN_DIR for each, or none"
            )
        modules = load_torch_modules(runs)
    elif modules is None:  # the peer's networks from the package's own weights: no training run needed
        modules = torch_modules(pipe.package)
    same = check_same_networks(pipe, modules)
    if max(same.values()) > 1e-3:
        raise ValueError(
            f"the torch modules are not the package's networks: max |ORT - torch| per stage {same}"
        )

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    kw = dict(steps=steps, guidance_scale=guidance_scale, thresholding=thresholding)
    plan = pipe.plan(prompt=prompts, seed=seed, progress=False, output_type="numpy", **kw)

    # pydiff: time the network inside the pipeline's own loop
    calls: list = []
    timed = {n: _Timed(m, calls) for n, m in pipe.backend.stage_models.items()}
    real_models = pipe.backend.stage_models
    ends: dict[str, list] = {}

    def cb(stage, i, t, x):
        ends.setdefault(stage, []).append(time.perf_counter())

    def run_pydiff():
        calls.clear()
        ends.clear()
        p = pipe.plan(prompt=prompts, seed=seed, progress=False, output_type="numpy", callback=cb, **kw)
        pipe.backend.stage_models = timed
        try:
            t0 = time.perf_counter()
            img = pipe.execute(p)
            total = time.perf_counter() - t0
        finally:
            pipe.backend.stage_models = real_models
        split = {}
        for st in plan.stages:
            e = ends[st.name]
            # step 0 starts at the stage's first network call (the first one before its end)
            first = max(a for a, b in calls if a <= e[0])
            split[st.name] = _step_split(e, calls, first)
        return img, total, split

    def run_torch():
        rec: dict = {}
        t0 = time.perf_counter()
        img = _torch_cascade(pipe, modules, plan, rec)
        return img, time.perf_counter() - t0, rec

    results = {"pydiff": [], "torch": []}
    images = {}
    n_rounds = warmup + repeats
    for r in range(n_rounds):
        for side, fn in (("pydiff", run_pydiff), ("torch", run_torch)):
            img, total, split = fn()
            if progress:
                print(f"[bench] round {r + 1}/{n_rounds} {side}: {total:.2f} s", file=sys.stderr)
            if r >= warmup:
                results[side].append((total, split))
                images[side] = img

    n_calls = sum(plan.settings[s.name].steps for s in plan.stages)
    report = {
        "pydiff_version": __version__,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "threads": threads,
        "threads_set": ["torch", "onnxruntime intra-op", "pydiff kernels"],
        "package": str(pipe.package.path),
        "package_sha256": _package_digest(pipe.package.path),
        "batch": batch,
        "repeats": repeats,
        "seed": seed,
        "stages": {n: s.as_dict() for n, s in plan.settings.items()},
        "max_abs_network_diff": same,
        "max_abs_image_diff": float(np.abs(images["pydiff"] - images["torch"]).max()),
        "sides": {},
    }
    for side, rs in results.items():
        total = statistics.median(t for t, _ in rs)
        per_stage = {}
        for st in plan.stages:
            tot = [v for _, sp in rs for v in sp[st.name][0]]
            net = [v for _, sp in rs for v in sp[st.name][1]]
            step = statistics.median(tot)
            outside = statistics.median([a - b for a, b in zip(tot, net)])
            per_stage[st.name] = {
                "step_ms": 1e3 * step,
                "network_ms": 1e3 * statistics.median(net),
                "outside_ms": 1e3 * outside,
                "outside_pct": 100 * outside / step,
            }
        report["sides"][side] = {
            "seconds_per_batch": total,
            "images_per_s": batch / total,
            "network_evals_per_s": n_calls / total,
            "stages": per_stage,
        }
    report["speedup"] = (
        report["sides"]["torch"]["seconds_per_batch"] / report["sides"]["pydiff"]["seconds_per_batch"]
    )
    return report


def format_table(rep: dict) -> str:
    lines = [
        f"batch {rep['batch']}, stages "
        + ", ".join(
            f"{n}: {s['sampler']} x{s['steps']}, guidance {s['guidance_scale']}, {s['thresholding']}"
            for n, s in rep["stages"].items()
        ),
        f"{'':10s} {'s/batch':>8s} {'img/s':>7s} {'NFE/s':>7s}  "
        + "  ".join(f"{n + ' step/net/outside ms (outside %)':>40s}" for n in rep["stages"]),
    ]
    for side in ("pydiff", "torch"):
        d = rep["sides"][side]
        cells = [
            f"{s['step_ms']:8.2f} /{s['network_ms']:8.2f} /{s['outside_ms']:7.3f} ({s['outside_pct']:5.2f}%)"
            for s in d["stages"].values()
        ]
        label = "pydiff" if side == "pydiff" else "diffusers"
        lines.append(
            f"{label:10s} {d['seconds_per_batch']:8.2f} {d['images_per_s']:7.3f} "
            f"{d['network_evals_per_s']:7.2f}  " + "  ".join(f"{c:>40s}" for c in cells)
        )
    lines.append(
        f"end-to-end speedup: {rep['speedup']:.2f}x; max |pydiff - diffusers| image "
        f"difference {rep['max_abs_image_diff']:.2e}; networks agree to "
        f"{max(rep['max_abs_network_diff'].values()):.1e}"
    )
    return "\n".join(lines)


def bar_chart(rep: dict, path) -> None:
    """A PNG with two panels: seconds per batch, and per-step time outside the network."""
    from PIL import Image, ImageDraw

    W, H = 720, 360
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    colors = {"pydiff": (40, 110, 200), "torch": (220, 120, 40)}
    names = {"pydiff": "pydiff", "torch": "diffusers-style torch"}
    panels = [
        (
            "seconds per batch (lower is better)",
            {s: rep["sides"][s]["seconds_per_batch"] for s in colors},
            "{:.2f} s",
        ),
        (
            "time outside the network, % of a step",
            {s: max(v["outside_pct"] for v in rep["sides"][s]["stages"].values()) for s in colors},
            "{:.2f} %",
        ),
    ]
    for k, (title, vals, fmt) in enumerate(panels):
        x0 = 20 + k * (W // 2)
        d.text((x0, 12), title, fill="black")
        top = max(vals.values()) or 1.0
        for j, (side, v) in enumerate(vals.items()):
            h = int((H - 110) * v / top)
            bx = x0 + 40 + j * 130
            d.rectangle([bx, H - 60 - h, bx + 90, H - 60], fill=colors[side])
            d.text((bx, H - 75 - h), fmt.format(v), fill="black")
            d.text((bx, H - 50), names[side], fill="black")
    d.text((20, H - 24), f"batch {rep['batch']}, speedup {rep['speedup']:.2f}x end to end", fill="black")
    save_png(im, path)
