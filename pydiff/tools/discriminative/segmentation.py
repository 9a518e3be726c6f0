"""Label-efficient segmentation on shapes (Baranchuk et al. 2022): per-pixel MLP ensembles on the
base stage's diffusion features, against a U-Net from scratch and the same MLPs on raw pixels.

Classes per pixel: 0 background, 1 + the index of the shape's kind in `SHAPES` (circle, square,
triangle). The labels are exact: the renderer's coverage, area-resized to the stage's 16x16 and
thresholded at one half. Training memory is bounded by `max_pixels` (a reservoir sample of the
labelled pixels' features, filled from the feature stream), not by the number of labelled images.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pydiff.discriminative import FeatureExtractor, PixelEnsemble
from pydiff.tools.data.shapes import SHAPES, _coverage, area_resize, render_batch, sample_specs
from pydiff.tools.discriminative.plots import line_plot

NUM_CLASSES = 1 + len(SHAPES)
CLASS_NAMES = ("background", *SHAPES)


def shapes_segmentation(seed: int, n: int, resolution: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """n rendered shapes images (float32 [n, 3, R, R] in [-1, 1]) and exact labels (int64 [n, R, R])."""
    specs = sample_specs(np.random.default_rng(seed), n, include_held_out=True)
    images = area_resize(render_batch(specs), resolution).astype(np.float32)
    cov = np.stack([_coverage(s.shape, s.x0, s.y0, s.side) for s in specs])[:, None]
    inside = area_resize(cov, resolution)[:, 0] > 0.5
    kind = np.array([1 + SHAPES.index(s.shape) for s in specs])[:, None, None]
    return images, np.where(inside, kind, 0).astype(np.int64)


class PixelReservoir:
    """A uniform sample of at most `capacity` (feature, label) pixels from a stream (Algorithm R,
    Vitter 1985): memory capacity * (D + 1) values whatever the stream's length."""

    def __init__(self, capacity: int, dim: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"max_pixels: expected a positive int, got {capacity}")
        self.x = np.empty((capacity, dim), np.float32)
        self.y = np.empty(capacity, np.int64)
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def add(self, feats: np.ndarray, labels: np.ndarray) -> None:
        """feats [B, D, H, W], labels [B, H, W]."""
        f = feats.transpose(0, 2, 3, 1).reshape(-1, feats.shape[1])
        y = labels.reshape(-1)
        cap = len(self.x)
        for i in range(len(y)):
            k = self.seen
            if k < cap:
                j = k
            else:
                j = int(self.rng.integers(k + 1))
                if j >= cap:
                    self.seen += 1
                    continue
            self.x[j], self.y[j] = f[i], y[i]
            self.seen += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.seen, len(self.x))
        return self.x[:n], self.y[:n]


def train_ensemble(
    x: np.ndarray, y: np.ndarray, members=5, hidden=(64, 32), steps=300, seed=0, meta=None
) -> PixelEnsemble:
    """`members` MLPs (D -> hidden -> K, ReLU), each from its own initialisation and batch order,
    Adam, lr 1e-3, batch 512, on standardised features."""
    torch.manual_seed(seed)
    mean = x.mean(0)
    std = x.std(0) + 1e-5
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(y)
    out = []
    for m in range(members):
        g = torch.Generator().manual_seed(seed * 1000 + m)
        dims = [x.shape[1], *hidden, NUM_CLASSES]
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers[:-1])
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in range(steps):
            idx = torch.randint(len(xt), (min(512, len(xt)),), generator=g)
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        lin = [mod for mod in net if isinstance(mod, torch.nn.Linear)]
        out.append([(mod.weight.detach().numpy().T.copy(), mod.bias.detach().numpy().copy()) for mod in lin])
    return PixelEnsemble(out, mean, std, meta)


def raw_pixel_features(images: np.ndarray) -> np.ndarray:
    """The raw-pixel baseline's features: the RGB values themselves, [B, 3, H, W]."""
    return np.asarray(images, np.float32)


class SmallUNet(torch.nn.Module):
    """Two-level U-Net (32, 64 channels) for the from-scratch baseline."""

    def __init__(self, cin=3, k=NUM_CLASSES, c=32):
        super().__init__()

        def block(a, b):
            return torch.nn.Sequential(
                torch.nn.Conv2d(a, b, 3, padding=1), torch.nn.GroupNorm(8, b), torch.nn.SiLU(),
                torch.nn.Conv2d(b, b, 3, padding=1), torch.nn.GroupNorm(8, b), torch.nn.SiLU(),
            )  # fmt: skip

        self.e1, self.e2 = block(cin, c), block(c, 2 * c)
        self.mid = block(2 * c, 2 * c)
        self.d2, self.d1 = block(4 * c, c), block(2 * c, c)
        self.out = torch.nn.Conv2d(c, k, 1)

    def forward(self, x):
        h1 = self.e1(x)
        h2 = self.e2(torch.nn.functional.avg_pool2d(h1, 2))
        m = self.mid(torch.nn.functional.avg_pool2d(h2, 2))
        u2 = self.d2(torch.cat([torch.nn.functional.interpolate(m, scale_factor=2), h2], 1))
        u1 = self.d1(torch.cat([torch.nn.functional.interpolate(u2, scale_factor=2), h1], 1))
        return self.out(u1)


def train_unet(images: np.ndarray, labels: np.ndarray, steps=400, seed=0) -> SmallUNet:
    """The from-scratch baseline on the same labelled images (random horizontal flips), Adam 2e-3."""
    torch.manual_seed(seed)
    net = SmallUNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for _ in range(steps):
        idx = torch.randint(len(x), (min(16, len(x)),))
        xb, yb = x[idx], y[idx]
        if torch.rand(()) < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def miou(pred: np.ndarray, truth: np.ndarray, k: int = NUM_CLASSES) -> tuple[float, list[float]]:
    """Mean over classes of |pred & truth| / |pred | truth| over all pixels; classes absent from
    both are skipped."""
    ious = []
    for c in range(k):
        p, t = pred == c, truth == c
        union = (p | t).sum()
        ious.append(float((p & t).sum() / union) if union else float("nan"))
    return float(np.nanmean(ious)), ious


def _stream(fx, images, labels, batch) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i in range(0, len(images), batch):
        yield fx(images[i : i + batch]), labels[i : i + batch]


def fit_diffusion_ensemble(fx: FeatureExtractor, images, labels, *, max_pixels=20000, batch=8, seed=0, **kw):
    """The ensemble on streamed features of the labelled images; returns (ensemble, reservoir)."""
    res = PixelReservoir(max_pixels, fx.channels, seed)
    for f, y in _stream(fx, images, labels, batch):
        res.add(f, y)
    x, y = res.arrays()
    meta = {"t": fx.t, "blocks": fx.blocks, "package": fx.package.name, "stage": fx.stage.name}
    return train_ensemble(x, y, seed=seed, meta=meta, **kw), res


def predict_stream(ens: PixelEnsemble, fx, images, batch=16):
    """(labels [N, H, W], disagreement [N, H, W]) over `images`, `batch` at a time."""
    outs = [
        ens.predict(fx(images[i : i + batch]) if fx else raw_pixel_features(images[i : i + batch]))
        for i in range(0, len(images), batch)
    ]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def evaluate(
    ns=(1, 5, 10, 20), seeds=(0, 1), test=100, t=(50, 150), blocks=(2, 3, 4, 5), members=5, log=print
) -> dict:
    """mIoU on `test` held-out images against the number of labelled images, for the three methods,
    each label draw (seed) shared by the three."""
    fx = FeatureExtractor("shapes", t=t, blocks=blocks, seed=0)
    x_test, y_test = shapes_segmentation(10_000, test)
    f_test = np.concatenate([fx(x_test[i : i + 16]) for i in range(0, test, 16)])
    rows = []
    for n in ns:
        for seed in seeds:
            x, y = shapes_segmentation(seed * 100 + n, n)
            t0 = time.perf_counter()
            ens, _ = fit_diffusion_ensemble(fx, x, y, seed=seed, members=members)
            pred, unc = ens.predict(f_test)
            m_diff, iou_diff = miou(pred, y_test)
            raw = train_ensemble(
                raw_pixel_features(x).transpose(0, 2, 3, 1).reshape(-1, 3),
                y.reshape(-1),
                members=members,
                seed=seed,
            )
            m_raw, _ = miou(raw.predict(raw_pixel_features(x_test))[0], y_test)
            unet = train_unet(x, y, seed=seed)
            with torch.no_grad():
                m_unet, _ = miou(unet(torch.from_numpy(x_test)).argmax(1).numpy(), y_test)
            row = {"n": n, "seed": seed, "diffusion_mlp": m_diff, "raw_pixel_mlp": m_raw, "unet_scratch": m_unet,
                   "diffusion_per_class": iou_diff, "seconds": time.perf_counter() - t0}  # fmt: skip
            log(f"N={n} seed={seed}: diffusion {m_diff:.3f}  raw pixels {m_raw:.3f}  U-Net {m_unet:.3f}")
            rows.append(row)
    summary = []
    for n in ns:
        r = [row for row in rows if row["n"] == n]
        summary.append({"n": n, **{k: {"mean": float(np.mean([x[k] for x in r])), "std": float(np.std([x[k] for x in r]))}
                                   for k in ("diffusion_mlp", "raw_pixel_mlp", "unet_scratch")}})  # fmt: skip
    return {
        "t": list(t),
        "blocks": list(blocks),
        "members": members,
        "test_images": test,
        "rows": rows,
        "summary": summary,
    }


PALETTE = np.array([[30, 30, 30], [230, 80, 60], [70, 160, 230], [240, 200, 60]], np.uint8)


def uncertainty_picture(path, k=6, n=5, t=(50, 150), blocks=(2, 3, 4, 5), seed=0, scale=6) -> None:
    """A PNG: for k held-out images, rows image / truth / prediction / disagreement (N labels)."""
    fx = FeatureExtractor("shapes", t=t, blocks=blocks, seed=0)
    x, y = shapes_segmentation(seed * 100 + n, n)
    ens, _ = fit_diffusion_ensemble(fx, x, y, seed=seed)
    xt, yt = shapes_segmentation(20_000, k)
    pred, unc = ens.predict(fx(xt))
    img = np.rint((xt.transpose(0, 2, 3, 1) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    heat = (unc / max(unc.max(), 1e-6) * 255).astype(np.uint8)
    rows = [img, PALETTE[yt], PALETTE[pred], np.stack([heat, heat // 3, 255 - heat], -1)]
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def benchmark(out_dir, ns=(1, 5, 10, 20), seeds=(0, 1), test=100, log=print) -> dict:
    """Write segmentation.json, segmentation_miou.png and segmentation_uncertainty.png to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate(ns=ns, seeds=seeds, test=test, log=log)
    (out / "segmentation.json").write_text(json.dumps(result, indent=1))
    s = result["summary"]
    series = {name: ([r[k]["mean"] for r in s], [r[k]["std"] for r in s])
              for name, k in (("diffusion MLPs", "diffusion_mlp"), ("U-Net scratch", "unet_scratch"), ("raw-pixel MLPs", "raw_pixel_mlp"))}  # fmt: skip
    line_plot(
        out / "segmentation_miou.png",
        list(ns),
        series,
        title="shapes 16x16: held-out mIoU vs labelled images",
        ylabel="N labels",
    )
    uncertainty_picture(out / "segmentation_uncertainty.png")
    return result
