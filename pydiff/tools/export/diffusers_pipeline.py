"""Import a diffusers pipeline folder (what ``save_pretrained`` writes: model_index.json, unet/,
scheduler/, and for latent text-to-image models text_encoder/, tokenizer/, vae/) into a pydiff
model package.

Every network is exported to ONNX and checked against diffusers / transformers in PyTorch before
anything is written (the package folder appears whole, or not at all): the UNet, the CLIP text
encoder, the VAE decoder (and encoder). The tokenizer is written as a `tokenizers` file that pads and
truncates as diffusers' StableDiffusionPipeline tokenizes (`padding="max_length"`,
`max_length=tokenizer.model_max_length`, `truncation=True`; CLIP pads with its pad token,
`<|endoftext|>`), checked id for id against transformers' tokenizer. Safetensors weights only.

What pydiff cannot run yet is refused (`UsageError`, exit 2 on the command line), naming the setting
and what to do: SDXL's added conditioning, DeepFloyd IF (T5, stage II), learned variances, ...
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from pydiff.errors import UsageError
from pydiff.files import write_folder_atomic
from pydiff.samplers import SAMPLERS
from pydiff.schedules import Schedule
from pydiff.tools.export.diffusers_import import (
    SCHEDULER_KEYS,
    _check_supported,
    _load_unet,
    _recommended_thresholding,
)
from pydiff.tools.export.onnx_export import OPSET, export_stage_onnx
from pydiff.tools.export.static_shapes import freeze_shapes_file

# The packages `pydiff import diffusers` needs, and the extra that brings them.
EXTRA = "diffusers"
NEEDS = ("torch", "diffusers", "transformers", "onnx")

# The pipeline classes whose defaults pydiff knows: (sampler or None for the scheduler's, steps,
# guidance scale), as their __call__ signatures default them (diffusers 0.30-0.42).
PIPELINE_DEFAULTS = {
    "DDPMPipeline": ("ddpm", 1000, 1.0),
    "DDIMPipeline": ("ddim", 50, 1.0),  # DDIMPipeline turns any scheduler into a DDIMScheduler
    "StableDiffusionPipeline": (None, 50, 7.5),
    "StableDiffusionImg2ImgPipeline": (None, 50, 7.5),
    "StableDiffusionInpaintPipeline": (None, 50, 7.5),
}
# diffusers scheduler class -> pydiff sampler (where pydiff has it)
SCHEDULER_SAMPLERS = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
}
REFUSED_PIPELINES = {
    "StableDiffusionXLPipeline": "SDXL: a second text encoder (text_encoder_2) and added conditioning "
    "(pooled text embeddings and time ids, unet addition_embed_type 'text_time')",
    "StableDiffusionXLImg2ImgPipeline": "SDXL (see StableDiffusionXLPipeline)",
    "IFPipeline": "DeepFloyd IF stage I: a T5 text encoder (only CLIP is exported) and learned variances "
    "(variance_type 'learned_range')",
    "IFSuperResolutionPipeline": "DeepFloyd IF stage II: the noise level passed as class_labels "
    "(unet class_embed_type), a T5 text encoder, learned variances",
}
VERIFY_PROMPTS = (
    "",
    "a red circle on a blue background",
    "  A RED   Circle,\ton BLUE!! ",
    "caf\u00e9 \u2603 \U0001d518 12345",
    " ".join(["a red circle on a blue background"] * 30),  # over 77 tokens: truncated
)


def check_extra() -> None:
    """A UsageError naming the extra to install when a package the import needs is missing."""
    missing = [m for m in NEEDS if not _importable(m)]
    if missing:
        raise UsageError(
            f"importing diffusers models needs {', '.join(missing)}: pip install 'pydiff[{EXTRA}]'"
        )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a module set to None in sys.modules
        return False


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a JSON file that can be read ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data


def _components(folder: Path, index: dict) -> dict[str, str]:
    """{component: class name} of model_index.json's non-null components."""
    out = {}
    for k, v in index.items():
        if k.startswith("_") or not isinstance(v, list) or len(v) != 2:
            continue
        if v[1] is None:
            continue
        out[k] = str(v[1])
    return out


def scheduler_entry(path: Path) -> tuple[dict, str]:
    """(the package's scheduler block, the scheduler's class name) from scheduler_config.json:
    every key pydiff reads, variance_type included; learned variances refused."""
    raw = _json(path)
    vt = raw.get("variance_type")
    if vt in ("learned", "learned_range"):
        raise UsageError(
            f"{path}: variance_type {vt!r}: learned variances (Nichol & Dhariwal 2021) are not "
            f"supported yet by pydiff's fused step; no pydiff sampler reproduces this model's DDPM "
            f"(re-save the scheduler with variance_type 'fixed_small' to sample it with the fixed "
            f"variance, or use DDIM)"
        )
    cls = str(raw.get("_class_name", ""))
    if "clip_sample" not in raw and cls not in ("", "DDPMScheduler", "DDIMScheduler"):
        raw = {**raw, "clip_sample": False}  # PNDM, Euler, LMS, ...: the scheduler never clips x0
    try:
        full = Schedule.from_config(raw).to_config()
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path}: {e}") from None
    keys = (*SCHEDULER_KEYS, "variance_type")
    return {k: full[k] for k in keys if k in full and full[k] is not None}, cls


def _refuse_unet(cfg: dict, where: Path) -> None:
    """A UNet whose inputs the stage format does not carry: a UsageError saying what is missing."""
    if cfg.get("addition_embed_type") is not None:
        raise UsageError(
            f"{where}: addition_embed_type {cfg['addition_embed_type']!r} (SDXL-style added "
            f"conditioning): the UNet also takes added_cond_kwargs (pooled text embeddings "
            f"'text_embeds' and 'time_ids'), which pydiff's stage networks do not get yet; not supported"
        )
    if cfg.get("class_embed_type") is not None:
        raise UsageError(
            f"{where}: class_embed_type {cfg['class_embed_type']!r}: its class_labels carry another "
            f"quantity (DeepFloyd IF stage II: the noise level of the low-resolution image), which "
            f"pydiff does not map yet; not supported"
        )
    for key in ("encoder_hid_dim_type", "time_cond_proj_dim"):
        if cfg.get(key) is not None:
            raise UsageError(
                f"{where}: {key} {cfg[key]!r}: an extra UNet input pydiff does not feed; not supported"
            )


def import_pipeline(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    recommended: dict | None = None,
    max_abs_err: float = 1e-4,
    encoder: bool = True,
) -> dict:
    """Write a package for the diffusers pipeline folder `folder`; returns a report (what was
    exported, each network's max abs error against PyTorch, the recommended settings).

    Unconditional pixel models (DDPMPipeline, DDIMPipeline: unet/ + scheduler/) become one pixel
    stage; Stable-Diffusion-style folders a latent stage with the CLIP text encoder, its tokenizer and
    the VAE (decoder, and with `encoder` the encoder). The pipeline class in model_index.json sets the
    defaults (steps, guidance, sampler); `recommended` overrides them.
    """
    check_extra()
    import torch  # the export itself: tracing to ONNX and the check against PyTorch

    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder (a diffusers pipeline folder has a model_index.json)")
    index = _json(folder / "model_index.json")
    cls = str(index.get("_class_name", ""))
    if cls in REFUSED_PIPELINES:
        raise UsageError(f"{folder}: {cls} is not supported yet: {REFUSED_PIPELINES[cls]}")
    comps = _components(folder, index)
    for key in ("text_encoder_2", "tokenizer_2", "image_encoder", "controlnet", "transformer", "prior"):
        if key in comps:
            raise UsageError(
                f"{folder}: component {key!r} ({comps[key]}): pydiff imports a UNet with one CLIP text "
                f"encoder and a VAE; this component is not supported yet"
            )
    if "unet" not in comps:
        raise UsageError(f"{folder}/model_index.json: no 'unet' component (pydiff imports UNet pipelines)")
    if "scheduler" not in comps:
        raise UsageError(f"{folder}/model_index.json: no 'scheduler' component")
    latent = "vae" in comps
    text = "text_encoder" in comps
    if text and not latent:
        raise UsageError(
            f"{folder}: a text encoder without a VAE: pixel-space text models are not imported yet"
        )
    if latent and not text:
        raise UsageError(
            f"{folder}: a VAE without a text encoder: unconditional latent models are not imported yet"
        )
    if text and "tokenizer" not in comps:
        raise UsageError(f"{folder}/model_index.json: a text encoder needs its 'tokenizer' component")

    sched, sched_cls = scheduler_entry(folder / "scheduler" / "scheduler_config.json")
    try:
        unet, ucfg = _load_unet(folder / "unet")
    except ValueError as e:
        raise UsageError(str(e)) from None
    _refuse_unet(ucfg, folder / "unet" / "config.json")
    ucls = type(unet).__name__
    try:
        res, cin = _check_supported(ucfg, ucls, latent=latent)
    except ValueError as e:
        raise UsageError(f"{folder / 'unet' / 'config.json'}: {e}") from None
    if int(ucfg["out_channels"]) != cin:
        raise UsageError(
            f"{folder / 'unet' / 'config.json'}: out_channels {ucfg['out_channels']} for in_channels {cin} "
            f"(a learned variance, or an inpainting UNet's extra inputs): not supported yet"
        )
    if text != (ucls == "UNet2DConditionModel"):
        raise UsageError(
            f"{folder}: a {ucls} {'with' if text else 'without'} a text encoder is not supported"
        )

    defaults = PIPELINE_DEFAULTS.get(cls)
    notes = []
    sampler = SCHEDULER_SAMPLERS.get(sched_cls)
    if defaults is not None and defaults[0] is not None:
        sampler = defaults[0]
    if sampler not in SAMPLERS:
        notes.append(
            f"scheduler {sched_cls or '?'} has no pydiff sampler: 'ddim' is recommended instead "
            f"(images differ from diffusers' {sched_cls or 'scheduler'} by the sampler)"
        )
        sampler = "ddim"
    if "safety_checker" in comps:
        notes.append("the safety checker is not imported: pydiff does not filter images")
    steps, guidance = (defaults[1], defaults[2]) if defaults else (25, 7.5 if text else 1.0)
    if defaults is None:
        notes.append(
            f"pipeline class {cls or '(none)'}: no known defaults; {steps} steps, guidance {guidance}"
        )
    steps = min(steps, int(sched.get("num_train_timesteps", 1000)))
    rec = {"sampler": sampler, "steps": steps, "guidance_scale": guidance, "eta": 0.0}
    rec.update(_recommended_thresholding(sched))
    rec.update(recommended or {})

    report: dict = {"pipeline": cls, "scheduler": sched_cls, "notes": notes, "max_abs_err": {}}
    te_spec = vae_spec = None
    with torch.no_grad():
        if text:
            te_model, tokenizer, te_spec = _load_text(folder, comps, ucfg)
        if latent:
            vae, vae_spec = _load_vae(folder, comps, cin, res)

        inputs = ["sample", "timestep", *(["encoder_hidden_states"] if text else [])]

        def call(m, sample, timestep, encoder_hidden_states=None):
            if encoder_hidden_states is None:
                return m(sample, timestep).sample
            return m(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample

        def build(tmp: Path):
            rep = export_stage_onnx(
                unet,
                inputs,
                tmp / "unet.onnx.part",
                channels=cin,
                resolution=res,
                max_length=te_spec["max_length"] if te_spec else 16,
                text_dim=int(ucfg.get("cross_attention_dim") or 384),
                call=call,
                max_abs_err=max_abs_err,
            )
            os.rename(rep["tmp_path"], tmp / "unet.onnx")
            report["max_abs_err"]["unet"] = rep["max_abs_err"]
            if text:
                (tmp / "text_encoder").mkdir()
                report["max_abs_err"]["text_encoder"] = export_clip_text(
                    te_model, tokenizer, tmp / "text_encoder", te_spec, max_abs_err
                )
                report["tokenizer"] = write_tokenizer(
                    tokenizer, tmp / "text_encoder" / "tokenizer.json", te_spec
                )
            if latent:
                (tmp / "vae").mkdir()
                report["max_abs_err"].update(export_vae(vae, tmp / "vae", vae_spec, encoder, max_abs_err))
            stage = {
                "name": "base",
                "onnx": "unet.onnx",
                "resolution": res,
                "channels": cin,
                "conditioning": "text" if text else "none",
                "num_classes": None,
                "inputs": inputs,
                "output": "out",
                "prediction_type": sched.get("prediction_type", "epsilon"),
                "scheduler": sched,
                "recommended": rec,
            }
            manifest = {
                "format": "pydiff-package",
                "version": 1,
                "name": name or folder.resolve().name,
                "description": f"imported from a diffusers {cls or 'pipeline'} folder ({folder.name})"
                + "".join(f"; {n}" for n in notes),
                "stages": [stage],
            }
            if te_spec:
                manifest["text_encoder"] = {k: v for k, v in te_spec.items() if not k.startswith("_")}
            if vae_spec:
                spec = {k: v for k, v in vae_spec.items() if not k.startswith("_")}
                if not encoder:
                    spec.pop("encoder")
                manifest["vae"] = spec
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

        write_folder_atomic(out_dir, build)
    report["recommended"] = rec
    report["out"] = str(out_dir)
    return report


# ------------------------------------------------------------------ the text encoder (CLIP)


def _load_text(folder: Path, comps: dict, ucfg: dict):
    """(CLIP text model, transformers tokenizer, the manifest's text_encoder entry)."""
    import transformers  # the text encoder and tokenizer as diffusers' pipeline loads them

    te_cls, tok_cls = comps["text_encoder"], comps["tokenizer"]
    if te_cls != "CLIPTextModel":
        raise UsageError(
            f"{folder}/text_encoder: {te_cls}: only CLIPTextModel text encoders are exported yet "
            f"(T5, as DeepFloyd IF uses, and CLIP with projection are not)"
        )
    if not tok_cls.startswith("CLIPTokenizer"):
        raise UsageError(f"{folder}/tokenizer: {tok_cls}: only CLIP tokenizers are supported")
    d = folder / "text_encoder"
    if not any(d.glob("*.safetensors")) and not any(d.glob("*.safetensors.index.json")):
        raise UsageError(f"{d}: no safetensors weights (pickle .bin checkpoints are not loaded)")
    model = transformers.CLIPTextModel.from_pretrained(
        str(d), use_safetensors=True, attn_implementation="eager"
    )
    model = model.eval().float()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder / "tokenizer"), use_fast=True)
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise UsageError(f"{folder}/tokenizer: no fast (tokenizers) form of this tokenizer")
    n_pos = int(model.config.max_position_embeddings)
    max_length = int(tok.model_max_length) if int(tok.model_max_length) <= n_pos else n_pos
    hidden = int(model.config.hidden_size)
    cross = int(ucfg.get("cross_attention_dim") or hidden)
    if hidden != cross:
        raise UsageError(f"{d}: hidden size {hidden} but the UNet's cross_attention_dim is {cross}")
    # StableDiffusionPipeline passes the mask only where the config asks for it (CLIP's does not)
    mask = bool(getattr(model.config, "use_attention_mask", False))
    spec = {
        "onnx": "text_encoder/model.onnx",
        "tokenizer": "text_encoder/tokenizer.json",
        "max_length": max_length,
        "hidden_size": hidden,
        "name": f"CLIPTextModel ({folder.name}/text_encoder)",
        "_attention_mask": mask,
    }
    return model, tok, spec


def tokenizer_file(tok, max_length: int):
    """The `tokenizers` Tokenizer of transformers' `tok`, padding and truncating to `max_length` as
    StableDiffusionPipeline asks transformers to: pad with the pad token (CLIP: <|endoftext|>)."""
    from tokenizers import Tokenizer

    bt = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    pad_token = tok.pad_token if tok.pad_token is not None else tok.eos_token
    pad_id = tok.convert_tokens_to_ids(pad_token)
    bt.enable_truncation(max_length)
    bt.enable_padding(length=max_length, pad_id=int(pad_id), pad_token=str(pad_token))
    return bt


def write_tokenizer(tok, path: Path, spec: dict) -> dict:
    """Write the tokenizer file and check it id for id against transformers' tokenizer on prompts
    that exercise case, whitespace, unknown characters, empty text and truncation."""
    bt = tokenizer_file(tok, spec["max_length"])
    for p in VERIFY_PROMPTS:
        want = tok(p, padding="max_length", max_length=spec["max_length"], truncation=True).input_ids
        got = bt.encode(p).ids
        if list(want) != list(got):
            raise UsageError(
                f"the tokenizer file disagrees with transformers' tokenizer on {p[:40]!r}: "
                f"{got[:12]}... vs {list(want)[:12]}...; not imported"
            )
    bt.save(str(path))
    return {
        "pad_token": bt.padding["pad_token"],
        "pad_id": bt.padding["pad_id"],
        "max_length": spec["max_length"],
    }


def export_clip_text(model, tok, out: Path, spec: dict, max_abs_err: float) -> float:
    """model.onnx (input_ids [B, L] int64, and attention_mask where the pipeline feeds one ->
    last_hidden_state [B, L, D]) in `out`, checked against PyTorch on tokenized prompts."""
    import onnxruntime as ort
    import torch  # tracing the encoder

    mask = spec["_attention_mask"]

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask=None):
            return self.m(input_ids, attention_mask=attention_mask).last_hidden_state

    names = ["input_ids", *(["attention_mask"] if mask else [])]
    enc = tok(list(VERIFY_PROMPTS[:2]), padding="max_length", max_length=spec["max_length"], truncation=True)
    trace = [torch.tensor(enc[n], dtype=torch.int64) for n in names]
    path = out / "model.onnx"
    dyn = {n: {0: "batch", 1: "length"} for n in [*names, "last_hidden_state"]}
    torch.onnx.export(
        Encoder(model).eval(),
        tuple(trace),
        str(path),
        opset_version=OPSET,
        dynamo=False,
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_axes=dyn,
        do_constant_folding=True,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    enc = tok(list(VERIFY_PROMPTS), padding="max_length", max_length=spec["max_length"], truncation=True)
    feeds = {n: np.asarray(enc[n], np.int64) for n in names}
    (got,) = sess.run(["last_hidden_state"], feeds)
    ref = Encoder(model)(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
    err = float(np.abs(got - ref).max())
    if not err <= max_abs_err * max(1.0, float(np.abs(ref).max())):
        raise RuntimeError(f"the text encoder's ONNX export disagrees with PyTorch: max abs err {err:.3g}")
    return err


# ------------------------------------------------------------------ the VAE


def _load_vae(folder: Path, comps: dict, latent_channels: int, res: int):
    import diffusers  # the VAE as diffusers loads it

    if comps["vae"] != "AutoencoderKL":
        raise UsageError(f"{folder}/vae: {comps['vae']}: only AutoencoderKL VAEs are exported yet")
    d = folder / "vae"
    if not any(d.glob("*.safetensors")) and not any(d.glob("*.safetensors.index.json")):
        raise UsageError(f"{d}: no safetensors weights (pickle .bin checkpoints are not loaded)")
    vae = diffusers.AutoencoderKL.from_pretrained(str(d), use_safetensors=True).eval().float()
    cfg = vae.config
    if int(cfg.latent_channels) != latent_channels:
        raise UsageError(
            f"{d}: latent_channels {cfg.latent_channels} but the UNet has {latent_channels} channels"
        )
    scale = 2 ** (len(cfg.block_out_channels) - 1)  # diffusers' vae_scale_factor
    spec = {
        "decoder": "vae/decoder.onnx",
        "encoder": "vae/encoder.onnx",
        "latent_channels": latent_channels,
        "scale": scale,
        "scaling_factor": float(cfg.scaling_factor),
        "shift_factor": float(getattr(cfg, "shift_factor", None) or 0.0),
        "name": f"AutoencoderKL ({folder.name}/vae)",
        "_resolution": res,
    }
    return vae, spec


def _export_fixed(module, x, path: Path, in_name: str, out_name: str, max_abs_err: float, rng) -> float:
    """Trace module(x) to ONNX (dynamic batch, shape arithmetic frozen) and check it on a new batch."""
    import onnxruntime as ort
    import torch  # tracing

    torch.onnx.export(
        module,
        (x,),
        str(path),
        opset_version=OPSET,
        dynamo=False,
        input_names=[in_name],
        output_names=[out_name],
        dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
        do_constant_folding=True,
    )
    freeze_shapes_file(path, strict=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = rng.standard_normal((3, *x.shape[1:])).astype(np.float32)
    (got,) = sess.run([out_name], {in_name: y})
    ref = module(torch.from_numpy(y)).numpy()
    err = float(np.abs(got - ref).max())
    if got.shape != ref.shape or not err <= max_abs_err * max(1.0, float(np.abs(ref).max())):
        raise RuntimeError(f"{path.name}: ONNX Runtime disagrees with PyTorch: max abs err {err:.3g}")
    return err


def export_vae(vae, out: Path, spec: dict, encoder: bool, max_abs_err: float) -> dict:
    """decoder.onnx (latent [B, C, h, w] -> image [B, 3, H, W]) and encoder.onnx (image -> the
    posterior's mean), checked against PyTorch; returns their max abs errors."""
    import torch  # tracing

    class Decoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, latent):
            return self.m.decode(latent).sample

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, image):
            return self.m.encode(image).latent_dist.mean

    rng = np.random.default_rng(0)
    r, c = spec["_resolution"], spec["latent_channels"]
    z = torch.from_numpy(rng.standard_normal((2, c, r, r)).astype(np.float32))
    errs = {
        "vae_decoder": _export_fixed(
            Decoder(vae).eval(), z, out / "decoder.onnx", "latent", "image", max_abs_err, rng
        )
    }
    if encoder:
        R = r * spec["scale"]
        img = torch.from_numpy(rng.uniform(-1, 1, (2, 3, R, R)).astype(np.float32))
        errs["vae_encoder"] = _export_fixed(
            Encoder(vae).eval(), img, out / "encoder.onnx", "image", "latent", max_abs_err, rng
        )
    return errs


__all__ = [
    "import_pipeline",
    "check_extra",
    "scheduler_entry",
    "tokenizer_file",
    "PIPELINE_DEFAULTS",
    "EXTRA",
]
