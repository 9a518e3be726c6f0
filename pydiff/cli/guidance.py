"""`pydiff guidance train-classifier|train-clip|export-classifier|export-clip`: the guidance models
of classifier and CLIP guidance (noise-aware, Dhariwal & Nichol 2021; GLIDE), trained and exported
to ONNX gradients a package's manifest names. Needs the [train] extra (torch)."""

from __future__ import annotations

import json

from pydiff.cli.common import EXIT_OK, command_line
from pydiff.tools.training.noisy_classifiers import (
    ClassifierTrainConfig,
    ClipTrainConfig,
    export_classifier,
    export_clip,
    train_classifier,
    train_clip,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "guidance",
        help="train and export guidance models: train-classifier, train-clip, export-classifier, export-clip",
    )
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    t = sub.add_parser("train-classifier", help="noise-aware classifier (digits, or shapes combinations)")
    t.add_argument("--task", choices=["digits", "shapes"], default="digits")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.set_defaults(func=_run_train_classifier)
    c = sub.add_parser("train-clip", help="noise-aware CLIP image encoder for the shapes base stage")
    c.add_argument("--out", required=True)
    c.add_argument("--text-encoder", default="runs/text_encoder")
    c.add_argument("--steps", type=int, default=3000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=1)
    c.set_defaults(func=_run_train_clip)
    x = sub.add_parser("export-clip", help="ONNX of grad_x f(x_t, t) . g(c), checked vs autograd")
    x.add_argument("--run", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--package", help="also add a guidance_models entry to this package's manifest")
    x.add_argument("--name", default="clip")
    x.add_argument("--scale", type=float, default=100.0, help="the manifest's recommended scale")
    x.set_defaults(func=_run_export_clip)
    e = sub.add_parser("export-classifier", help="ONNX of the input gradient, checked vs autograd")
    e.add_argument("--run", required=True, help="training run directory (model.safetensors)")
    e.add_argument("--out", required=True, help="ONNX file to write")
    e.add_argument("--package", help="also add a guidance_models entry to this package's manifest")
    e.add_argument("--name", default="classifier")
    e.add_argument("--scale", type=float, default=10.0, help="the manifest's recommended scale")
    e.set_defaults(func=_run_export_classifier)


def _run_train_classifier(a) -> int:
    cfg = ClassifierTrainConfig.for_task(a.task, steps=a.steps, seed=a.seed, threads=a.threads)
    print(json.dumps(train_classifier(cfg, a.out, command_line(a)), indent=1))
    return EXIT_OK


def _run_train_clip(a) -> int:
    cfg = ClipTrainConfig(steps=a.steps, seed=a.seed, threads=a.threads, text_encoder=a.text_encoder)
    print(json.dumps(train_clip(cfg, a.out, command_line(a)), indent=1))
    return EXIT_OK


def _run_export_clip(a) -> int:
    print(json.dumps(export_clip(a.run, a.out, package=a.package, name=a.name, scale=a.scale), indent=1))
    return EXIT_OK


def _run_export_classifier(a) -> int:
    print(
        json.dumps(export_classifier(a.run, a.out, package=a.package, name=a.name, scale=a.scale), indent=1)
    )
    return EXIT_OK
