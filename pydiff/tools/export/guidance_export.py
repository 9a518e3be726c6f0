"""Export guidance models to ONNX as networks whose output is the input gradient that guidance needs,
checked against torch.autograd, and add them to a model package's manifest (`guidance_models`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from pydiff.files import write_json
from pydiff.tools.export.static_shapes import freeze_shapes_file
from pydiff.tools.models.classifier import (
    ClassifierGradient,
    CLIPGradient,
    autograd_clip_gradient,
    autograd_gradient,
)

GRAD_RTOL = 1e-4  # the bound: relative error of the exported gradient vs autograd


def _freeze_and_move(tmp: Path, out: Path) -> None:
    """Fold the traced shape arithmetic (only the batch stays dynamic: static_shapes.py), then
    move the file into place; nothing is left at `tmp` if that fails."""
    try:
        freeze_shapes_file(tmp, strict=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def export_classifier_gradient(
    classifier, out: str | os.PathLike, *, opset: int = 17, check_batch: int = 32, seed: int = 0
) -> dict:
    """Write the ONNX of ClassifierGradient(classifier): (sample, timestep, class_labels) ->
    (grad [B, C, H, W], log_prob [B]); run it in ONNX Runtime on noised random inputs at t across
    [0, T) and compare with torch.autograd. Raises RuntimeError if the relative error (per sample,
    ||onnx - autograd|| / ||autograd||) exceeds GRAD_RTOL. Returns the check's figures."""
    import onnxruntime as ort

    classifier = classifier.eval()
    cfg = classifier.cfg
    module = ClassifierGradient(classifier).eval()
    g = torch.Generator().manual_seed(seed)
    ex = (
        torch.randn(2, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g),
        torch.tensor([10.0, 500.0]),
        torch.tensor([0, 1], dtype=torch.int64),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    batch = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            module,
            ex,
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=["sample", "timestep", "class_labels"],
            output_names=["grad", "log_prob"],
            dynamic_axes={
                "sample": batch,
                "timestep": batch,
                "class_labels": batch,
                "grad": batch,
                "log_prob": batch,
            },
        )
    _freeze_and_move(tmp, out)

    B = check_batch
    x = torch.randn(B, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g)
    t = torch.linspace(0, 999, B)
    y = torch.randint(0, cfg.num_classes, (B,), generator=g)
    ref, ref_lp = autograd_gradient(classifier, x, t, y)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got, got_lp = sess.run(
        ["grad", "log_prob"], {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": y.numpy()}
    )
    r = ref.numpy().astype(np.float64).reshape(B, -1)
    d = got.astype(np.float64).reshape(B, -1) - r
    rel = np.linalg.norm(d, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-30)
    rep = {
        "onnx": str(out),
        "max_rel_error_vs_autograd": float(rel.max()),
        "max_abs_log_prob_error": float(np.abs(got_lp - ref_lp.numpy()).max()),
        "check_batch": B,
        "bound": GRAD_RTOL,
    }
    if not rel.max() <= GRAD_RTOL:
        raise RuntimeError(
            f"{out}: exported gradient differs from autograd by {rel.max():.3g} (relative) > {GRAD_RTOL}"
        )
    return rep


def _relative_errors(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    B = ref.shape[0]
    r = ref.astype(np.float64).reshape(B, -1)
    d = got.astype(np.float64).reshape(B, -1) - r
    return np.linalg.norm(d, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-30)


def export_clip_gradient(
    clip,
    out: str | os.PathLike,
    *,
    max_length: int = 16,
    opset: int = 17,
    check_batch: int = 32,
    seed: int = 0,
) -> dict:
    """Write the ONNX of CLIPGradient(clip): (sample, timestep, encoder_hidden_states,
    encoder_attention_mask) -> (grad [B, C, H, W], similarity [B]); check it in ONNX Runtime
    against torch.autograd like export_classifier_gradient."""
    import onnxruntime as ort

    clip = clip.eval()
    cfg = clip.image.cfg
    D = clip.text_proj.in_features
    module = CLIPGradient(clip).eval()
    g = torch.Generator().manual_seed(seed)

    def inputs(B):
        x = torch.randn(B, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g)
        t = torch.linspace(0, 999, B)
        st = torch.randn(B, max_length, D, generator=g)
        mk = (torch.rand(B, max_length, generator=g) < 0.6).float()
        mk[:, 0] = 1.0
        return x, t, st, mk

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    batch = {0: "batch"}
    names = ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
    with torch.no_grad():
        torch.onnx.export(
            module,
            inputs(2),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=["grad", "similarity"],
            dynamic_axes={n: batch for n in names + ["grad", "similarity"]},
        )
    _freeze_and_move(tmp, out)
    x, t, st, mk = inputs(check_batch)
    ref, ref_sim = autograd_clip_gradient(clip, x, t, st, mk)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got, got_sim = sess.run(
        ["grad", "similarity"], dict(zip(names, (x.numpy(), t.numpy(), st.numpy(), mk.numpy())))
    )
    rel = _relative_errors(got, ref.numpy())
    rep = {
        "onnx": str(out),
        "max_rel_error_vs_autograd": float(rel.max()),
        "max_abs_similarity_error": float(np.abs(got_sim - ref_sim.numpy()).max()),
        "check_batch": check_batch,
        "bound": GRAD_RTOL,
    }
    if not rel.max() <= GRAD_RTOL:
        raise RuntimeError(
            f"{out}: exported gradient differs from autograd by {rel.max():.3g} (relative) > {GRAD_RTOL}"
        )
    return rep


def add_guidance_model(
    package: str | os.PathLike,
    onnx: str | os.PathLike,
    *,
    name: str,
    kind: str,
    model=None,
    stage: str | None = None,
    recommended: dict | None = None,
    description: str | None = None,
    class_names: list[str] | None = None,
) -> dict:
    """Copy `onnx` into the package directory (if it is not there) and add or replace the
    manifest's guidance_models entry `name` (docs/model-package.md). Returns the entry."""
    pkg = Path(package)
    manifest_path = pkg / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    src = Path(onnx).resolve()
    if pkg.resolve() not in src.parents:
        dst = pkg / f"{name}.onnx"
        shutil.copyfile(src, dst)
        rel = dst.name
    else:
        rel = src.relative_to(pkg.resolve()).as_posix()
    stage = stage or manifest["stages"][0]["name"]
    if kind == "classifier":
        entry = {
            "name": name,
            "kind": kind,
            "onnx": rel,
            "stage": stage,
            "inputs": ["sample", "timestep", "class_labels"],
            "output": "grad",
            "num_classes": int(model.cfg.num_classes)
            if model is not None
            else int(next(s for s in manifest["stages"] if s["name"] == stage)["num_classes"]),
        }
    elif kind == "clip":
        entry = {
            "name": name,
            "kind": kind,
            "onnx": rel,
            "stage": stage,
            "inputs": ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"],
            "output": "grad",
        }
    else:
        raise ValueError(f"unknown guidance model kind {kind!r}")
    if class_names is not None:
        entry["class_names"] = list(class_names)
    if description:
        entry["description"] = description
    if recommended:
        entry["recommended"] = dict(recommended)
    gms = [g for g in manifest.get("guidance_models", []) if g.get("name") != name]
    manifest["guidance_models"] = gms + [entry]
    write_json(manifest, manifest_path)
    return entry
