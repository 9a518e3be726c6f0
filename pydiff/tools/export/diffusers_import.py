"""Import a diffusers UNet2DModel / UNet2DConditionModel into a pydiff model package.

The network is exported to ONNX (opset 17, dynamic batch) and verified against diffusers in
PyTorch (max abs err <= 1e-4) before the package is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pydiff.files import write_folder_atomic
from pydiff.schedules import Schedule
from pydiff.tools.export.onnx_export import export_stage_onnx

# scheduler_config.json keys that the package's `scheduler` entry carries over (after
# Schedule.from_config has checked the whole config and filled diffusers' class defaults).
SCHEDULER_KEYS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "clip_sample",
    "clip_sample_range",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "trained_betas",
    "set_alpha_to_one",
    "variance_type",  # DDPM's fixed_small / fixed_large (learned variances are refused)
)


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
    if model.is_file():
        return cls.from_config(config).eval().float(), dict(config)  # a config alone: random weights
    stem = "diffusion_pytorch_model"
    variant = None
    for v in (None, "fp16"):  # single file or shards (their index), plain or the fp16 variant
        mid = f".{v}" if v else ""
        if (
            (model / f"{stem}{mid}.safetensors").exists()
            or (model / f"{stem}.safetensors{mid}.index.json").exists()
            or (model / f"{stem}{mid}.safetensors.index.json").exists()
        ):
            variant = v or ""
            break
    if variant is None:
        if any(model.glob(f"{stem}*.bin")):
            raise ValueError(f"{model}: only safetensors weights are imported (found a pickle .bin file)")
        raise ValueError(
            f"{model}: no {stem}*.safetensors weights (pass the config.json file itself to "
            f"build the network with random weights)"
        )
    # safetensors only: never unpickle a .bin checkpoint.
    net = cls.from_pretrained(str(model), use_safetensors=True, variant=variant or None)
    return net.eval().float(), dict(net.config)


def _check_supported(cfg: dict, cls_name: str, *, latent: bool = False) -> tuple[int, int]:
    """(resolution, channels) of a UNet pydiff can run, else ValueError saying what it lacks.
    `latent`: the UNet samples a VAE's latents (any channel count, no warning)."""
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"sample_size {size}: pydiff's models make square images")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"sample_size {size!r}: the config must give the image size")
    cin, cout = int(cfg["in_channels"]), int(cfg["out_channels"])
    if cin not in (1, 3) and not latent:
        import warnings

        warnings.warn(
            f"in_channels {cin}: pydiff will return {cin}-channel arrays, not images (a 4-channel "
            f"UNet is usually a latent model: import the whole pipeline folder with its VAE, "
            f"pydiff import diffusers PIPELINE_DIR OUT)",
            stacklevel=3,
        )
    if cout not in (cin, 2 * cin):
        raise ValueError(f"out_channels {cout} is neither in_channels {cin} nor twice it")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise ValueError(
            f"time_embedding_type {cfg['time_embedding_type']!r}: the network takes noise "
            f"levels (score SDE), not the training timesteps pydiff feeds"
        )
    if cfg.get("class_embed_type") is not None:
        raise ValueError(
            f"class_embed_type {cfg['class_embed_type']!r}: its class_labels carry another "
            f"quantity (e.g. IF's noise level), which pydiff does not map"
        )
    if cls_name == "UNet2DConditionModel" and cfg.get("num_class_embeds"):
        raise ValueError("num_class_embeds on a text-conditional UNet is not supported")
    return size, cin


def _find_scheduler(model: Path, scheduler: str | Path | None) -> dict:
    """The scheduler config next to the UNet (or `scheduler`), checked and completed by
    Schedule.from_config (a setting pydiff cannot sample with is a ScheduleError)."""

    cands = [Path(scheduler)] if scheduler else []
    base = model if model.is_dir() else model.parent
    cands += [base.parent / "scheduler" / "scheduler_config.json", base / "scheduler_config.json"]
    for c in cands:
        if c.is_file():
            raw = json.loads(c.read_text())
            if raw.get("variance_type") in ("learned", "learned_range"):
                raise ValueError(
                    f"{c}: variance_type {raw['variance_type']!r}: learned variances are not supported "
                    f"yet by pydiff's fused step (set variance_type 'fixed_small' in a copy of the "
                    f"config to sample with the fixed variance)"
                )
            full = Schedule.from_config(raw).to_config()
            return {k: full[k] for k in SCHEDULER_KEYS if k in full and full[k] is not None}
    if scheduler:
        raise FileNotFoundError(scheduler)
    import warnings

    warnings.warn(
        f"{model}: no scheduler_config.json found; assuming diffusers' DDPM defaults (linear "
        f"betas, 1000 steps, epsilon): pass scheduler= if the model was trained otherwise",
        stacklevel=3,
    )
    return {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}


def _recommended_thresholding(sched: dict) -> dict:
    """What the scheduler itself would do to x0: dynamic thresholding, a static clip, or nothing."""
    if sched.get("thresholding"):
        return {
            "thresholding": "dynamic",
            "dynamic_thresholding_ratio": sched.get("dynamic_thresholding_ratio", 0.995),
            "sample_max_value": sched.get("sample_max_value", 1.0),
        }
    return {"thresholding": "static" if sched.get("clip_sample", True) else "none"}


def import_diffusers(
    model: str | Path,
    out_dir: str | Path,
    *,
    scheduler: str | Path | None = None,
    name: str | None = None,
    text_encoder: str | Path | None = None,
    max_length: int | None = None,
    text_encoder_name: str | None = None,
    null_class: bool = False,
    attention_mask: bool = False,
    recommended: dict | None = None,
) -> dict:
    """Write a package for a diffusers UNet (folder with config.json and safetensors weights, single
    or sharded, plain or the fp16 variant; or a config.json file: random weights) with its
    scheduler config.

    UNet2DConditionModel needs `text_encoder`: a folder with model.onnx + tokenizer.json whose
    hidden size is the UNet's cross_attention_dim. Its encoder_attention_mask is not fed unless
    `attention_mask` (diffusers' Stable Diffusion and IF pipelines never pass one: their UNets
    were trained attending to the padding). A class-conditional UNet2DModel (num_class_embeds = K)
    has K real classes and no "no class" label (diffusers trains none): the package says so
    (unconditional_class false: class_label needed, no classifier-free guidance). With
    `null_class`, the last embedding is taken as a "no class" label trained by condition dropout:
    num_classes = K - 1. The recommended thresholding is the scheduler's own (clip_sample ->
    static, thresholding -> dynamic). A learned variance (out_channels = 2 x in_channels) is
    dropped: DDIM and DPM-Solver++ do not use it; pydiff's DDPM uses the fixed variance.
    """
    import torch

    model = Path(model)
    net, cfg = _load_unet(model)
    cls_name = type(net).__name__
    res, cin = _check_supported(cfg, cls_name)
    sched = _find_scheduler(model, scheduler)
    pred = sched.get("prediction_type", "epsilon")
    sched.setdefault("prediction_type", pred)
    learned_var = int(cfg["out_channels"]) == 2 * cin  # the second half (learned variance) is dropped

    te_spec = None
    if cls_name == "UNet2DConditionModel":
        if text_encoder is None:
            raise ValueError(
                "a UNet2DConditionModel needs text_encoder= (folder with model.onnx + tokenizer.json)"
            )
        import onnxruntime as ort

        te = Path(text_encoder)
        sess = ort.InferenceSession(str(te / "model.onnx"), providers=["CPUExecutionProvider"])
        hidden = sess.get_outputs()[0].shape[-1]
        if not isinstance(hidden, int):
            hidden = int(cfg["cross_attention_dim"])
        if hidden != int(cfg["cross_attention_dim"]):
            raise ValueError(
                f"text encoder hidden size {hidden} != cross_attention_dim {cfg['cross_attention_dim']}"
            )
        te_spec = {
            "onnx": "text_encoder/model.onnx",
            "tokenizer": "text_encoder/tokenizer.json",
            "max_length": int(max_length or 77),
            "hidden_size": hidden,
            "name": text_encoder_name or te.name,
        }
        conditioning, num_classes = "text", None
        if attention_mask:
            inputs = ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]

            def call(m, sample, timestep, encoder_hidden_states, encoder_attention_mask):
                return m(
                    sample,
                    timestep,
                    encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask,
                ).sample
        else:
            inputs = ["sample", "timestep", "encoder_hidden_states"]

            def call(m, sample, timestep, encoder_hidden_states):
                return m(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
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
        rep = export_stage_onnx(
            net,
            inputs,
            tmp / "unet.onnx.part",
            channels=cin,
            resolution=res,
            max_length=te_spec["max_length"] if te_spec else 16,
            text_dim=te_spec["hidden_size"] if te_spec else 384,
            num_classes=max(1, num_classes or 1) - (0 if null_class else 1),
            call=call_eps,
        )
        os.rename(rep["tmp_path"], tmp / "unet.onnx")
        if te_spec:
            (tmp / "text_encoder").mkdir()
            shutil.copyfile(Path(text_encoder) / "model.onnx", tmp / "text_encoder" / "model.onnx")
            shutil.copyfile(Path(text_encoder) / "tokenizer.json", tmp / "text_encoder" / "tokenizer.json")
        no_cfg = conditioning == "none" or (conditioning == "class" and not null_class)
        rec = {
            "sampler": "dpmpp_2m",
            "steps": 25,
            "guidance_scale": 1.0 if no_cfg else 3.0,
            "eta": 0.0,
            **_recommended_thresholding(sched),
        }
        rec.update(recommended or {})
        stage = {
            "name": "base",
            "onnx": "unet.onnx",
            "resolution": res,
            "channels": cin,
            "conditioning": conditioning,
            "num_classes": num_classes,
            "inputs": inputs,
            "output": "out",
            "prediction_type": pred,
            "scheduler": sched,
            "recommended": rec,
        }
        if conditioning == "class" and not null_class:
            stage["unconditional_class"] = False
        note = "; learned variance dropped (DDPM samples with the fixed variance)" if learned_var else ""
        manifest = {
            "format": "pydiff-package",
            "version": 1,
            "name": name or model.stem,
            "description": f"imported from diffusers {cls_name} ({model}){note}",
            "stages": [stage],
        }
        if te_spec:
            manifest["text_encoder"] = te_spec
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        report.update(max_abs_err=rep["max_abs_err"], inputs=inputs, conditioning=conditioning)

    with torch.no_grad():
        write_folder_atomic(out_dir, build)
    return report
