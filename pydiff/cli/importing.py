"""`pydiff import diffusers DIR OUT`: a diffusers pipeline folder (model_index.json, unet/,
scheduler/, text_encoder/, tokenizer/, vae/), or a UNet folder, to a pydiff model package.
`pydiff export diffusers` is the same command (its older spelling). Needs the [diffusers] extra;
without it the command says so (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

from pydiff.cli.common import EXIT_OK
from pydiff.errors import UsageError
from pydiff.tools.export.diffusers_import import import_diffusers
from pydiff.tools.export.diffusers_pipeline import check_extra, import_pipeline


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import", help="import a model from another library into a pydiff package (diffusers)"
    )
    isub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    d = isub.add_parser(
        "diffusers",
        help="a diffusers pipeline folder (save_pretrained) or UNet folder -> a pydiff package",
        description="Import a diffusers pipeline folder (model_index.json, unet/, scheduler/, and "
        "text_encoder/, tokenizer/, vae/ for Stable-Diffusion-style models) or a UNet folder; every "
        "network is exported to ONNX and checked against diffusers before OUT is written.",
    )
    add_diffusers_arguments(d)


def add_diffusers_arguments(d, *, legacy: bool = False) -> None:
    """The arguments of `import diffusers` (and, with `legacy`, `export diffusers`' --model/--out)."""
    d.add_argument("src", metavar="DIR", nargs="?" if legacy else None, help="the pipeline or UNet folder")
    d.add_argument("dst", metavar="OUT", nargs="?" if legacy else None, help="the package folder to write")
    if legacy:
        d.add_argument("--model", help="DIR (older spelling)")
        d.add_argument("--out", help="OUT (older spelling)")
    d.add_argument("--name", default=None, help="the package's name (default: the folder's)")
    d.add_argument(
        "--recommended",
        type=json.loads,
        default=None,
        help='JSON merged into the stage\'s "recommended", e.g. \'{"steps": 25}\'',
    )
    d.add_argument("--no-vae-encoder", action="store_true", help="latent models: leave the VAE encoder out")
    u = d.add_argument_group("a UNet folder alone (no model_index.json)")
    u.add_argument("--scheduler", help="scheduler_config.json (default: the model folder's sibling)")
    u.add_argument("--text-encoder", help="UNet2DConditionModel: folder with model.onnx + tokenizer.json")
    u.add_argument("--max-length", type=int, default=None, help="tokenizer length (default 77)")
    u.add_argument(
        "--null-class",
        action="store_true",
        help="class models: the last class embedding is a trained 'no class' label (enables CFG)",
    )
    u.add_argument(
        "--attention-mask",
        action="store_true",
        help="text models: feed encoder_attention_mask (diffusers' SD/IF pipelines do not)",
    )
    d.set_defaults(func=run_diffusers)


def run_diffusers(a) -> int:
    src = a.src if a.src is not None else getattr(a, "model", None)
    dst = a.dst if a.dst is not None else getattr(a, "out", None)
    if src is None or dst is None:
        raise UsageError("give the folder to import and the package to write: DIR OUT")
    check_extra()
    src_path = Path(src)
    if (src_path / "model_index.json").is_file():
        unet_only = [o for o in ("scheduler", "text_encoder", "max_length") if getattr(a, o) is not None]
        unet_only += [o for o in ("null_class", "attention_mask") if getattr(a, o)]
        if unet_only:
            raise UsageError(
                f"--{unet_only[0].replace('_', '-')} is for a UNet folder alone; {src} is a whole "
                f"pipeline folder (model_index.json), whose own components are imported"
            )
        report = import_pipeline(
            src, dst, name=a.name, recommended=a.recommended, encoder=not a.no_vae_encoder
        )
    else:
        if not src_path.exists():
            raise UsageError(f"{src}: no such folder or file")
        try:
            report = import_diffusers(
                src,
                dst,
                scheduler=a.scheduler,
                name=a.name,
                text_encoder=a.text_encoder,
                max_length=a.max_length,
                null_class=a.null_class,
                attention_mask=a.attention_mask,
                recommended=a.recommended,
            )
        except FileNotFoundError as e:
            raise UsageError(f"{e.filename or e}: not found") from None
    print(json.dumps(report, indent=1))
    return EXIT_OK
