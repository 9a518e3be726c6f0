"""`pydiff train` and `pydiff export` (also `python -m pydiff.training ...`)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys


def _add_train(sub):
    p = sub.add_parser("train", help="train a network (L_simple, Algorithm 1); resumes if the run exists")
    p.add_argument("task", choices=["digits", "shapes-base", "shapes-sr64"])
    p.add_argument("--out", required=True, help="run directory (checkpoints, log, summary)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-encoder", help="folder with model.onnx + tokenizer.json (shapes tasks)")
    p.add_argument("--max-noise-level", type=int)
    p.add_argument("--crop", type=int)
    p.add_argument("--base-channels", type=int, help="override the preset's base channel count")
    p.add_argument("--num-res-blocks", type=int)
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="what the network predicts (default epsilon; v_prediction: Salimans & Ho 2022)")
    p.add_argument("--ckpt-every-s", type=float, default=300.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_train)


def _run_train(a) -> int:
    from pydiff.tools.models import PRESETS
    from pydiff.tools.training.trainer import TrainConfig, train

    model = PRESETS[a.task].to_dict()
    if a.base_channels:
        model["base_channels"] = a.base_channels
    if a.num_res_blocks:
        model["num_res_blocks"] = a.num_res_blocks
    if a.task.startswith("shapes") and not a.text_encoder:
        raise SystemExit("--text-encoder is required for shapes tasks")
    cfg = TrainConfig.for_task(a.task, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                               text_encoder=a.text_encoder, max_noise_level=a.max_noise_level,
                               crop=a.crop, model=model, ema_decay=a.ema_decay,
                               prediction_type=a.prediction_type,
                               ckpt_every_s=a.ckpt_every_s, threads=a.threads)
    command = "python -m pydiff.training " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    train(cfg, a.out, command=command, progress=not a.no_progress)
    return 0


def _add_export(sub):
    p = sub.add_parser("export", help="write a pydiff model package (ONNX + manifest.json)")
    esub = p.add_subparsers(dest="what", required=True)
    s = esub.add_parser("shapes", help="the shapes cascade from a base run and an SR run")
    s.add_argument("--base", required=True)
    s.add_argument("--sr", required=True)
    s.add_argument("--text-encoder", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--base-recommended", type=json.loads, default=None,
                   help='JSON merged into the base stage\'s "recommended", e.g. \'{"guidance_scale": 4}\'')
    s.add_argument("--sr-recommended", type=json.loads, default=None)
    s.add_argument("--noise-aug-level", type=int, default=100)
    s.add_argument("--notes", default="", help="Markdown appended to TRAINING.md (e.g. eval figures)")
    s.set_defaults(func=_run_export)
    d = esub.add_parser("digits", help="the digits class-conditional model from a run")
    d.add_argument("--run", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--recommended", type=json.loads, default=None)
    d.add_argument("--notes", default="")
    d.set_defaults(func=_run_export)
    f = esub.add_parser("diffusers", help="a diffusers UNet2DModel / UNet2DConditionModel folder")
    f.add_argument("--model", required=True, help="folder with config.json + weights (or a config.json)")
    f.add_argument("--scheduler", help="scheduler_config.json (default: the model folder's sibling)")
    f.add_argument("--out", required=True)
    f.add_argument("--name", default=None)
    f.add_argument("--text-encoder", help="UNet2DConditionModel: folder with model.onnx + tokenizer.json")
    f.add_argument("--max-length", type=int, default=None, help="tokenizer length (default 77)")
    f.add_argument("--null-class", action="store_true",
                   help="class models: the last class embedding is a trained 'no class' label (enables CFG)")
    f.add_argument("--attention-mask", action="store_true",
                   help="text models: feed encoder_attention_mask (diffusers' SD/IF pipelines do not)")
    f.set_defaults(func=_run_export)
    e = esub.add_parser("text-encoder", help="export all-MiniLM-L6-v2 to int8 ONNX")
    e.add_argument("--out", required=True)
    e.add_argument("--max-length", type=int, default=16)
    e.set_defaults(func=_run_export)


def _run_export(a) -> int:
    if a.what == "text-encoder":
        from pydiff.tools.export.minilm import export_text_encoder
        print(json.dumps(export_text_encoder(a.out, max_length=a.max_length)))
    elif a.what == "shapes":
        from pydiff.tools.export.from_runs import export_shapes
        print(json.dumps(export_shapes(a.base, a.sr, a.text_encoder, a.out,
                                       base_recommended=a.base_recommended,
                                       sr_recommended=a.sr_recommended,
                                       noise_aug_level=a.noise_aug_level, extra_md=a.notes), indent=1))
    elif a.what == "digits":
        from pydiff.tools.export.from_runs import export_digits
        print(json.dumps(export_digits(a.run, a.out, recommended=a.recommended, extra_md=a.notes),
                         indent=1))
    elif a.what == "diffusers":
        from pydiff.tools.export.diffusers_import import import_diffusers
        print(json.dumps(import_diffusers(a.model, a.out, scheduler=a.scheduler, name=a.name,
                                          text_encoder=a.text_encoder, max_length=a.max_length,
                                          null_class=a.null_class, attention_mask=a.attention_mask), indent=1))
    return 0


def _add_eval(sub):
    from pydiff.tools.training import eval as ev

    p = sub.add_parser("eval", help="evaluate a shapes or digits package (alignment / accuracy), or sweep "
                                    "guidance types and scales (quality against diversity)")
    ev.add_arguments(p)
    p.set_defaults(func=ev.run)


def _add_guidance(sub):
    p = sub.add_parser("guidance", help="train and export guidance models: train-classifier, train-clip, "
                                        "export-classifier, export-clip (see pydiff.training.guidance_models)",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("pydiff.tools.training.guidance", fromlist=["main"]).main(
        a.args[1:] if a.args[:1] == ["--"] else a.args))


def register(subparsers) -> None:
    """Add the `train`, `export`, `eval` and `guidance` subcommands to an argparse subparsers object."""
    _add_train(subparsers)
    _add_export(subparsers)
    _add_eval(subparsers)
    _add_guidance(subparsers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydiff.training")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    a = parser.parse_args(argv)
    return a.func(a)
