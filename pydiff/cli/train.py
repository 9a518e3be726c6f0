"""`pydiff train TASK --out RUN`: train a network (L_simple, Ho et al. 2020, Algorithm 1); a run
folder that exists is resumed. Needs the [train] extra (torch)."""

from __future__ import annotations

from pathlib import Path

from pydiff.cli.common import EXIT_OK, command_line, number, positive_int, positive_number
from pydiff.errors import UsageError
from pydiff.tools.models import PRESETS
from pydiff.tools.training.trainer import TrainConfig, train


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a network (L_simple, Algorithm 1); resumes if the run exists"
    )
    p.add_argument(
        "task",
        choices=[
            "digits",
            "shapes-base",
            "shapes-sr64",
            "shapes-base-inpaint",
            "shapes-sr64-inpaint",
            "shapes-colorize",
        ],
    )
    p.add_argument("--out", required=True, help="run directory (checkpoints, log, summary)")
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=positive_number)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-encoder", help="folder with model.onnx + tokenizer.json (shapes tasks)")
    p.add_argument("--max-noise-level", type=positive_int)
    p.add_argument("--crop", type=positive_int)
    p.add_argument("--base-channels", type=positive_int, help="override the preset's base channel count")
    p.add_argument("--num-res-blocks", type=positive_int)
    p.add_argument("--ema-decay", type=number)
    p.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        help="what the network predicts (default epsilon; v_prediction: Salimans & Ho 2022)",
    )
    p.add_argument(
        "--init-from",
        help="an exported stage file (.onnx) to fine-tune from (inpainting: its added input channels start at zero)",
    )
    p.add_argument("--ckpt-every-s", type=positive_number, default=300.0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(a) -> int:
    model = PRESETS[a.task.removesuffix("-inpaint")].to_dict()
    if a.base_channels:
        model["base_channels"] = a.base_channels
    if a.num_res_blocks:
        model["num_res_blocks"] = a.num_res_blocks
    if a.ema_decay is not None and not 0.0 <= a.ema_decay < 1.0:
        raise UsageError(f"--ema-decay must be in [0, 1), got {a.ema_decay}")
    if a.init_from and not Path(a.init_from).is_file():
        raise UsageError(f"--init-from: no such file: {a.init_from}")
    if a.task.startswith("shapes") and not a.text_encoder:
        raise UsageError("--text-encoder is required for shapes tasks")
    cfg = TrainConfig.for_task(
        a.task,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        text_encoder=a.text_encoder,
        max_noise_level=a.max_noise_level,
        crop=a.crop,
        model=model,
        ema_decay=a.ema_decay,
        prediction_type=a.prediction_type,
        ckpt_every_s=a.ckpt_every_s,
        threads=a.threads,
        init_from=a.init_from,
    )
    train(cfg, a.out, command=command_line(a), progress=not a.no_progress)
    return EXIT_OK
