"""Import a diffusers UNet2DModel / UNet2DConditionModel into a pydiff model package.

The network is exported to ONNX (opset 17, dynamic batch) and verified against diffusers in
PyTorch (max abs err <= 1e-4) before the package is written.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .onnx_export import export_stage_onnx
from .package import write_package_atomic

# scheduler_config.json keys that the package's `scheduler` entry carries over.
SCHEDULER_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                  "timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range",
                  "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "trained_betas",
                  "rescale_betas_zero_snr", "set_alpha_to_one")


def _load_unet(model: str | Path):
    """(module, config dict) from a folder with config.json (+ weights) or a config.json file."""
    import diffusers

    model = Path(model)
    cfg_path = model if model.is_file() else model / "config.json"
    config = json.loads(cfg_path.read_text())
    cls_name = config.get("_class_name", "UNet2DModel")
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ValueError(f"{cfg_path}: _class_name {cls_name!r} is not UNet2DModel or UNet2DConditionModel")
    cls = getattr(diffusers, cls_name)
    has_weights = model.is_dir() and any(
        (model / f).exists() for f in ("diffusion_pytorch_model.safetensors",
                                       "diffusion_pytorch_model.fp16.safetensors"))
    if has_weights:
        # safetensors only: never unpickle a .bin checkpoint.
        net = cls.from_pretrained(str(model), use_safetensors=True)
    elif model.is_dir() and (model / "diffusion_pytorch_model.bin").exists():
        raise ValueError(f"{model}: only safetensors weights are imported (found a pickle .bin file)")
    else:
        net = cls.from_config(config)  # built from the config: random initialisation
    return net.eval().float(), dict(net.config)


def _find_scheduler(model: Path, scheduler: str | Path | None) -> dict:
    cands = [Path(scheduler)] if scheduler else []
    base = model if model.is_dir() else model.parent
    cands += [base.parent / "scheduler" / "scheduler_config.json", base / "scheduler_config.json"]
    for c in cands:
        if c.is_file():
            raw = json.loads(c.read_text())
            return {k: raw[k] for k in SCHEDULER_KEYS if k in raw}
    if scheduler:
        raise FileNotFoundError(scheduler)
    return {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}


def import_diffusers(model: str | Path, out_dir: str | Path, *, scheduler: str | Path | None = None,
                     name: str | None = None, text_encoder: str | Path | None = None,
                     max_length: int | None = None, text_encoder_name: str | None = None,
                     null_class: bool = True, recommended: dict | None = None) -> dict:
    """Write a package for a diffusers UNet (folder with config.json and safetensors weights, or
    a config.json: random weights) with its scheduler config.

    UNet2DConditionModel needs `text_encoder`: a folder with model.onnx + tokenizer.json whose
    hidden size is the UNet's cross_attention_dim. A class-conditional UNet2DModel
    (num_class_embeds = K) becomes a package with num_classes = K - 1 when `null_class` (the last
    embedding is the "no class" one used for guidance), else K with no unconditional class.
    """
    import torch

    model = Path(model)
    net, cfg = _load_unet(model)
    cls_name = type(net).__name__
    sched = _find_scheduler(model, scheduler)
    pred = sched.get("prediction_type", "epsilon")
    sched.setdefault("prediction_type", pred)
    sample_size = cfg.get("sample_size") or 32
    res = sample_size if isinstance(sample_size, int) else int(sample_size[0])
    cin, cout = int(cfg["in_channels"]), int(cfg["out_channels"])
    if cout not in (cin, 2 * cin):
        raise ValueError(f"out_channels {cout} is neither in_channels {cin} nor twice it")
    learned_var = cout == 2 * cin  # the second half (learned variance) is dropped

    te_spec = None
    if cls_name == "UNet2DConditionModel":
        if text_encoder is None:
            raise ValueError("a UNet2DConditionModel needs text_encoder= (folder with model.onnx + tokenizer.json)")
        import onnxruntime as ort

        te = Path(text_encoder)
        sess = ort.InferenceSession(str(te / "model.onnx"), providers=["CPUExecutionProvider"])
        hidden = sess.get_outputs()[0].shape[-1]
        if not isinstance(hidden, int):
            hidden = int(cfg["cross_attention_dim"])
        if hidden != int(cfg["cross_attention_dim"]):
            raise ValueError(f"text encoder hidden size {hidden} != cross_attention_dim {cfg['cross_attention_dim']}")
        te_spec = {"onnx": "text_encoder/model.onnx", "tokenizer": "text_encoder/tokenizer.json",
                   "max_length": int(max_length or 77), "hidden_size": hidden,
                   "name": text_encoder_name or te.name}
        inputs = ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
        conditioning, num_classes = "text", None

        def call(m, sample, timestep, encoder_hidden_states, encoder_attention_mask):
            return m(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                     encoder_attention_mask=encoder_attention_mask).sample
    else:
        k = cfg.get("num_class_embeds")
        if k:
            inputs = ["sample", "timestep", "class_labels"]
            conditioning = "class"
            num_classes = int(k) - 1 if null_class else int(k)

            def call(m, sample, timestep, class_labels):
                return m(sample, timestep, class_labels=class_labels).sample
        else:
            inputs = ["sample", "timestep"]
            conditioning, num_classes = "none", None

            def call(m, sample, timestep):
                return m(sample, timestep).sample

    def call_eps(m, **kw):
        out = call(m, **kw)
        return out[:, :cin] if learned_var else out

    report: dict = {}

    def build(tmp: Path):
        rep = export_stage_onnx(net, inputs, tmp / "unet.onnx.part", channels=cin, resolution=res,
                                max_length=te_spec["max_length"] if te_spec else 16,
                                text_dim=te_spec["hidden_size"] if te_spec else 384,
                                num_classes=max(1, num_classes or 1) - (0 if null_class else 1),
                                call=call_eps)
        os.rename(rep["tmp_path"], tmp / "unet.onnx")
        if te_spec:
            (tmp / "text_encoder").mkdir()
            shutil.copyfile(Path(text_encoder) / "model.onnx", tmp / "text_encoder" / "model.onnx")
            shutil.copyfile(Path(text_encoder) / "tokenizer.json", tmp / "text_encoder" / "tokenizer.json")
        rec = {"sampler": "dpmpp_2m", "steps": 25, "guidance_scale": 1.0 if conditioning == "none" else 3.0,
               "eta": 0.0, "thresholding": "none"}
        rec.update(recommended or {})
        manifest = {"format": "pydiff-package", "version": 1, "name": name or model.stem,
                    "description": f"imported from diffusers {cls_name} ({model})",
                    "stages": [{"name": "base", "onnx": "unet.onnx", "resolution": res, "channels": cin,
                                "conditioning": conditioning, "num_classes": num_classes,
                                "inputs": inputs, "output": "out", "prediction_type": pred,
                                "scheduler": sched, "recommended": rec}]}
        if te_spec:
            manifest["text_encoder"] = te_spec
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        report.update(max_abs_err=rep["max_abs_err"], inputs=inputs, conditioning=conditioning)

    with torch.no_grad():
        write_package_atomic(out_dir, build)
    return report
