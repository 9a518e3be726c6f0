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
  (pydiff.training.eval.digits_figures); diversity = mean pairwise L2 distance between samples of one
  class (pixels in [0, 1]).
- shapes (n prompts x --num-images images): quality = fraction of images whose (shape colour, shape,
  background) read back as prompted (pydiff.training.eval.read_shape; images under 64x64 are
  upsampled bilinearly for the reader); diversity = mean pairwise distance between the images of one
  prompt. Also classifier-free guidance at large scales with thresholding none / static / dynamic
  (Imagen, Saharia et al. 2022, Sec. 2.3): quality and the fraction of saturated pixel values.

Needs no torch (ONNX Runtime); digits needs scikit-learn. Everything is validated before the first
image; the JSON and PNG are written (atomically) only when the whole sweep has run.
"""
from __future__ import annotations

import importlib.util
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

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
DEFAULT_TYPES = {"digits": ("cfg", "classifier", "classifier_ddpm100"),
                 "shapes": ("cfg", "clip", "classifier")}
DEFAULT_SCALES = {
    "digits": {"cfg": (0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0),
               "classifier": (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0),
               "classifier_ddpm100": (0.0, 2.0, 5.0, 10.0, 20.0, 40.0),
               "clip": (0.0, 30.0, 100.0, 300.0, 1000.0)},
    "shapes": {"cfg": (0.0, 1.0, 2.0, 3.0, 5.0),
               "classifier": (0.0, 3.0, 10.0, 30.0, 100.0),
               "classifier_ddpm100": (0.0, 3.0, 10.0, 30.0, 100.0),
               "clip": (0.0, 30.0, 100.0, 300.0, 1000.0)},
}
DEFAULT_N = {"digits": 10, "shapes": 10}   # samples per class / prompts
THRESHOLDING_MODES = ("none", "static", "dynamic")
DEFAULT_THRESHOLDING_SCALES = {"digits": (), "shapes": (3.0, 8.0, 15.0)}


def _usage_error(msg: str) -> Exception:

    return UsageError(msg)


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
        if first.conditioning != "class" or (first.num_classes or 0) < 10 \
                or last.resolution != 8 or last.channels != 1:
            raise _usage_error(f"--dataset digits: package {pkg.name!r} ({pkg.path}) is not a digits "
                               f"model (class-conditional with >= 10 classes, 8x8, 1 channel)")
        if importlib.util.find_spec("sklearn") is None:
            raise _usage_error("--dataset digits needs scikit-learn for its quality figure "
                               "(pip install scikit-learn, or the extra pydiff[train])")

    def __init__(self, n: int, num_images: int, seed: int):
        self.n_per_class, self.seed = n, seed
        self.labels = np.repeat(np.arange(10), n)
        self.n = len(self.labels)

    def inputs(self, kind: str) -> dict:
        return {"prompt": None, "class_label": [int(v) for v in self.labels], "num_images": 1}

    def score(self, imgs: np.ndarray) -> dict:
        fig = digits_figures(imgs[..., 0], self.labels, self.seed)
        return {"quality": fig["accuracy"], "diversity": fig["mean_pairwise_distance_same_class"],
                "nearest_training_distance_median": fig["nearest_training_distance_median"]}

    def tiles(self, imgs: np.ndarray) -> np.ndarray:
        return imgs[::self.n_per_class, ..., 0]

    def describe(self) -> dict:

        return {"n_per_class": self.n_per_class, "svm_real_test_accuracy": digits_classifier(self.seed)[1],
                "real_diversity": _real_digits()[2]}


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
            raise _usage_error(f"--dataset shapes: package {pkg.name!r} ({pkg.path}) is not a shapes "
                               f"model (text-conditional, 3 channels)")

    def __init__(self, n: int, num_images: int, seed: int):

        self.items = shapes_prompts(n, seed)["seen"]           # (caption, fg, shape, bg)
        self.prompts = [c[0] for c in self.items]
        combo_index = {c: i for i, c in enumerate(S.all_combos(include_held_out=True))}
        self.labels = [combo_index[c[1:]] for c in self.items]  # the classifier's classes
        self.num_images = num_images
        self.n = len(self.prompts) * num_images

    def inputs(self, kind: str) -> dict:
        if kind == "classifier":   # the network on the empty prompt, the classifier on the combination
            return {"prompt": None, "class_label": self.labels, "num_images": self.num_images}
        return {"prompt": self.prompts, "class_label": None, "num_images": self.num_images}

    def score(self, imgs: np.ndarray) -> dict:

        x = imgs
        if x.shape[1] < 64:
            x = imageio.to_numpy(imageio.upsample_bilinear(
                np.ascontiguousarray(imgs.transpose(0, 3, 1, 2) * 2 - 1, dtype=np.float32), 64))
        ok = {"all": 0, "fg": 0, "shape": 0, "bg": 0}
        for i, img in enumerate(x):
            _, fg, shape, bg = self.items[i // self.num_images]
            r = read_shape(img)
            hit = {"fg": r["fg"] == fg, "shape": r["shape"] == shape, "bg": r["bg"] == bg}
            for k, v in hit.items():
                ok[k] += int(v)
            ok["all"] += int(all(hit.values()))
        per_prompt = imgs.reshape(len(self.prompts), self.num_images, -1)
        return {"quality": ok["all"] / len(x),
                "diversity": float(np.mean([mean_pairwise_distance(f) for f in per_prompt])),
                **{k: ok[k] / len(x) for k in ("fg", "shape", "bg")}}

    def tiles(self, imgs: np.ndarray) -> np.ndarray:
        return imgs[::self.num_images][:10]

    def describe(self) -> dict:
        return {"n_prompts": len(self.prompts), "num_images": self.num_images}


_DATASET_CLASSES = {"digits": _Digits, "shapes": _Shapes}


# ------------------------------------------------------------------------------- arguments


def add_arguments(p) -> None:
    """The arguments of `pydiff eval guidance`."""
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="which scorer, and the bundled package used by default (default: digits)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="package directory or bundled name (default: the bundled DATASET package)")
    p.add_argument("--types", default=None, metavar="T[,T...]",
                   help=f"guidance types to sweep, from {', '.join(TYPES)} (default: digits "
                        f"{','.join(DEFAULT_TYPES['digits'])}; shapes {','.join(DEFAULT_TYPES['shapes'])}; "
                        f"those the package has guidance models for)")
    p.add_argument("--scales", action="append", default=None, metavar="[TYPE=]S[,S...]",
                   help="guidance scales; a plain list applies to every type, TYPE=list to one; "
                        "repeatable (default: " + "; ".join(
                            f"{d} " + " ".join(f"{t}={','.join(f'{v:g}' for v in ss)}" for t, ss in per.items())
                            for d, per in DEFAULT_SCALES.items()) + ")")
    p.add_argument("--n", type=int, default=None,
                   help="digits: samples per class; shapes: prompts (default 10)")
    p.add_argument("--num-images", type=int, default=4, metavar="K",
                   help="shapes: images per prompt (default 4)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the package's recommended; classifier_ddpm100 keeps 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thresholding-scales", default=None, metavar="S[,S...]|none",
                   help="classifier-free scales at which to compare thresholding none / static / dynamic "
                        "(default: shapes 3,8,15; digits none)")
    p.add_argument("--base-only", action="store_true",
                   help="run only the package's first stage (shapes: 16x16, fast)")
    p.add_argument("--note", default=None, help="a note stored in the JSON and drawn on the PNG")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for guidance_sweep_DATASET.json and .png (made if needed)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or per-point lines")


def _scale_list(text: str, flag: str) -> tuple[float, ...]:
    parts = [v.strip() for v in text.split(",")]
    if not any(parts):
        raise _usage_error(f"{flag} {text!r}: empty scale list")
    out = []
    for v in parts:
        try:
            s = float(v)
        except ValueError:
            raise _usage_error(f"{flag} {text!r}: invalid scale {v!r}") from None
        if not math.isfinite(s) or s < 0:
            raise _usage_error(f"{flag} {text!r}: scales must be finite and >= 0, got {v!r}")
        if s not in out:
            out.append(s)
    return tuple(out)


def _types(a, pkg) -> list[str]:
    available = {g.kind for g in pkg.guidance_models if g.stage in pkg.stage_names}
    if a.types is None:
        return [t for t in DEFAULT_TYPES[a.dataset] if TYPES[t][0] == "cfg" or TYPES[t][0] in available]
    types = []
    for t in (v.strip() for v in a.types.split(",")):
        if not t:
            continue
        if t not in TYPES:
            raise _usage_error(f"--types: unknown guidance type {t!r} (choose from {', '.join(TYPES)})")
        kind = TYPES[t][0]
        if kind != "cfg" and kind not in available:
            have = ", ".join(sorted(available)) or "none"
            raise _usage_error(f"--types {t}: package {pkg.name!r} ({pkg.path}) has no {kind} guidance "
                               f"model (its guidance models: {have})")
        if t not in types:
            types.append(t)
    if not types:
        raise _usage_error("--types: empty list")
    return types


def _scales(a, types: list[str]) -> dict[str, tuple[float, ...]]:
    plain, per_type = None, {}
    for v in a.scales or []:
        head, eq, rest = v.partition("=")
        if eq:
            t = head.strip()
            if t not in types:
                raise _usage_error(f"--scales {v}: {t!r} is not among the swept types ({','.join(types)})")
            if t in per_type:
                raise _usage_error(f"--scales: {t} given twice")
            per_type[t] = _scale_list(rest, f"--scales {t}=")
        else:
            if plain is not None:
                raise _usage_error("--scales: give one plain list (for every type) at most")
            plain = _scale_list(v, "--scales")
    return {t: per_type.get(t, plain if plain is not None else DEFAULT_SCALES[a.dataset][t]) for t in types}


def _load_pipeline(a):
    import dataclasses



    path = Path(a.model) if a.model else P.bundled_path(a.dataset)
    if a.model and not path.exists() and (P.bundled_path(a.model) / "manifest.json").is_file():
        path = P.bundled_path(a.model)     # a bundled package by name
    pkg = load_package(path)
    if a.base_only and len(pkg.stages) > 1:
        keep = pkg.stages[:1]
        pkg = dataclasses.replace(pkg, name=pkg.name + "-base-only", stages=keep,
                                  guidance_models=tuple(g for g in pkg.guidance_models
                                                        if g.stage == keep[0].name))
    return P.load(pkg)


def _command(a, types, scales, thresholding_scales) -> str:
    def fmt(ss):
        return ",".join(f"{s:g}" for s in ss)

    words = ["pydiff", "eval", "guidance", "--dataset", a.dataset]
    if a.model:
        words += ["--model", a.model]
    words += ["--types", ",".join(types)]
    for t in types:
        words += ["--scales", f"{t}={fmt(scales[t])}"]
    words += ["--n", str(a.n)] + (["--num-images", str(a.num_images)] if a.dataset == "shapes" else [])
    words += (["--steps", str(a.steps)] if a.steps is not None else []) + ["--seed", str(a.seed)]
    words += ["--thresholding-scales", fmt(thresholding_scales) or "none"]
    words += ["--base-only"] if a.base_only else []
    words += ["--out", a.out]
    return shlex.join(words)


# ------------------------------------------------------------------------------- the sweep


def run(a) -> int:
    """`pydiff eval guidance`: validate everything, run every point, then write JSON + PNG."""
    from tqdm import tqdm


    if a.n is None:
        a.n = DEFAULT_N[a.dataset]
    if a.dataset == "digits" and a.n < 2:
        raise _usage_error(f"--n must be >= 2 (diversity needs two samples per class), got {a.n}")
    if a.n < 1:
        raise _usage_error(f"--n must be >= 1, got {a.n}")
    if a.steps is not None and a.steps < 1:
        raise _usage_error(f"--steps must be >= 1, got {a.steps}")
    if a.dataset == "shapes" and a.num_images < 2:
        raise _usage_error(f"--num-images must be >= 2 (diversity needs two images per prompt), "
                           f"got {a.num_images}")
    if a.thresholding_scales is None:
        th_scales = DEFAULT_THRESHOLDING_SCALES[a.dataset]
    elif a.thresholding_scales.strip().lower() == "none":
        th_scales = ()
    else:
        th_scales = _scale_list(a.thresholding_scales, "--thresholding-scales")
    cls = _DATASET_CLASSES[a.dataset]
    pipe = _load_pipeline(a)
    pkg = pipe.package
    cls.check(pkg)
    types = _types(a, pkg)
    scales = _scales(a, types)
    data = cls(a.n, a.num_images, a.seed)
    stem = Path(a.out) / f"guidance_sweep_{a.dataset}"
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")

    # Every call planned (validated) before the first image: bad input costs nothing.
    common = {"output_type": "numpy", "progress": False, "seed": a.seed}
    steps = {"steps": a.steps} if a.steps is not None else {}
    points = []   # (type or None for the thresholding comparison, scale, thresholding, plan)
    for t in types:
        kind, fixed = TYPES[t]
        for s in scales[t]:
            kw = {"guidance_scale": s} if kind == "cfg" else {"guidance_type": kind, f"{kind}_scale": s}
            points.append((t, s, None, pipe.plan(**data.inputs(kind), **common, **kw, **(fixed or steps))))
    for s in th_scales:
        for th in THRESHOLDING_MODES:
            points.append((None, s, th, pipe.plan(**data.inputs("cfg"), **common, guidance_scale=s,
                                                  thresholding=th, **steps)))
    files.check_writable(json_path, "--out")
    files.check_writable(png_path, "--out")

    t_start = time.time()
    result_points = {t: [] for t in types}
    thresholding = []
    samples = {}
    log = (lambda msg: None) if a.quiet else (lambda msg: tqdm.write(msg, file=sys.stderr))
    with tqdm(total=len(points), desc=f"guidance sweep ({a.dataset})", unit="point", file=sys.stderr,
              disable=a.quiet, dynamic_ncols=True) as bar:
        for t, s, th, plan in points:
            bar.set_postfix_str(f"{t or 'cfg'} {s:g}" + (f" {th}" if th else ""))
            t0 = time.time()
            imgs = pipe.execute(plan)                          # float32 [B, H, W, C] in [0, 1]
            fig = data.score(imgs)
            seconds = round(time.time() - t0, 2)
            if th is None:
                result_points[t].append({"scale": s, **fig, "seconds": seconds})
                samples[(t, s)] = data.tiles(imgs)
                log(f"{t:18s} scale {s:7g}: quality {fig['quality']:.3f} diversity "
                    f"{fig['diversity']:.3f} ({seconds} s)")
            else:
                sat = float((np.abs(imgs * 2 - 1) >= 0.99).mean())
                thresholding.append({"guidance_scale": s, "thresholding": th, "quality": fig["quality"],
                                     "saturated_fraction": sat, "seconds": seconds})
                log(f"cfg {s:7g} thresholding {th:8s}: quality {fig['quality']:.3f} saturated "
                    f"{sat:.3f} ({seconds} s)")
            bar.update(1)

    settings = {k: v for k, v in pkg.stages[0].recommended.items() if k != "inpaint"} | steps
    result = {
        "dataset": a.dataset, "package": str(pkg.path), "package_name": pkg.name,
        "stages": pkg.stage_names, "n": data.n, **data.describe(), "seed": a.seed,
        "settings": settings,
        "series": {t: {"guidance_type": TYPES[t][0], "settings": settings | (TYPES[t][1] or {}),
                       "scales": list(scales[t])} for t in types},
        "points": result_points,
        "thresholding": thresholding,
        "title": f"{pkg.name}: {data.n} samples per point (the same x_T at every point), "
                 f"{settings.get('thresholding', 'no')} thresholding",
        "quality_label": data.quality_label, "diversity_label": data.diversity_label,
        "tiles_label": data.tiles_label,
        "command": _command(a, types, scales, th_scales),
        "seconds": round(time.time() - t_start, 1),
    }
    if a.note:
        result["note"] = a.note
    image = plot(result, samples)
    imageio.save_png(image, png_path)       # each atomic; the JSON last, as the sweep's record
    files.write_json(result, json_path)
    if not a.quiet:
        print(f"wrote {json_path} and {png_path} ({result['seconds']} s)", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------- drawing (Pillow only)

COLOURS = {"cfg": (31, 119, 180), "classifier": (214, 39, 40), "classifier_ddpm100": (44, 160, 44),
           "clip": (148, 103, 189)}
NAMES = {"cfg": "classifier-free guidance", "classifier": "classifier guidance",
         "classifier_ddpm100": "classifier guidance, DDPM 100", "clip": "CLIP guidance"}
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
        return (m + (div - x_lo) / (x_hi - x_lo) * (W - 2 * m),
                H - m - (q - y_lo) / (y_hi - y_lo) * (H - 2 * m))

    d.rectangle([m, m, W - m, H - m], outline="black")
    for v in np.arange(0, 1.01, 0.2):
        _, yy = xy(x_lo, v)
        d.line([m - 4, yy, m, yy], fill="black")
        d.text((m - 30, yy - 6), f"{v:.1f}", fill="black", font=font)
    step = next((v for v in (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0)
                 if (x_hi - x_lo) / v <= 10), (x_hi - x_lo) / 10)
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
        d.text((m, y), "classifier-free guidance, thresholding: quality / saturated fraction",
               fill="black", font=font)
        for p in th:
            y += 14
            d.text((m, y), f"scale {p['guidance_scale']:g} {p['thresholding']:8s} "
                           f"{p['quality']:.3f} / {p['saturated_fraction']:.3f}", fill="black", font=font)
    y = 20
    d.text((W + 80, 4), result["tiles_label"], fill="black", font=font)
    for k, s in rows:
        d.text((W + 2, y + 6), f"{SHORT[k]} {s:g}", fill=COLOURS[k], font=font)
        for j, a in enumerate(samples[(k, s)]):
            tile = Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)).resize(
                (tile_px, tile_px), Image.NEAREST)
            img.paste(tile, (W + 80 + j * (tile_px + 2), y))
        y += tile_px + 4
    return img
