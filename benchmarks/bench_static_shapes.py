"""The traced graph against the frozen one (pydiff.tools.export.static_shapes): nodes, Shape ops, the
CPU-side inputs a node computes (what ONNX Runtime's CUDA provider would put on the CPU behind a
Memcpy), and ONNX Runtime CPU time per call, the two graphs alternating in one run.

    python benchmarks/bench_static_shapes.py [--out benchmarks/results/static_shapes.json]

The networks are the bundled presets with random weights (timing does not depend on the values),
exported twice by export_stage_onnx: static_shapes=False and True.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

PRESET_RES = {"digits": 8, "shapes-base": 16, "shapes-sr64": 64}


def graph_figures(path: str) -> dict:
    """Counts in the file and after ONNX Runtime's basic (provider-independent) optimisations,
    which run before it assigns nodes to providers."""
    import onnx
    import onnxruntime as ort

    from pydiff.tools.export.static_shapes import computed_cpu_side_inputs, count_shape_ops

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = str(Path(d) / "basic.onnx")
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        basic = onnx.load(so.optimized_model_filepath)
    m = onnx.load(path)
    return {
        "nodes": len(m.graph.node),
        "shape_ops": count_shape_ops(m),
        "nodes_after_basic": len(basic.graph.node),
        "shape_ops_after_basic": count_shape_ops(basic),
        "computed_cpu_side_inputs": len(computed_cpu_side_inputs(basic)),
    }


def main() -> int:
    import onnxruntime as ort
    import torch

    from pydiff.tools.export.onnx_export import example_inputs, export_stage_onnx
    from pydiff.tools.models import PRESETS, UNet

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for preset, res in PRESET_RES.items():
            cfg = PRESETS[preset]
            net = UNet(cfg).eval()
            with torch.no_grad():
                for q in net.parameters():
                    q.add_(torch.randn_like(q) * 0.02)
            kw = dict(
                channels=cfg.in_channels,
                resolution=res,
                text_dim=cfg.text_dim or 384,
                num_classes=cfg.num_classes or 10,
            )
            files = {}
            for static in (False, True):
                rep = export_stage_onnx(
                    net,
                    cfg.input_names(),
                    Path(d) / f"{preset}-{static}.onnx",
                    static_shapes=static,
                    fp16_weights=True,
                    **kw,
                )
                files["static" if static else "traced"] = rep["tmp_path"]
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            sess = {
                k: ort.InferenceSession(f, so, providers=["CPUExecutionProvider"]) for k, f in files.items()
            }
            for batch in (2, 8):  # 2 = one image with classifier-free guidance
                x = example_inputs(cfg.input_names(), batch, seed=1, **kw)
                outs = {k: s.run(None, x)[0] for k, s in sess.items()}
                for s_ in sess.values():  # warm both: ORT's first calls allocate and tune
                    _time(s_, x, 5)
                n = max(3, int(0.3 / max(1e-4, _time(sess["traced"], x, 1))))
                times = {k: [] for k in sess}
                for _ in range(args.rounds):
                    for k, s in sess.items():
                        times[k].append(_time(s, x, n))
                med = {k: float(np.median(v)) for k, v in times.items()}
                ratios = [a / b for a, b in zip(times["traced"], times["static"])]
                rows.append(
                    {
                        "preset": preset,
                        "resolution": res,
                        "batch": batch,
                        "traced_ms": med["traced"] * 1e3,
                        "static_ms": med["static"] * 1e3,
                        "speedup_median": float(np.median(ratios)),
                        "speedup_of_medians": med["traced"] / med["static"],
                        "speedup_range": [float(min(ratios)), float(max(ratios))],
                        "max_abs_diff": float(np.abs(outs["traced"] - outs["static"]).max()),
                        "traced": graph_figures(files["traced"]),
                        "static": graph_figures(files["static"]),
                    }
                )
    print(
        "| network | batch | nodes (after ORT basic) | Shape ops | computed CPU-side inputs | "
        "traced ms | static ms | speedup: median of rounds (range); of medians | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, s = r["traced"], r["static"]
        print(
            f"| {r['preset']} {r['resolution']}x{r['resolution']} | {r['batch']} | "
            f"{t['nodes_after_basic']} -> {s['nodes_after_basic']} | {t['shape_ops_after_basic']} -> "
            f"{s['shape_ops_after_basic']} | {t['computed_cpu_side_inputs']} -> {s['computed_cpu_side_inputs']} | "
            f"{r['traced_ms']:.2f} | {r['static_ms']:.2f} | {r['speedup_median']:.2f}x "
            f"({r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}); {r['speedup_of_medians']:.2f}x | "
            f"{r['max_abs_diff']:.1e} |"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"threads": args.threads, "rounds": args.rounds, "rows": rows}, indent=1) + "\n"
        )
    return 0


def _time(sess, x, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        sess.run(None, x)
    return (time.perf_counter() - t) / n


if __name__ == "__main__":
    raise SystemExit(main())
