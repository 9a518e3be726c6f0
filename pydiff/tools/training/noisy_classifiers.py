"""Training of guidance models: the noise-aware digits classifier p(y | x_t, t) (Dhariwal & Nichol
2021, Sec. 4: a classifier trained on noised images x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at
uniformly drawn t, with the diffusion model's schedule).

``pydiff guidance train-classifier --out runs/digits_classifier``
writes ``model.safetensors`` (weights + config in the metadata; no pickle), ``config.json``,
``summary.json`` (held-out accuracy per t band) and ``train.log``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pydiff.tools.data import shapes as S
from pydiff.tools.data.digits import load_digits_images
from pydiff.tools.export.guidance_export import (
    add_guidance_model,
    export_classifier_gradient,
    export_clip_gradient,
)
from pydiff.tools.models.classifier import ClassifierConfig, NoisyClassifier, NoisyCLIP
from pydiff.tools.training.schedule import alphas_cumprod
from pydiff.tools.training.tasks import caption_embeddings

WEIGHTS = "model.safetensors"


@dataclass
class ClassifierTrainConfig:
    model: dict = field(default_factory=lambda: ClassifierConfig().to_dict())
    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    val_fraction: float = 0.2
    num_train_timesteps: int = 1000  # the bundled digits model's schedule
    beta_schedule: str = "squaredcos_cap_v2"
    shift: int = 1  # random translation by up to this many pixels
    threads: int = 1
    task: str = "digits"  # digits | shapes (class = (colour, shape, background))
    n_images: int = 6000  # shapes: pre-rendered training images (+ 600 held out)

    @classmethod
    def for_task(cls, task: str, **kw) -> "ClassifierTrainConfig":
        if task == "shapes":
            kw.setdefault(
                "model",
                ClassifierConfig(
                    in_channels=3,
                    resolution=16,
                    num_classes=len(S.all_combos(True)),
                    channels=(32, 64, 64, 64),
                ).to_dict(),
            )
            kw.setdefault("shift", 0)
        return cls(task=task, **kw)


def noised(x0, abar, lo: int, hi: int, g):
    """(x_t, t): x0 noised by q(x_t | x0) at t uniform in [lo, hi) (draws t, then the noise, from g)."""
    t = torch.randint(lo, hi, (len(x0),), generator=g)
    a = abar[t][:, None, None, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g), t


def _split(n: int, labels: np.ndarray, fraction: float, seed: int):
    """Stratified train / held-out indices."""
    rng = np.random.default_rng(seed + 12345)
    tr, va = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * fraction))
        va.extend(idx[:k])
        tr.extend(idx[k:])
    return np.sort(np.array(tr)), np.sort(np.array(va))


def _shift(x: torch.Tensor, rng: np.random.Generator, k: int) -> torch.Tensor:
    """Translate each image by up to k pixels (background -1 fills in)."""
    if k <= 0:
        return x
    out = torch.full_like(x, -1.0)
    H, W = x.shape[2:]
    for i, (dy, dx) in enumerate(rng.integers(-k, k + 1, size=(len(x), 2))):
        ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
        xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
        out[i, :, yd, xd] = x[i, :, ys, xs]
    return out


def save_classifier(model: NoisyClassifier, path: str | Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    meta = {"config": json.dumps(model.cfg.to_dict()), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


def load_classifier(path: str | Path) -> NoisyClassifier:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model = NoisyClassifier(ClassifierConfig.from_dict(json.loads(meta["config"])))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def accuracy_by_t(
    model, x0, y, abar, bands=((0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)), seed: int = 0
) -> dict:
    """Held-out accuracy on x_t at t drawn uniformly inside each band."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for lo, hi in bands:
        xt, t = noised(x0, abar, lo, hi, g)
        out[f"t{lo}-{hi}"] = float((model(xt, t.float()).argmax(1) == y).float().mean())
    return out


def train_classifier(
    cfg: ClassifierTrainConfig, out: str | Path, command: str | None = None, log=print
) -> dict:

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.task == "shapes":
        # class = index of (colour, shape, background) in shapes.all_combos(include_held_out=True);
        # the held-out combinations are never rendered, so the classifier never sees them
        rng0 = np.random.default_rng(cfg.seed)
        x_all, c_all = _shapes_images(cfg.n_images + 600, rng0, cfg.model["resolution"])
        xtr, ytr = x_all[: cfg.n_images], torch.from_numpy(c_all[: cfg.n_images])
        xva, yva = x_all[cfg.n_images :], torch.from_numpy(c_all[cfg.n_images :])
        tr, va = range(len(xtr)), range(len(xva))
    else:
        x, y = load_digits_images()
        tr, va = _split(len(x), y, cfg.val_fraction, cfg.seed)
        xtr, ytr = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
        xva, yva = torch.from_numpy(x[va]), torch.from_numpy(y[va])
    abar = torch.from_numpy(alphas_cumprod(cfg.num_train_timesteps, cfg.beta_schedule)).float()
    model = NoisyClassifier(ClassifierConfig.from_dict(cfg.model))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    rng = np.random.default_rng(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    logf = open(out / "train.log", "a")
    t0 = time.time()
    losses = []
    for step in range(1, cfg.steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(xtr), cfg.batch_size))
        x0 = _shift(xtr[idx], rng, cfg.shift)
        xt, t = noised(x0, abar, 0, cfg.num_train_timesteps, g)
        loss = F.cross_entropy(model(xt, t.float()), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == cfg.steps:
            model.eval()
            acc = accuracy_by_t(model, xva, yva, abar)
            model.train()
            line = (
                f"step {step} loss {np.mean(losses[-250:]):.4f} val_acc "
                + " ".join(f"{k}:{v:.3f}" for k, v in acc.items())
                + f" {time.time() - t0:.0f}s"
            )
            log(line)
            print(line, file=logf, flush=True)
    model.eval()
    summary = {
        "command": command,
        "steps": cfg.steps,
        "seconds": round(time.time() - t0, 1),
        "final_loss_last250": float(np.mean(losses[-250:])),
        "held_out_accuracy_by_t": accuracy_by_t(model, xva, yva, abar, seed=1),
        "n_train": int(len(tr)),
        "n_held_out": int(len(va)),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    save_classifier(model, out / WEIGHTS, {"train": asdict(cfg)})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    logf.close()
    return summary


# ---------------------------------------------------------------- noise-aware CLIP (shapes)


@dataclass
class ClipTrainConfig:
    model: dict = field(
        default_factory=lambda: ClassifierConfig(
            in_channels=3, resolution=16, num_classes=64, channels=(32, 64, 64, 64)
        ).to_dict()
    )
    text_encoder: str = "runs/text_encoder"
    max_length: int = 16
    n_images: int = 6000  # pre-rendered training images (16x16)
    n_held_out: int = 600
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    num_train_timesteps: int = 1000  # the shapes base stage's schedule
    beta_schedule: str = "squaredcos_cap_v2"
    threads: int = 1


def _shapes_images(n: int, rng: np.random.Generator, resolution: int):

    specs = S.sample_specs(rng, n)
    imgs = S.area_resize(S.render_batch(specs), resolution)
    combos = S.all_combos(include_held_out=True)
    ci = {c: i for i, c in enumerate(combos)}
    return torch.from_numpy(imgs.astype(np.float32)), np.array([ci[(s.fg, s.shape, s.bg)] for s in specs])


def save_clip(model, path: str | Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    meta = {
        "config": json.dumps(model.image.cfg.to_dict()),
        "text_dim": str(model.text_proj.in_features),
        **{k: json.dumps(v) for k, v in (extra or {}).items()},
    }
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


def load_clip(path: str | Path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model = NoisyCLIP(ClassifierConfig.from_dict(json.loads(meta["config"])), int(meta["text_dim"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def clip_retrieval_by_t(
    model,
    x0,
    combo,
    text_emb,
    abar,
    seed: int = 0,
    bands=((0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)),
) -> dict:
    """Accuracy of picking an image's (colour, shape, background) among all 168 template-0 captions."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for lo, hi in bands:
        xt, t = noised(x0, abar, lo, hi, g)
        pick = (model.encode_image(xt, t.float()) @ text_emb.T).argmax(1).numpy()
        out[f"t{lo}-{hi}"] = float((pick == combo).mean())
    return out


def train_clip(cfg: ClipTrainConfig, out: str | Path, command: str | None = None, log=print) -> dict:
    """Contrastive training (CLIP's symmetric cross-entropy; captions of the same combination are
    all positives) of a noise-aware image encoder against the frozen text encoder's pooled states."""

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    captions, states, mask = caption_embeddings(
        cfg.text_encoder, cfg.max_length, out / "caption_embeddings.safetensors"
    )
    states, mask = torch.from_numpy(states), torch.from_numpy(mask)
    index = {c: i for i, c in enumerate(captions)}
    combos = S.all_combos(include_held_out=True)
    # caption row of (combo, template)
    cap_row = torch.tensor(
        [[index[S.caption(*c, template=k)] for k in range(len(S.TEMPLATES))] for c in combos]
    )
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    x_all, c_all = _shapes_images(cfg.n_images + cfg.n_held_out, rng, cfg.model["resolution"])
    log(f"rendered {len(x_all)} images in {time.time() - t0:.0f}s")
    xtr, ctr = x_all[: cfg.n_images], c_all[: cfg.n_images]
    xva, cva = x_all[cfg.n_images :], c_all[cfg.n_images :]
    abar = torch.from_numpy(alphas_cumprod(cfg.num_train_timesteps, cfg.beta_schedule)).float()
    model = NoisyCLIP(ClassifierConfig.from_dict(cfg.model), states.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    logf = open(out / "train.log", "a")
    losses = []
    for step in range(1, cfg.steps + 1):
        idx = rng.integers(0, len(xtr), cfg.batch_size)
        x0 = xtr[idx]
        combo = torch.from_numpy(ctr[idx])
        rows = cap_row[combo, torch.from_numpy(rng.integers(0, len(S.TEMPLATES), cfg.batch_size))]
        xt, t = noised(x0, abar, 0, cfg.num_train_timesteps, g)
        logits = (
            model.logit_scale.exp().clamp(max=100)
            * model.encode_image(xt, t.float())
            @ model.encode_text(states[rows], mask[rows]).T
        )
        same = (combo[:, None] == combo[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (
            -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == cfg.steps:
            model.eval()
            with torch.no_grad():
                temb = model.encode_text(states[cap_row[:, 0]], mask[cap_row[:, 0]])
            acc = clip_retrieval_by_t(model, xva, cva, temb, abar)
            model.train()
            line = (
                f"step {step} loss {np.mean(losses[-250:]):.4f} val_retrieval "
                + " ".join(f"{k}:{v:.3f}" for k, v in acc.items())
                + f" {time.time() - t0:.0f}s"
            )
            log(line)
            print(line, file=logf, flush=True)
    model.eval()
    with torch.no_grad():
        temb = model.encode_text(states[cap_row[:, 0]], mask[cap_row[:, 0]])
    summary = {
        "command": command,
        "steps": cfg.steps,
        "seconds": round(time.time() - t0, 1),
        "final_loss_last250": float(np.mean(losses[-250:])),
        "held_out_retrieval_168_by_t": clip_retrieval_by_t(model, xva, cva, temb, abar, seed=1),
        "n_train_images": cfg.n_images,
        "n_held_out_images": cfg.n_held_out,
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    save_clip(model, out / WEIGHTS, {"train": asdict(cfg)})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    logf.close()
    return summary


def _nparams(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def export_clip(
    run: str | Path,
    out: str | Path,
    package: str | Path | None = None,
    name: str = "clip",
    scale: float = 100.0,
) -> dict:
    """ONNX of grad_x f(x_t, t) . g(c) for the CLIP run `run` at `out`, checked against autograd;
    with `package`, also a guidance_models entry in its manifest (recommended scale `scale`).
    Returns the export's check figures."""
    torch.set_num_threads(1)
    model = load_clip(Path(run) / WEIGHTS)
    rep = export_clip_gradient(model, out)
    if package:
        add_guidance_model(
            package,
            out,
            name=name,
            kind="clip",
            model=model,
            recommended={"scale": scale},
            description=f"noise-aware CLIP image encoder ({_nparams(model)} parameters) "
            f"against the frozen text encoder's pooled states",
        )
    return rep


def export_classifier(
    run: str | Path,
    out: str | Path,
    package: str | Path | None = None,
    name: str = "classifier",
    scale: float = 10.0,
) -> dict:
    """ONNX of the input gradient of the classifier run `run` at `out`, checked against autograd;
    with `package`, also a guidance_models entry in its manifest (recommended scale `scale`; a
    shapes classifier's classes named by their captions). Returns the export's check figures."""
    torch.set_num_threads(1)
    rep = export_classifier_gradient(load_classifier(Path(run) / WEIGHTS), out)
    if package:
        model = load_classifier(Path(run) / WEIGHTS)
        task = json.loads((Path(run) / "config.json").read_text()).get("task", "digits")
        names = None
        if task == "shapes":
            names = [S.caption(*c, template=0) for c in S.all_combos(include_held_out=True)]
        add_guidance_model(
            package,
            out,
            name=name,
            kind="classifier",
            model=model,
            recommended={"scale": scale},
            class_names=names,
            description=f"noise-aware CNN p(y | x_t, t), {round(_nparams(model) / 1000)}k "
            f"parameters, trained on noised {task} (squaredcos_cap_v2, "
            f"1000 steps)"
            + (
                "; class = (colour, shape, background), "
                "named by class_names; the 12 held-out "
                "combinations were never seen"
                if task == "shapes"
                else ""
            ),
        )
    return rep
