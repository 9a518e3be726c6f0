"""Quality against diversity per guidance type and scale on a digits or shapes package: the
trade-off figures of GLIDE (Nichol et al. 2022, Fig. 4) and Dhariwal & Nichol (2021).

    pydiff eval guidance --dataset digits --out DIR      # DIR/guidance_sweep_digits.{json,png}

Every point of a series generates the same inputs from the same seed (so the same x_T), with the
package's recommended settings except the guidance:

- cfg: classifier-free guidance at scale s (0: unconditional, 1: plain conditional);
- classifier: the network unconditional, the package's noise-aware classifier's gradient at scale s;
- classifier_ddpm100: the same with Dhariwal & Nichol's own sampler (DDPM, 100 steps);
- clip: the network on the empty prompt, the package's CLIP model's gradient at scale s.

Quality and diversity per dataset:

- digits (n samples per class): quality = accuracy of an RBF SVM trained on the real digits
  (pydiff.tools.eval.packages.digits_figures); diversity = mean pairwise L2 distance between samples of one
  class (pixels in [0, 1]).
- shapes (n prompts x --num-images images): quality = fraction of images whose (shape colour, shape,
  background) read back as prompted (pydiff.tools.eval.packages.read_shape; images under 64x64 are
  upsampled bilinearly for the reader); diversity = mean pairwise distance between the images of one
  prompt. Also classifier-free guidance at large scales with thresholding none / static / dynamic
  (Imagen, Saharia et al. 2022, Sec. 2.3): quality and the fraction of saturated pixel values.

Needs no torch (ONNX Runtime); digits needs scikit-learn. Everything is validated before the first
image; the JSON and PNG are written (atomically) only when the whole sweep has run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import pydiff.pipeline as P
from pydiff import files, imageio
from pydiff.errors import UsageError
from pydiff.package import load_package
from pydiff.tools.data import shapes as S
from pydiff.tools.eval.packages import (
    _real_digits,
    digits_classifier,
    digits_figures,
    mean_pairwise_distance,
    read_shape,
    shapes_prompts,
)

DATASETS = ("digits", "shapes")
# type -> (the pipeline's guidance_type, fixed sampler settings; None: the package's, --steps applies)
TYPES = {
    "cfg": ("cfg", None),
    "classifier": ("classifier", None),
    "classifier_ddpm100": ("classifier", {"sampler": "ddpm", "steps": 100}),
    "clip": ("clip", None),
}
DEFAULT_TYPES = {
    "digits": ("cfg", "classifier", "classifier_ddpm100"),
    "shapes": ("cfg", "clip", "classifier"),
}
DEFAULT_SCALES = {
    "digits": {
        "cfg": (0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0),
        "classifier": (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0),
        "classifier_ddpm100": (0.0, 2.0, 5.0, 10.0, 20.0, 40.0),
        "clip": (0.0, 30.0, 100.0, 300.0, 1000.0),
    },
    "shapes": {
        "cfg": (0.0, 1.0, 2.0, 3.0, 5.0),
        "classifier": (0.0, 3.0, 10.0, 30.0, 100.0),
        "classifier_ddpm100": (0.0, 3.0, 10.0, 30.0, 100.0),
        "clip": (0.0, 30.0, 100.0, 300.0, 1000.0),
    },
}
DEFAULT_N = {"digits": 10, "shapes": 10}  # samples per class / prompts
THRESHOLDING_MODES = ("none", "static", "dynamic")
DEFAULT_THRESHOLDING_SCALES = {"digits": (), "shapes": (3.0, 8.0, 15.0)}


# ------------------------------------------------------------------------------- datasets


class _Digits:
    """Class-conditional 8x8 digits: n samples per class, scored by an SVM trained on real digits."""

    name = "digits"
    quality_label = "quality: SVM accuracy on samples"
    diversity_label = "diversity: mean pairwise distance within a class"
    tiles_label = "one sample per class 0..9"

    @staticmethod
    def check(pkg) -> None:
        first, last = pkg.stages[0], pkg.stages[-1]
        if (
            first.conditioning != "class"
            or (first.num_classes or 0) < 10
            or last.resolution != 8
            or last.channels != 1
        ):
            raise UsageError(
                f"--dataset digits: package {pkg.name!r} ({pkg.path}) is not a digits "
                f"model (class-conditional with >= 10 classes, 8x8, 1 channel)"
            )
        if importlib.util.find_spec("sklearn") is None:
            raise UsageError(
                "--dataset digits needs scikit-learn for its quality figure "
                "(pip install scikit-learn, or the extra pydiff[train])"
            )

    def __init__(self, n: int, num_images: int, seed: int):
        self.n_per_class, self.seed = n, seed
        self.labels = np.repeat(np.arange(10), n)
        self.n = len(self.labels)

    def inputs(self, kind: str) -> dict:
        return {"prompt": None, "class_label": [int(v) for v in self.labels], "num_images": 1}

    def score(self, imgs: np.ndarray) -> dict:
        fig = digits_figures(imgs[..., 0], self.labels, self.seed)
        return {
            "quality": fig["accuracy"],
            "diversity": fig["mean_pairwise_distance_same_class"],
            "nearest_training_distance_median": fig["nearest_training_distance_median"],
        }

    def tiles(self, imgs: np.ndarray) -> np.ndarray:
        return imgs[:: self.n_per_class, ..., 0]

    def describe(self) -> dict:

        return {
            "n_per_class": self.n_per_class,
            "svm_real_test_accuracy": digits_classifier(self.seed)[1],
            "real_diversity": _real_digits()[2],
        }


class _Shapes:
    """Text-conditional shapes: n seen prompts x num_images images, read back analytically."""

    name = "shapes"
    quality_label = "quality: fraction read back as prompted (colour, shape, background)"
    diversity_label = "diversity: mean pairwise distance between images of one prompt"
    tiles_label = "one sample for each of the first 10 prompts"

    @staticmethod
    def check(pkg) -> None:
        first = pkg.stages[0]
        if first.conditioning != "text" or first.channels != 3:
            raise UsageError(
                f"--dataset shapes: package {pkg.name!r} ({pkg.path}) is not a shapes "
                f"model (text-conditional, 3 channels)"
            )

    def __init__(self, n: int, num_images: int, seed: int):

        self.items = shapes_prompts(n, seed)["seen"]  # (caption, fg, shape, bg)
        self.prompts = [c[0] for c in self.items]
        combo_index = {c: i for i, c in enumerate(S.all_combos(include_held_out=True))}
        self.labels = [combo_index[c[1:]] for c in self.items]  # the classifier's classes
        self.num_images = num_images
        self.n = len(self.prompts) * num_images

    def inputs(self, kind: str) -> dict:
        if kind == "classifier":  # the network on the empty prompt, the classifier on the combination
            return {"prompt": None, "class_label": self.labels, "num_images": self.num_images}
        return {"prompt": self.prompts, "class_label": None, "num_images": self.num_images}

    def score(self, imgs: np.ndarray) -> dict:

        x = imgs
        if x.shape[1] < 64:
            x = imageio.to_numpy(
                imageio.upsample_bilinear(
                    np.ascontiguousarray(imgs.transpose(0, 3, 1, 2) * 2 - 1, dtype=np.float32), 64
                )
            )
        ok = {"all": 0, "fg": 0, "shape": 0, "bg": 0}
        for i, img in enumerate(x):
            _, fg, shape, bg = self.items[i // self.num_images]
            r = read_shape(img)
            hit = {"fg": r["fg"] == fg, "shape": r["shape"] == shape, "bg": r["bg"] == bg}
            for k, v in hit.items():
                ok[k] += int(v)
            ok["all"] += int(all(hit.values()))
        per_prompt = imgs.reshape(len(self.prompts), self.num_images, -1)
        return {
            "quality": ok["all"] / len(x),
            "diversity": float(np.mean([mean_pairwise_distance(f) for f in per_prompt])),
            **{k: ok[k] / len(x) for k in ("fg", "shape", "bg")},
        }

    def tiles(self, imgs: np.ndarray) -> np.ndarray:
        return imgs[:: self.num_images][:10]

    def describe(self) -> dict:
        return {"n_prompts": len(self.prompts), "num_images": self.num_images}


_DATASET_CLASSES = {"digits": _Digits, "shapes": _Shapes}


# ------------------------------------------------------------------------------- checks


def _checked_scales(values, flag: str, allow_empty: bool = False) -> tuple[float, ...]:
    """The scales as a tuple of floats, each once, in order; finite and >= 0."""
    out = []
    for v in values:
        s = float(v)
        if not math.isfinite(s) or s < 0:
            raise UsageError(f"{flag}: scales must be finite and >= 0, got {v!r}")
        if s not in out:
            out.append(s)
    if not out and not allow_empty:
        raise UsageError(f"{flag}: empty scale list")
    return tuple(out)


def _types(types, dataset: str, pkg) -> list[str]:
    available = {g.kind for g in pkg.guidance_models if g.stage in pkg.stage_names}
    if types is None:
        return [t for t in DEFAULT_TYPES[dataset] if TYPES[t][0] == "cfg" or TYPES[t][0] in available]
    out = []
    for t in types:
        if t not in TYPES:
            raise UsageError(f"--types: unknown guidance type {t!r} (choose from {', '.join(TYPES)})")
        kind = TYPES[t][0]
        if kind != "cfg" and kind not in available:
            have = ", ".join(sorted(available)) or "none"
            raise UsageError(
                f"--types {t}: package {pkg.name!r} ({pkg.path}) has no {kind} guidance "
                f"model (its guidance models: {have})"
            )
        if t not in out:
            out.append(t)
    if not out:
        raise UsageError("--types: empty list")
    return out


def _scales(scales, scales_by_type, types: list[str], dataset: str) -> dict[str, tuple[float, ...]]:
    plain = None if scales is None else _checked_scales(scales, "--scales")
    per_type = {}
    for t, ss in (scales_by_type or {}).items():
        ss = _checked_scales(ss, f"--scales {t}=")
        if t not in types:
            raise UsageError(
                f"--scales {t}={_fmt(ss)}: {t!r} is not among the swept types ({','.join(types)})"
            )
        per_type[t] = ss
    return {t: per_type.get(t, plain if plain is not None else DEFAULT_SCALES[dataset][t]) for t in types}


def _fmt(scales) -> str:
    return ",".join(f"{s:g}" for s in scales)


def _load_pipeline(model, dataset: str, base_only: bool):
    path = Path(model) if model else P.bundled_path(dataset)
    if model and not path.exists() and (P.bundled_path(model) / "manifest.json").is_file():
        path = P.bundled_path(model)  # a bundled package by name
    pkg = load_package(path)
    if base_only and len(pkg.stages) > 1:
        keep = pkg.stages[:1]
        pkg = dataclasses.replace(
            pkg,
            name=pkg.name + "-base-only",
            stages=keep,
            guidance_models=tuple(g for g in pkg.guidance_models if g.stage == keep[0].name),
        )
    return P.load(pkg)


def _command(
    *, dataset, model, types, scales, n, num_images, steps, seed, thresholding_scales, base_only, out
) -> str:
    """The `pydiff eval guidance` command that runs this sweep again (stored in its JSON)."""
    words = ["pydiff", "eval", "guidance", "--dataset", dataset]
    if model:
        words += ["--model", str(model)]
    words += ["--types", ",".join(types)]
    for t in types:
        words += ["--scales", f"{t}={_fmt(scales[t])}"]
    words += ["--n", str(n)] + (["--num-images", str(num_images)] if dataset == "shapes" else [])
    words += (["--steps", str(steps)] if steps is not None else []) + ["--seed", str(seed)]
    words += ["--thresholding-scales", _fmt(thresholding_scales) or "none"]
    words += ["--base-only"] if base_only else []
    words += ["--out", str(out)]
    return shlex.join(words)


def output_paths(out, dataset: str) -> tuple[Path, Path]:
    """(JSON, PNG) a sweep of `dataset` writes in the folder `out`."""
    stem = Path(out) / f"guidance_sweep_{dataset}"
    return stem.with_suffix(".json"), stem.with_suffix(".png")


# ------------------------------------------------------------------------------- the sweep


def sweep(
    *,
    out,
    dataset: str = "digits",
    model=None,
    types=None,
    scales=None,
    scales_by_type=None,
    n: int | None = None,
    num_images: int = 4,
    steps: int | None = None,
    seed: int = 0,
    thresholding_scales=None,
    base_only: bool = False,
    note: str | None = None,
    progress: bool = True,
) -> dict:
    """Validate everything, run every point, then write `output_paths(out, dataset)` (PNG, then the
    JSON as the sweep's record); returns what the JSON holds.

    dataset: "digits" or "shapes" (the scorer, and the bundled package used when `model` is None);
    types: guidance types from TYPES (default: the dataset's DEFAULT_TYPES the package has guidance
    models for); scales: the scales of every type, scales_by_type: {type: scales} for some (default
    DEFAULT_SCALES); n: digits samples per class, shapes prompts (default DEFAULT_N); num_images:
    shapes images per prompt; steps: sampling steps (default: the package's; classifier_ddpm100
    keeps 100); thresholding_scales: classifier-free scales at which thresholding none / static /
    dynamic are compared (default DEFAULT_THRESHOLDING_SCALES, () for none); base_only: the
    package's first stage alone; note: stored in the JSON and drawn on the PNG.
    Bad input raises UsageError (a ValueError) naming the `pydiff eval guidance` option."""
    if dataset not in DATASETS:
        raise UsageError(f"--dataset: unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    if n is None:
        n = DEFAULT_N[dataset]
    if dataset == "digits" and n < 2:
        raise UsageError(f"--n must be >= 2 (diversity needs two samples per class), got {n}")
    if n < 1:
        raise UsageError(f"--n must be >= 1, got {n}")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if dataset == "shapes" and num_images < 2:
        raise UsageError(
            f"--num-images must be >= 2 (diversity needs two images per prompt), got {num_images}"
        )
    th_scales = (
        DEFAULT_THRESHOLDING_SCALES[dataset]
        if thresholding_scales is None
        else _checked_scales(thresholding_scales, "--thresholding-scales", allow_empty=True)
    )
    cls = _DATASET_CLASSES[dataset]
    pipe = _load_pipeline(model, dataset, base_only)
    pkg = pipe.package
    cls.check(pkg)
    types = _types(types, dataset, pkg)
    scales = _scales(scales, scales_by_type, types, dataset)
    data = cls(n, num_images, seed)
    json_path, png_path = output_paths(out, dataset)

    # Every call planned (validated) before the first image: bad input costs nothing.
    common = {"output_type": "numpy", "progress": False, "seed": seed}
    steps_kw = {"steps": steps} if steps is not None else {}
    points = []  # (type or None for the thresholding comparison, scale, thresholding, plan)
    for t in types:
        kind, fixed = TYPES[t]
        for s in scales[t]:
            kw = {"guidance_scale": s} if kind == "cfg" else {"guidance_type": kind, f"{kind}_scale": s}
            points.append((t, s, None, pipe.plan(**data.inputs(kind), **common, **kw, **(fixed or steps_kw))))
    for s in th_scales:
        for th in THRESHOLDING_MODES:
            points.append(
                (
                    None,
                    s,
                    th,
                    pipe.plan(**data.inputs("cfg"), **common, guidance_scale=s, thresholding=th, **steps_kw),
                )
            )
    files.check_writable(json_path, "--out")
    files.check_writable(png_path, "--out")

    t_start = time.time()
    result_points = {t: [] for t in types}
    thresholding = []
    samples = {}
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)
    with tqdm(
        total=len(points),
        desc=f"guidance sweep ({dataset})",
        unit="point",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for t, s, th, plan in points:
            bar.set_postfix_str(f"{t or 'cfg'} {s:g}" + (f" {th}" if th else ""))
            t0 = time.time()
            imgs = pipe.execute(plan)  # float32 [B, H, W, C] in [0, 1]
            fig = data.score(imgs)
            seconds = round(time.time() - t0, 2)
            if th is None:
                result_points[t].append({"scale": s, **fig, "seconds": seconds})
                samples[(t, s)] = data.tiles(imgs)
                log(
                    f"{t:18s} scale {s:7g}: quality {fig['quality']:.3f} diversity "
                    f"{fig['diversity']:.3f} ({seconds} s)"
                )
            else:
                sat = float((np.abs(imgs * 2 - 1) >= 0.99).mean())
                thresholding.append(
                    {
                        "guidance_scale": s,
                        "thresholding": th,
                        "quality": fig["quality"],
                        "saturated_fraction": sat,
                        "seconds": seconds,
                    }
                )
                log(
                    f"cfg {s:7g} thresholding {th:8s}: quality {fig['quality']:.3f} saturated "
                    f"{sat:.3f} ({seconds} s)"
                )
            bar.update(1)

    settings = {k: v for k, v in pkg.stages[0].recommended.items() if k != "inpaint"} | steps_kw
    result = {
        "dataset": dataset,
        "package": str(pkg.path),
        "package_name": pkg.name,
        "stages": pkg.stage_names,
        "n": data.n,
        **data.describe(),
        "seed": seed,
        "settings": settings,
        "series": {
            t: {
                "guidance_type": TYPES[t][0],
                "settings": settings | (TYPES[t][1] or {}),
                "scales": list(scales[t]),
            }
            for t in types
        },
        "points": result_points,
        "thresholding": thresholding,
        "title": f"{pkg.name}: {data.n} samples per point (the same x_T at every point), "
        f"{settings.get('thresholding', 'no')} thresholding",
        "quality_label": data.quality_label,
        "diversity_label": data.diversity_label,
        "tiles_label": data.tiles_label,
        "command": _command(
            dataset=dataset,
            model=model,
            types=types,
            scales=scales,
            n=n,
            num_images=num_images,
            steps=steps,
            seed=seed,
            thresholding_scales=th_scales,
            base_only=base_only,
            out=out,
        ),
        "seconds": round(time.time() - t_start, 1),
    }
    if note:
        result["note"] = note
    image = plot(result, samples)
    imageio.save_png(image, png_path)  # each atomic; the JSON last, as the sweep's record
    files.write_json(result, json_path)
    return result


# ------------------------------------------------------------------------------- drawing (Pillow only)

COLOURS = {
    "cfg": (31, 119, 180),
    "classifier": (214, 39, 40),
    "classifier_ddpm100": (44, 160, 44),
    "clip": (148, 103, 189),
}
NAMES = {
    "cfg": "classifier-free guidance",
    "classifier": "classifier guidance",
    "classifier_ddpm100": "classifier guidance, DDPM 100",
    "clip": "CLIP guidance",
}
SHORT = {"cfg": "cfg", "classifier": "clf", "classifier_ddpm100": "clf ddpm", "clip": "clip"}


def plot(result: dict, samples: dict):
    """A PIL image. Left: quality against diversity, one curve per guidance type, points labelled by
    scale (and the thresholding comparison below, if any). Right: sample tiles at each point."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    series = result["points"]
    keys = [k for k in COLOURS if k in series]
    th = result.get("thresholding") or []
    W, H, m = 620, 520, 60
    th_h = 20 + 14 * len(th) if th else 0
    rows = [(k, p["scale"]) for k in keys for p in series[k]]
    tile_px = 24
    n_tiles = max([10, *(len(v) for v in samples.values())])
    gw = n_tiles * (tile_px + 2) + 80
    img = Image.new("RGB", (W + gw, max(H + th_h, 30 + len(rows) * (tile_px + 4))), "white")
    d = ImageDraw.Draw(img)
    pts = [p for k in keys for p in series[k]]
    real = result.get("real_diversity")
    divs = [p["diversity"] for p in pts] + ([real] if real else [])
    x_lo, x_hi = min(divs) - 0.1, max(divs) + 0.1
    y_lo, y_hi = 0.0, 1.02

    def xy(div, q):
        return (
            m + (div - x_lo) / (x_hi - x_lo) * (W - 2 * m),
            H - m - (q - y_lo) / (y_hi - y_lo) * (H - 2 * m),
        )

    d.rectangle([m, m, W - m, H - m], outline="black")
    for v in np.arange(0, 1.01, 0.2):
        _, yy = xy(x_lo, v)
        d.line([m - 4, yy, m, yy], fill="black")
        d.text((m - 30, yy - 6), f"{v:.1f}", fill="black", font=font)
    step = next(
        (v for v in (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0) if (x_hi - x_lo) / v <= 10),
        (x_hi - x_lo) / 10,
    )
    for v in np.arange(np.ceil(x_lo / step) * step, x_hi, step):
        xx, _ = xy(v, y_lo)
        d.line([xx, H - m, xx, H - m + 4], fill="black")
        d.text((xx - 10, H - m + 8), f"{v:.2f}", fill="black", font=font)
    d.text((W / 2 - 150, H - m + 26), result["diversity_label"], fill="black", font=font)
    d.text((8, m - 30), result["quality_label"], fill="black", font=font)
    d.text((m, 10), result["title"][:100], fill="black", font=font)
    if result.get("note"):
        d.text((m, H - 18), result["note"][:110], fill=(180, 0, 0), font=font)
    if real:
        rx, _ = xy(real, 0)
        for yy in range(m, H - m, 8):
            d.line([rx, yy, rx, yy + 4], fill=(120, 120, 120))
        d.text((rx + 3, H - m - 16), "real data", fill=(120, 120, 120), font=font)
    for k in keys:
        c = COLOURS[k]
        xys = [xy(p["diversity"], p["quality"]) for p in series[k]]
        if len(xys) > 1:
            d.line(xys, fill=c, width=2)
        for (px, py), p in zip(xys, series[k]):
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=c)
            d.text((px + 5, py - 12), f"{p['scale']:g}", fill=c, font=font)
    for i, k in enumerate(keys):
        d.line([W - m - 200, m + 14 + 16 * i, W - m - 180, m + 14 + 16 * i], fill=COLOURS[k], width=3)
        d.text((W - m - 175, m + 8 + 16 * i), NAMES[k], fill=COLOURS[k], font=font)
    if th:
        y = H + 4
        d.text(
            (m, y),
            "classifier-free guidance, thresholding: quality / saturated fraction",
            fill="black",
            font=font,
        )
        for p in th:
            y += 14
            d.text(
                (m, y),
                f"scale {p['guidance_scale']:g} {p['thresholding']:8s} "
                f"{p['quality']:.3f} / {p['saturated_fraction']:.3f}",
                fill="black",
                font=font,
            )
    y = 20
    d.text((W + 80, 4), result["tiles_label"], fill="black", font=font)
    for k, s in rows:
        d.text((W + 2, y + 6), f"{SHORT[k]} {s:g}", fill=COLOURS[k], font=font)
        for j, a in enumerate(samples[(k, s)]):
            tile = Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)).resize(
                (tile_px, tile_px), Image.NEAREST
            )
            img.paste(tile, (W + 80 + j * (tile_px + 2), y))
        y += tile_px + 4
    return img
