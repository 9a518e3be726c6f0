"""Training data streams: each task draws a batch dict (x0 plus the stage's conditioning inputs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pydiff import imageio
from pydiff.backends.text_encoder import TextEncoder
from pydiff.tools.data import shapes as S
from pydiff.tools.data.digits import load_digits_images
from pydiff.tools.training.schedule import alphas_cumprod


class DigitsTask:
    """sklearn digits, 8x8, class-conditional; label 10 = unconditional (dropout)."""

    resolution = 8

    def __init__(self, cfg):

        x, y = load_digits_images()
        self.x = torch.from_numpy(x)
        self.y = torch.from_numpy(y)
        self.num_classes = 10
        self.cond_drop = cfg.cond_drop

    def batch(self, rng: np.random.Generator, n: int) -> dict:
        idx = rng.integers(0, len(self.x), size=n)
        labels = self.y[idx].clone()
        drop = torch.from_numpy(rng.random(n) < self.cond_drop)
        labels[drop] = self.num_classes
        return {"x0": self.x[idx], "class_labels": labels}


def caption_embeddings(text_encoder_dir: str | Path, max_length: int, cache: str | Path | None = None):
    """Encode every shapes caption and "" once with the shipped ONNX encoder.

    Returns (captions list, states float32 [N, L, D], mask float32 [N, L]); the last row is "".
    """
    from safetensors.numpy import load_file, save_file

    d = Path(text_encoder_dir)
    digest = hashlib.sha256((d / "model.onnx").read_bytes()).hexdigest()
    captions = S.all_captions(include_held_out=True) + [""]
    if cache is not None and Path(cache).exists():
        t = load_file(str(cache))
        meta = json.loads(Path(str(cache) + ".json").read_text())
        # "encode" is absent from caches written by the batched encoding of the first bundled runs
        if (
            meta["sha256"] == digest
            and meta["captions"] == captions
            and meta["max_length"] == max_length
            and meta.get("encode") == "per_prompt"
        ):
            return captions, t["states"], t["mask"]
    enc = TextEncoder(str(d / "model.onnx"), str(d / "tokenizer.json"), max_length)
    # one caption at a time, as inference encodes (TextEncoder.encode): the int8 encoder quantises
    # per run, so captions encoded together would change each other (the first bundled stages were
    # trained on captions encoded 64 at a time; pydiff/bundled/shapes/TRAINING.md)
    states, masks = enc.encode(captions)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        save_file({"states": states, "mask": masks}, str(cache))
        Path(str(cache) + ".json").write_text(
            json.dumps(
                {"sha256": digest, "captions": captions, "max_length": max_length, "encode": "per_prompt"}
            )
        )
    return captions, states, masks


MASK_KINDS = ("box", "shape_box", "shape_half", "half", "strokes", "all")
MASK_WEIGHTS = (0.25, 0.2, 0.15, 0.15, 0.15, 0.1)


def occlusion_masks(rng: np.random.Generator, specs: list, size: int = S.SIZE) -> np.ndarray:
    """Random regions to regenerate, float32 [n, 1, 64, 64], 1 = generate (the pipeline's `mask`).

    The kinds (MASK_KINDS, drawn with MASK_WEIGHTS): a random box (sides 12-48 px); the shape's
    bounding box with a 4 px margin (a replaced shape) or its right half from the centre (a
    completed one), as `pydiff eval shapes-inpaint` asks; one half of the image (uncropping);
    2-4 thick strokes; the whole image (plain generation, so the model still generates alone)."""
    n = len(specs)
    out = np.zeros((n, 1, size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for i, sp in enumerate(specs):
        kind = MASK_KINDS[int(rng.choice(len(MASK_KINDS), p=MASK_WEIGHTS))]
        m = out[i, 0]
        if kind == "box":
            h, w = rng.integers(12, 49, size=2)
            top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            m[top : top + h, left : left + w] = 1
        elif kind in ("shape_box", "shape_half"):
            top, bottom = int(max(0, np.floor(sp.y0 - 4))), int(min(size, np.ceil(sp.y0 + sp.side + 4)))
            left, right = int(max(0, np.floor(sp.x0 - 4))), int(min(size, np.ceil(sp.x0 + sp.side + 4)))
            if kind == "shape_half":
                left = int(round(sp.x0 + sp.side / 2))
            m[top:bottom, left:right] = 1
        elif kind == "half":
            side = int(rng.integers(4))
            if side == 0:
                m[:, size // 2 :] = 1
            elif side == 1:
                m[:, : size // 2] = 1
            elif side == 2:
                m[size // 2 :, :] = 1
            else:
                m[: size // 2, :] = 1
        elif kind == "strokes":
            for _ in range(int(rng.integers(2, 5))):
                (ax, ay), (bx, by) = rng.uniform(0, size, size=(2, 2))
                width = rng.uniform(3, 8)
                d = np.array([bx - ax, by - ay])
                u = np.clip(((xx - ax) * d[0] + (yy - ay) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
                dist = np.hypot(xx - (ax + u * d[0]), yy - (ay + u * d[1]))
                m[dist <= width / 2] = 1
        else:
            m[:] = 1
    return out


def mask_at(mask64: np.ndarray, size: int) -> np.ndarray:
    """A 64x64 mask at a stage's resolution as the pipeline makes it: a pixel is regenerated
    when at least half of it is (pydiff.pipeline.conditioning.resized)."""
    if size == mask64.shape[-1]:
        return mask64
    return (S.area_resize(mask64, size) >= 0.5).astype(np.float32)


class ShapesTask:
    """The shapes set; base stages get the image area-resized, SR stages a noise-augmented low-res.
    Inpainting stages (cfg.inpaint) also get `mask` (1 = generate) and `masked_image` (x0 where it
    is kept, 0 where it is generated), GLIDE's extra input channels."""

    def __init__(self, cfg, run_dir: Path | None):
        self.cfg = cfg
        self.inpaint = bool(getattr(cfg, "inpaint", False))
        self.colorize = cfg.task == "shapes-colorize"
        self.resolution = cfg.resolution
        cache = (run_dir / "caption_embeddings.safetensors") if run_dir is not None else None
        self.captions, states, mask = caption_embeddings(cfg.text_encoder, cfg.max_length, cache)
        self.states = torch.from_numpy(states)
        self.mask = torch.from_numpy(mask)
        self.index = {c: i for i, c in enumerate(self.captions)}
        self.empty = len(self.captions) - 1
        self.sr = cfg.low_res_resolution is not None
        if self.sr:
            ac = alphas_cumprod(cfg.num_train_timesteps, cfg.beta_schedule)
            self.aug_abar = torch.from_numpy(ac).float()

    def batch(self, rng: np.random.Generator, n: int) -> dict:
        cfg = self.cfg
        specs = S.sample_specs(rng, n)
        img = torch.from_numpy(S.render_batch(specs))  # [n, 3, 64, 64]
        templates = rng.integers(0, len(S.TEMPLATES), size=n)
        idx = np.array([self.index[S.caption(s.fg, s.shape, s.bg, int(k))] for s, k in zip(specs, templates)])
        idx[rng.random(n) < cfg.cond_drop] = self.empty
        out = {"encoder_hidden_states": self.states[idx], "encoder_attention_mask": self.mask[idx]}
        x = torch.from_numpy(S.area_resize(img.numpy(), cfg.resolution)) if cfg.resolution != 64 else img
        mask = None
        if self.inpaint:
            mask = torch.from_numpy(mask_at(occlusion_masks(rng, specs), cfg.resolution))
        if self.colorize:  # Palette: the colour image from its grey, at full resolution, on crops
            grey = torch.from_numpy(imageio.to_grey(x.numpy()))
            if cfg.crop:
                c = cfg.crop
                ys = rng.integers(0, cfg.resolution - c + 1, size=n)
                xs = rng.integers(0, cfg.resolution - c + 1, size=n)
                x = torch.stack([x[i, :, y : y + c, z : z + c] for i, (y, z) in enumerate(zip(ys, xs))])
                grey = torch.stack([grey[i, :, y : y + c, z : z + c] for i, (y, z) in enumerate(zip(ys, xs))])
            out.update(x0=x, image_condition=grey)
            return out
        if not self.sr:
            out["x0"] = x
            if mask is not None:
                out.update(mask=mask, masked_image=x * (1 - mask))
            return out
        low = torch.from_numpy(S.area_resize(img.numpy(), cfg.low_res_resolution))
        up = F.interpolate(low, size=(cfg.resolution, cfg.resolution), mode="bilinear", align_corners=False)
        level = torch.from_numpy(rng.integers(0, cfg.max_noise_level + 1, size=n))
        a = self.aug_abar[level][:, None, None, None]
        noise = torch.from_numpy(rng.standard_normal(up.shape).astype(np.float32))
        low_res = a.sqrt() * up + (1 - a).sqrt() * noise
        if cfg.crop:
            c = cfg.crop
            ys = rng.integers(0, cfg.resolution - c + 1, size=n)
            xs = rng.integers(0, cfg.resolution - c + 1, size=n)
            x = torch.stack([x[i, :, y : y + c, z : z + c] for i, (y, z) in enumerate(zip(ys, xs))])
            low_res = torch.stack(
                [low_res[i, :, y : y + c, z : z + c] for i, (y, z) in enumerate(zip(ys, xs))]
            )
            if mask is not None:
                mask = torch.stack([mask[i, :, y : y + c, z : z + c] for i, (y, z) in enumerate(zip(ys, xs))])
        out.update(x0=x, low_res=low_res, noise_level=level.float())
        if mask is not None:
            out.update(mask=mask, masked_image=x * (1 - mask))
        return out


def make_task(cfg, run_dir: Path | None):
    if cfg.task == "digits":
        return DigitsTask(cfg)
    if cfg.task in (
        "shapes-base",
        "shapes-sr64",
        "shapes-base-inpaint",
        "shapes-sr64-inpaint",
        "shapes-colorize",
    ):
        return ShapesTask(cfg, run_dir)
    raise ValueError(f"unknown task {cfg.task!r}")
