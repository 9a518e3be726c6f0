"""GPU benchmarks of the CUDA twin (issue 3), side by side in one run, written as JSON.

1. bandwidth: the fused step's achieved GB/s (the bytes it must move: x, cond, uncond in, x_prev out)
   against a device-to-device copy moving as many bytes; GPU time only (20 launches captured in a
   CUDA graph, replayed between CUDA events), so launch overhead does not count.
2. per_step: one step as a user runs it eagerly (wall time of 50 launches, then one synchronisation):
   pydiff.cuda.fused_step (as a plain call, and with the caller's workspace) against diffusers'
   scheduler.step plus the usual torch CFG mix, thresholding off (DDIM) and dynamic (DDPM, Imagen's
   thresholding); the three measured in alternation over 5 rounds, the speedup the median of the
   rounds' ratios (diffusers' step varied 590-1235 us between runs on the H200).
3. graph: steps/s of the bundled shapes base network with classifier-free guidance, eager against
   CUDA-graph replay (pydiff.cuda_graph), DPM-Solver++ 25 steps at the package's settings: as a torch
   module (its EMA training weights rounded to fp16 as the package ships them; --checkpoint), and its
   ONNX file through ONNX Runtime's CUDA provider and through TensorRT where those are installed.

    python benchmarks/bench_gpu.py --json results/gpu.json [--checkpoint RUN_DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

import pydiff
from pydiff import cuda, ops

BANDWIDTH_SHAPES = [
    (4, 3, 64, 64),
    (16, 3, 64, 64),
    (4, 3, 256, 256),
    (1, 4, 128, 128),
    (16, 3, 256, 256),
    (4, 3, 1024, 1024),
]
STEP_SHAPES = [(16, 3, 64, 64), (16, 3, 256, 256), (4, 3, 1024, 1024)]
GUIDANCE = 5.0
STEPS = 50
STEP_INDEX = 20


def realistic_inputs(shape, alpha, sigma, seed=0):
    """x_t and [cond; uncond] of a good model (see bench_step.py): with guidance 5 the dynamic threshold
    falls inside (1, 1.5), so it is really selected."""
    rng = np.random.default_rng(seed)
    x0 = 0.4 * rng.standard_normal(shape, dtype=np.float32)
    eps = rng.standard_normal(shape, dtype=np.float32)
    x = (alpha * x0 + sigma * eps).astype(np.float32)
    both = np.concatenate(
        [
            eps + 0.02 * rng.standard_normal(shape, dtype=np.float32),
            eps + 0.02 * rng.standard_normal(shape, dtype=np.float32),
        ]
    )
    return x, both.astype(np.float32)


def gpu_time(torch, fn, launches=20, replays=10) -> float:
    """Seconds per call of fn on the GPU alone: `launches` calls captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(launches):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / launches)
    return statistics.median(times)


def wall_time(torch, fn, calls=50, repeats=7) -> float:
    """Seconds per call as a user sees it: `calls` eager calls, then one synchronisation (median)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def schedule(thresholding: bool) -> pydiff.Schedule:
    return pydiff.Schedule(
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        thresholding=thresholding,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.5,
    )


def bench_bandwidth(torch, shapes):
    rows = []
    smp = pydiff.make_sampler("ddim", schedule(False), STEPS)
    fields = smp.params(STEP_INDEX, seed=1)
    p = ops.step_params(**fields)
    for shape in shapes:
        n = int(np.prod(shape))
        x, both = (
            torch.from_numpy(a).cuda() for a in realistic_inputs(shape, fields["alpha"], fields["sigma"])
        )
        out = torch.empty_like(x)
        step_bytes = 4 * n * 4  # x, cond, uncond in; x_prev out
        t_step = gpu_time(
            torch,
            lambda: cuda.fused_step(
                x, both, p, out=out, guidance_scale=GUIDANCE, stream=torch.cuda.current_stream().cuda_stream
            ),
        )
        src = torch.ones(
            step_bytes // 8, device="cuda"
        )  # a copy moves 2x its size: as many bytes as the step
        dst = torch.empty_like(src)
        t_copy = gpu_time(torch, lambda: dst.copy_(src))
        dyn = ops.step_params(**pydiff.make_sampler("ddpm", schedule(True), STEPS).params(STEP_INDEX, seed=1))
        ws = torch.empty(cuda.workspace_bytes(shape[0], n // shape[0]), dtype=torch.uint8, device="cuda")
        t_dyn = gpu_time(
            torch,
            lambda: cuda.fused_step(
                x,
                both,
                dyn,
                out=out,
                guidance_scale=GUIDANCE,
                workspace=ws,
                stream=torch.cuda.current_stream().cuda_stream,
            ),
        )
        row = dict(
            shape="x".join(map(str, shape)),
            step_us=t_step * 1e6,
            copy_us=t_copy * 1e6,
            step_GBps=step_bytes / t_step / 1e9,
            copy_GBps=step_bytes / t_copy / 1e9,
            fraction_of_copy=t_copy / t_step,
            dynamic_step_us=t_dyn * 1e6,
        )
        rows.append(row)
        print("bandwidth", json.dumps(row), flush=True)
        del x, both, out, src, dst
    return rows


def diffusers_step(torch, diffusers, sampler, thresholding, x, both, t):
    cfg = dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        thresholding=thresholding,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.5,
        clip_sample=False,
    )
    s = (diffusers.DDPMScheduler if sampler == "ddpm" else diffusers.DDIMScheduler)(**cfg)
    s.set_timesteps(STEPS)

    def step():
        c, u = both.chunk(2)
        eps = u + GUIDANCE * (c - u)  # the usual torch CFG mix
        return s.step(eps, t, x).prev_sample

    return step


def interleaved(torch, fns: dict, rounds=5) -> dict:
    """Wall seconds per call of each fn, measured in alternation round after round, so that a slow
    moment of the shared machine hits every contender: name -> per-round list."""
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(wall_time(torch, fn, repeats=3))
    return out


def bench_per_step(torch, shapes, rounds=5):
    try:
        import diffusers
    except ImportError as e:
        print(f"per_step: diffusers is not installed ({e}); skipped", flush=True)
        return []
    rows = []
    for shape in shapes:
        for sampler, thr in (("ddim", False), ("ddpm", True)):
            smp = pydiff.make_sampler(sampler, schedule(thr), STEPS)
            fields = smp.params(STEP_INDEX, seed=1)
            p = ops.step_params(**fields)
            x, both = (
                torch.from_numpy(a).cuda() for a in realistic_inputs(shape, fields["alpha"], fields["sigma"])
            )
            out = torch.empty_like(x)
            thresholds = torch.empty(shape[0], device="cuda")
            # as a plain call allocates its scratch (stream-ordered), and with the caller's workspace
            ws = torch.empty(cuda.workspace_bytes(shape[0], x[0].numel()), dtype=torch.uint8, device="cuda")
            t = int(smp.timesteps[STEP_INDEX])
            times = interleaved(
                torch,
                {
                    "pydiff": lambda: cuda.fused_step(
                        x, both, p, out=out, guidance_scale=GUIDANCE, thresholds=thresholds
                    ),
                    "pydiff_ws": lambda: cuda.fused_step(
                        x, both, p, out=out, guidance_scale=GUIDANCE, thresholds=thresholds, workspace=ws
                    ),
                    "diffusers": diffusers_step(torch, diffusers, sampler, thr, x, both, t),
                },
                rounds,
            )
            # the two agree (DDIM exactly up to rounding; DDPM up to its noise, so compare the mean)
            ref = diffusers_step(torch, diffusers, sampler, thr, x, both, t)()
            cuda.fused_step(x, both, p, out=out, guidance_scale=GUIDANCE, thresholds=thresholds)
            torch.cuda.synchronize()
            if sampler == "ddim":
                agree = float((out - ref).abs().max())
            else:
                agree = float((out - ref).mean().abs())
            sel = float(((thresholds > 1) & (thresholds < 1.5)).float().mean()) if thr else 0.0
            med = {k: statistics.median(v) for k, v in times.items()}
            ratios = [d / o for d, o in zip(times["diffusers"], times["pydiff"])]
            ratios_ws = [d / o for d, o in zip(times["diffusers"], times["pydiff_ws"])]
            row = dict(
                shape="x".join(map(str, shape)),
                sampler=sampler,
                thresholding="dynamic" if thr else "off",
                pydiff_us=med["pydiff"] * 1e6,
                pydiff_workspace_us=med["pydiff_ws"] * 1e6,
                diffusers_us=med["diffusers"] * 1e6,
                speedup=statistics.median(ratios),
                speedup_workspace=statistics.median(ratios_ws),
                rounds=rounds,
                speedup_range=[min(ratios), max(ratios)],
                gpu_only_pydiff_us=gpu_time(
                    torch,
                    lambda: cuda.fused_step(
                        x,
                        both,
                        p,
                        out=out,
                        guidance_scale=GUIDANCE,
                        workspace=ws,
                        stream=torch.cuda.current_stream().cuda_stream,
                    ),
                )
                * 1e6,
                agreement=agree,
                selected_fraction=sel,
            )
            rows.append(row)
            print("per_step", json.dumps(row), flush=True)
            del x, both, out, ws
    return rows


def graph_row(torch, make_network, plan, shape, label, B, stream=None):
    """Steps/s of one network with the fused step: eager against CUDA-graph replay (median of 5 runs)."""
    from pydiff.cuda_graph import GraphSampler

    x_T = torch.from_numpy(ops.randn(shape, 0, 2**32 - 1)).cuda()
    res, outs = {}, {}
    for graph in (False, True):
        r = GraphSampler(make_network(), plan, shape=shape, guidance_scale=5.0, graph=graph, stream=stream)
        outs[graph] = r.run(x_T)  # warm-up (and capture)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            r.run(x_T)
            times.append(time.perf_counter() - t0)
        res[graph] = len(plan) / statistics.median(times)
    row = dict(
        network=label,
        batch=B,
        steps=len(plan),
        eager_steps_per_s=res[False],
        graph_steps_per_s=res[True],
        graph_speedup=res[True] / res[False],
        graph_vs_eager_max_abs=float((outs[True] - outs[False]).abs().max()),
    )
    print("graph", json.dumps(row), flush=True)
    return row


def float16_package(base_onnx):
    """A temporary copy of the bundled shapes package whose base network is `base_onnx` (made by
    `pydiff export float16 pydiff/bundled/shapes/base.onnx OUT`)."""
    import shutil
    import tempfile
    from pathlib import Path

    from pydiff.pipeline import bundled_path

    dst = Path(tempfile.mkdtemp()) / "shapes16"
    shutil.copytree(bundled_path("shapes"), dst)
    shutil.copy(base_onnx, dst / "base.onnx")
    return dst


def bench_graph(torch, checkpoint, batches=(1, 8), fp16_onnx=None):
    """The bundled shapes base network with the fused step: as a torch module (its training weights,
    when a checkpoint is given), through ONNX Runtime's CUDA provider (also on the float16 rewrite of
    the network, `fp16_onnx`) and through TensorRT (float32 and fp16 engines; each where installed),
    eager against CUDA-graph replay."""
    from pydiff.backends.stage_network import StageNetwork
    from pydiff.cuda_graph import StepPlan

    pipe = pydiff.load()  # the bundled shapes cascade
    stage = pipe.package.stages[0]
    smp = pydiff.make_sampler("dpmpp_2m", pipe._schedules[stage.name], 25)  # static clipping, as recommended
    plan = StepPlan.from_sampler(smp, seed=0)
    enc = pipe.backend.text_encoder
    backends = []
    if checkpoint:
        from pydiff.tools.bench import load_torch_modules

        net = load_torch_modules({stage.name: checkpoint})[stage.name].cuda().eval()
        backends.append("torch")
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        backends.append("onnxruntime-cuda")
        if fp16_onnx:
            backends.append("onnxruntime-cuda-fp16")
    else:
        print("graph: this onnxruntime has no CUDA provider; its rows are skipped", flush=True)
    try:
        import tensorrt  # noqa: F401

        backends += ["tensorrt", "tensorrt-fp16"]
    except ImportError:
        print("graph: tensorrt is not installed; its rows are skipped", flush=True)
    rows = []
    for label in backends:
        stream = torch.cuda.Stream() if label.startswith("onnxruntime-cuda") else None
        if label == "onnxruntime-cuda":
            model = pydiff.load(providers="cuda", stream=stream).backend.model(stage.name)
        elif label == "onnxruntime-cuda-fp16":
            model = pydiff.load(float16_package(fp16_onnx), providers="cuda", stream=stream).backend.model(
                stage.name
            )
        elif label.startswith("tensorrt"):
            import tempfile

            model = pydiff.load(
                backend="tensorrt", cache_dir=tempfile.mkdtemp(), providers="cpu", fp16=label.endswith("fp16")
            ).backend.model(stage.name)
        for B in batches:
            states, mask = enc.encode(["a red circle on a blue background"] * B + [""] * B)
            shape = (B, stage.channels, stage.resolution, stage.resolution)
            if label == "torch":
                st, mk = torch.from_numpy(states).cuda(), torch.from_numpy(mask).cuda()

                def make_network():
                    def network(x, t):
                        with torch.inference_mode():
                            return net(
                                sample=x, timestep=t, encoder_hidden_states=st, encoder_attention_mask=mk
                            )

                    return network
            else:
                cond = {"encoder_hidden_states": states, "encoder_attention_mask": mask}

                def make_network():
                    return StageNetwork(model, cond)

            try:
                rows.append(graph_row(torch, make_network, plan, shape, label, B, stream=stream))
            except Exception as e:  # keep the other networks' rows
                print(f"graph: {label} batch {B} failed: {type(e).__name__}: {e}", flush=True)
                rows.append(dict(network=label, batch=B, error=f"{type(e).__name__}: {e}"))
    return rows


def profile_dynamic(torch, shape=(16, 3, 256, 256)):
    """Per-kernel GPU time of the dynamic-thresholding step (torch.profiler sees every kernel)."""
    smp = pydiff.make_sampler("ddpm", schedule(True), STEPS)
    fields = smp.params(STEP_INDEX, seed=1)
    p = ops.step_params(**fields)
    x, both = (torch.from_numpy(a).cuda() for a in realistic_inputs(shape, fields["alpha"], fields["sigma"]))
    out = torch.empty_like(x)
    ws = torch.empty(
        cuda.workspace_bytes(shape[0], int(np.prod(shape[1:]))), dtype=torch.uint8, device="cuda"
    )
    for _ in range(5):
        cuda.fused_step(x, both, p, out=out, guidance_scale=GUIDANCE, workspace=ws)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            cuda.fused_step(x, both, p, out=out, guidance_scale=GUIDANCE, workspace=ws)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    print(table, flush=True)
    return table


def markdown(path) -> str:
    """Markdown tables of a --json run (the README's); a section the run left out (--only) has none."""
    r = json.load(open(path))
    out = [f"GPU: {r['meta']['gpu']}, torch {r['meta']['torch']}"]
    if r.get("bandwidth"):
        out += [
            "",
            "| shape | fused step (us) | copy of as many bytes (us) | step GB/s | fraction of copy | "
            "dynamic-threshold step (us) |",
            "|---|---|---|---|---|---|",
        ]
    for b in r.get("bandwidth", []):
        out.append(
            f"| {b['shape']} | {b['step_us']:.1f} | {b['copy_us']:.1f} | {b['step_GBps']:.0f} | "
            f"{b['fraction_of_copy']:.2f} | {b['dynamic_step_us']:.1f} |"
        )
    if r.get("per_step"):
        out += [
            "",
            "| shape | step | thresholding | pydiff wall (us) | pydiff GPU (us) | diffusers + torch CFG (us) | "
            "speedup | with a workspace | agreement |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for p in r.get("per_step", []):
        ws = (
            f"{p['pydiff_workspace_us']:.1f} us, {p['speedup_workspace']:.1f}x"
            if "speedup_workspace" in p
            else "not measured"
        )
        spread = (
            f" ({p['speedup_range'][0]:.1f}-{p['speedup_range'][1]:.1f} over {p['rounds']} rounds)"
            if "speedup_range" in p
            else ""
        )
        out.append(
            f"| {p['shape']} | {p['sampler']} | {p['thresholding']} | {p['pydiff_us']:.1f} | "
            f"{p['gpu_only_pydiff_us']:.1f} | {p['diffusers_us']:.1f} | {p['speedup']:.1f}x{spread} | "
            f"{ws} | {p['agreement']:.1e} |"
        )
    if r.get("graph"):
        out += [
            "",
            "| network | batch (x2 with CFG) | steps | eager steps/s | CUDA-graph steps/s | speedup | "
            "max abs(graph - eager) |",
            "|---|---|---|---|---|---|---|",
        ]
    for g in r.get("graph", []):
        net = g.get("network", "torch")
        if "error" in g:
            out.append(f"| {net} | {g['batch']} | failed: {g['error']} | | | | |")
            continue
        out.append(
            f"| {net} | {g['batch']} | {g['steps']} | {g['eager_steps_per_s']:.0f} | "
            f"{g['graph_steps_per_s']:.0f} | {g['graph_speedup']:.1f}x | {g['graph_vs_eager_max_abs']:.1g} |"
        )
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument(
        "--markdown", metavar="JSON", help="print Markdown tables of an earlier --json run and exit"
    )
    ap.add_argument("--checkpoint", help="training run of the shapes base stage (for the graph benchmark)")
    ap.add_argument("--fp16-onnx", help="the float16 rewrite of the shapes base network (graph benchmark)")
    ap.add_argument("--only", choices=["bandwidth", "per_step", "graph", "profile"], nargs="*")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return None
    if not args.json:
        ap.error("--json is required")
    import torch

    if not cuda.available():
        sys.exit("bench_gpu: no GPU, or pydiff built without PYDIFF_CUDA=1")
    torch.backends.cudnn.benchmark = True
    results = dict(
        meta=dict(
            gpu=torch.cuda.get_device_name(),
            torch=torch.__version__,
            python=platform.python_version(),
            pydiff=pydiff.__version__,
        )
    )
    want = set(args.only or ["bandwidth", "per_step", "graph", "profile"])
    for name, fn in (
        ("bandwidth", lambda: bench_bandwidth(torch, BANDWIDTH_SHAPES)),
        ("per_step", lambda: bench_per_step(torch, STEP_SHAPES)),
        ("graph", lambda: bench_graph(torch, args.checkpoint, fp16_onnx=args.fp16_onnx)),
        ("profile", lambda: profile_dynamic(torch)),
    ):
        if name not in want:
            continue
        try:
            results[name] = fn()
        except Exception as e:  # keep the other sections' figures
            import traceback

            traceback.print_exc()
            results[name + "_error"] = f"{type(e).__name__}: {e}"
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
