"""Quality against diversity for classifier guidance and classifier-free guidance on the bundled
digits package (issue 7; the trade-off figures of GLIDE, Nichol et al. 2022, Fig. 4, and of
Dhariwal & Nichol 2021).

Every point: n samples (n/10 per class, the same seed and so the same x_T at every point), dynamic
thresholding (the package's recommendation), the package's recommended sampler (DPM-Solver++ 2M,
25 steps) and, for classifier guidance, also DDPM with 100 steps (Dhariwal & Nichol's sampler):

- quality: accuracy of an independent RBF SVM trained on the real digits (pydiff.training.eval);
- diversity: mean pairwise L2 distance between samples of the same requested class (pixels in [0, 1]).

CFG: the network conditioned on the class, guidance scale s (s = 0: unconditional, s = 1: plain
conditional). Classifier guidance: the network unconditional, the noise-aware classifier's gradient
at scale s (s = 0: unconditional).

    python benchmarks/guidance_sweep.py            # ~7 min on 2 busy cores
writes benchmarks/results/guidance_sweep_digits.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

CFG_SCALES = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
CLASSIFIER_SCALES = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)
# (key, guidance type, sampler settings (None: the package's recommended), scales)
SERIES = (
    ("cfg", "cfg", None, CFG_SCALES),
    ("classifier", "classifier", None, CLASSIFIER_SCALES),
    # Dhariwal & Nichol's own sampler: DDPM, the mean shifted by Sigma * s * grad
    ("classifier_ddpm100", "classifier", {"sampler": "ddpm", "steps": 100}, (0.0, 2.0, 5.0, 10.0, 20.0, 40.0)),
)
HERE = Path(__file__).resolve().parent


def sweep(n_per_class: int = 10, seed: int = 0, steps: int | None = None, package="digits",
          log=print) -> dict:
    import pydiff.pipeline as P
    from pydiff.training.eval import digits_figures

    pipe = P.load(P.bundled_path(package) if package == "digits" else package)
    labels = np.repeat(np.arange(10), n_per_class)
    runs = {key: [] for key, *_ in SERIES}
    samples = {}
    for key, kind, sampler, scales in SERIES:
        for s in scales:
            kw = {"guidance_scale": s} if kind == "cfg" else {"guidance_type": "classifier",
                                                              "classifier_scale": s}
            if sampler:
                kw.update(sampler)
            elif steps:
                kw["steps"] = steps
            t0 = time.time()
            imgs = pipe.generate(class_label=[int(v) for v in labels], output_type="numpy",
                                 progress=False, seed=seed, **kw)
            fig = digits_figures(imgs[..., 0], labels, seed)
            pt = {"scale": s, "accuracy": fig["accuracy"],
                  "diversity": fig["mean_pairwise_distance_same_class"],
                  "nearest_training_distance_median": fig["nearest_training_distance_median"],
                  "seconds": round(time.time() - t0, 1)}
            runs[key].append(pt)
            samples[(key, s)] = imgs[::n_per_class, ..., 0]        # one per class
            log(f"{key:18s} scale {s:5.1f}: accuracy {pt['accuracy']:.3f} diversity "
                f"{pt['diversity']:.3f} ({pt['seconds']} s)")
    from sklearn.datasets import load_digits

    from pydiff.training.eval import digits_classifier

    d = load_digits()
    real = d.data / 16.0
    real_div = float(np.mean([_mean_pairwise(real[d.target == c]) for c in range(10)]))
    settings = dict(pipe.package.stages[0].recommended) | ({"steps": steps} if steps else {})
    return {"n": int(len(labels)), "seed": seed, "settings": settings,
            "series": {key: {"guidance_type": kind, "settings": sampler or settings}
                       for key, kind, sampler, _ in SERIES},
            "svm_real_test_accuracy": digits_classifier(seed)[1], "real_diversity": real_div,
            **runs}, samples


def _mean_pairwise(a: np.ndarray) -> float:
    dd = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))
    return float(dd.sum() / max(1, len(a) * (len(a) - 1)))


def sweep_shapes(package, n_prompts: int = 10, num_images: int = 4, seed: int = 0,
                 cfg_scales=(0.0, 1.0, 2.0, 3.0, 5.0), clip_scales=(0.0, 50.0, 100.0, 200.0, 400.0),
                 classifier_scales=(0.0, 3.0, 10.0, 30.0, 100.0), log=print) -> tuple[dict, dict]:
    """CFG, CLIP guidance and (if the package has one) classifier guidance on a shapes package (its first stage's output; 16x16 bases are
    upsampled bilinearly to 64x64 for the analytic reader): quality = fraction of images whose
    (shape colour, shape, background) read back as prompted; diversity = mean pairwise distance
    between the images of one prompt (pixels in [0, 1]), averaged over the prompts."""
    import pydiff.pipeline as P
    from pydiff import imageio
    from pydiff.training.eval import read_shape, shapes_prompts

    pipe = P.load(package)
    items = shapes_prompts(n_prompts, seed)["seen"]
    prompts = [c[0] for c in items]
    from pydiff.data import shapes as S

    series = [("cfg", cfg_scales), ("clip", clip_scales)]
    if pipe.package.guidance_model("classifier") is not None:
        series.append(("classifier", classifier_scales))
    combo_index = {c: i for i, c in enumerate(S.all_combos(include_held_out=True))}
    labels = [combo_index[c[1:]] for c in items]
    runs = {key: [] for key, _ in series}
    samples = {}
    for key, scales in series:
        for s in scales:
            if key == "cfg":
                kw = {"guidance_scale": s}
            elif key == "clip":
                kw = {"guidance_type": "clip", "clip_scale": s}
            else:   # the network on the empty prompt, the classifier on the combination's label
                kw = {"guidance_type": "classifier", "classifier_scale": s, "class_label": labels}
            t0 = time.time()
            imgs = pipe.generate(None if key == "classifier" else prompts, num_images=num_images,
                                 output_type="numpy", progress=False, seed=seed, **kw)   # [B, H, W, 3]
            x = imgs
            if x.shape[1] < 64:
                x = imageio.to_numpy(imageio.upsample_bilinear(
                    np.ascontiguousarray(imgs.transpose(0, 3, 1, 2) * 2 - 1, dtype=np.float32), 64))
            ok = {"all": 0, "fg": 0, "shape": 0, "bg": 0}
            for i, img in enumerate(x):
                _, fg, shape, bg = items[i // num_images]
                r = read_shape(img)
                hit = {"fg": r["fg"] == fg, "shape": r["shape"] == shape, "bg": r["bg"] == bg}
                for k, v in hit.items():
                    ok[k] += int(v)
                ok["all"] += int(all(hit.values()))
            flat = imgs.reshape(len(prompts), num_images, -1).astype(np.float64)
            div = float(np.mean([_mean_pairwise(f) for f in flat]))
            pt = {"scale": s, "accuracy": ok["all"] / len(x), **{k: v / len(x) for k, v in ok.items()},
                  "diversity": div, "seconds": round(time.time() - t0, 1)}
            runs[key].append(pt)
            samples[(key, s)] = imgs[::num_images][:10]
            log(f"{key:10s} scale {s:6.1f}: alignment {pt['all']:.3f} (fg {pt['fg']:.2f} shape "
                f"{pt['shape']:.2f} bg {pt['bg']:.2f}) diversity {div:.3f} ({pt['seconds']} s)")
    return {"n": len(prompts) * num_images, "n_prompts": len(prompts), "num_images": num_images,
            "title": f"shapes ({pipe.package.name}), {len(prompts)} prompts x {num_images} images per point",
            "quality_label": "quality: fraction read back as prompted (colour, shape, background)",
            "diversity_label": "diversity: mean pairwise distance between images of one prompt",
            "seed": seed, "package": str(pipe.package.path),
            "settings": dict(pipe.package.stages[0].recommended), **runs}, samples


def thresholding_comparison(package, n_prompts: int = 10, num_images: int = 4, seed: int = 0,
                            scales=(3.0, 8.0, 15.0), log=print) -> list[dict]:
    """Classifier-free guidance at large scales with thresholding none / static / dynamic (Imagen,
    Saharia et al. 2022, Sec. 2.3 and Fig. A.11): alignment and the fraction of saturated pixel
    values (|x| >= 0.99 in [-1, 1]; the shapes palette stays inside [-0.87, 0.98])."""
    import pydiff.pipeline as P
    from pydiff import imageio
    from pydiff.training.eval import read_shape, shapes_prompts

    pipe = P.load(package)
    items = shapes_prompts(n_prompts, seed)["seen"]
    prompts = [c[0] for c in items]
    out = []
    for s in scales:
        for th in ("none", "static", "dynamic"):
            t0 = time.time()
            imgs = pipe.generate(prompts, num_images=num_images, output_type="numpy", progress=False,
                                 seed=seed, guidance_scale=s, thresholding=th)
            x = imgs
            if x.shape[1] < 64:
                x = imageio.to_numpy(imageio.upsample_bilinear(
                    np.ascontiguousarray(imgs.transpose(0, 3, 1, 2) * 2 - 1, dtype=np.float32), 64))
            hits = 0
            for i, img in enumerate(x):
                _, fg, shape, bg = items[i // num_images]
                r = read_shape(img)
                hits += int(r["fg"] == fg and r["shape"] == shape and r["bg"] == bg)
            sat = float((np.abs(imgs * 2 - 1) >= 0.99).mean())
            pt = {"guidance_scale": s, "thresholding": th, "alignment": hits / len(x),
                  "saturated_fraction": sat, "seconds": round(time.time() - t0, 1)}
            out.append(pt)
            log(f"cfg {s:5.1f} thresholding {th:8s}: alignment {pt['alignment']:.3f} saturated "
                f"{sat:.3f} ({pt['seconds']} s)")
    return out


# ---------------------------------------------------------------- drawing (Pillow only)

COLOURS = {"cfg": (31, 119, 180), "classifier": (214, 39, 40), "classifier_ddpm100": (44, 160, 44),
           "clip": (148, 103, 189)}
NAMES = {"cfg": "classifier-free guidance, DPM-Solver++ 25", "classifier": "classifier guidance, DPM-Solver++ 25",
         "classifier_ddpm100": "classifier guidance, DDPM 100", "clip": "CLIP guidance, DPM-Solver++ 25"}
SHORT = {"cfg": "cfg", "classifier": "clf", "classifier_ddpm100": "clf ddpm", "clip": "clip"}


def plot(result: dict, samples: dict, path: str | Path) -> None:
    """Left: accuracy vs diversity, one curve per guidance type, points labelled by scale.
    Right: one sample per class (columns 0-9) at each point."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    keys = [k for k in COLOURS if k in result]
    W, H, m = 620, 520, 60
    rows = [(k, p["scale"]) for k in keys for p in result[k]]
    tile_px = 24
    gw = 10 * (tile_px + 2) + 80
    img = Image.new("RGB", (W + gw, max(H, 30 + len(rows) * (tile_px + 4))), "white")
    d = ImageDraw.Draw(img)
    pts = [p for k in keys for p in result[k]]
    real = result.get("real_diversity")
    x_lo = min([p["diversity"] for p in pts] + ([real] if real else [])) - 0.1
    x_hi = max([p["diversity"] for p in pts] + ([real] if real else [])) + 0.1
    y_lo, y_hi = 0.0, 1.02

    def xy(div, acc):
        return (m + (div - x_lo) / (x_hi - x_lo) * (W - 2 * m),
                H - m - (acc - y_lo) / (y_hi - y_lo) * (H - 2 * m))

    d.rectangle([m, m, W - m, H - m], outline="black")
    for v in np.arange(0, 1.01, 0.2):
        _, yy = xy(x_lo, v)
        d.line([m - 4, yy, m, yy], fill="black")
        d.text((m - 30, yy - 6), f"{v:.1f}", fill="black", font=font)
    step = next(v for v in (0.1, 0.25, 0.5, 1.0, 2.0, 5.0) if (x_hi - x_lo) / v <= 10)
    for v in np.arange(np.ceil(x_lo / step) * step, x_hi, step):
        xx, _ = xy(v, y_lo)
        d.line([xx, H - m, xx, H - m + 4], fill="black")
        d.text((xx - 10, H - m + 8), f"{v:.2f}", fill="black", font=font)
    d.text((W / 2 - 150, H - m + 26), result.get("diversity_label", "diversity: mean pairwise distance "
                                                 "within a class"), fill="black", font=font)
    d.text((8, m - 30), result.get("quality_label", "quality: SVM accuracy on samples"), fill="black", font=font)
    d.text((m, 10), result.get("title", f"bundled digits model, {result['n']} samples per point (the "
                                        f"same x_T at every point), dynamic thresholding"),
           fill="black", font=font)
    if result.get("note"):
        d.text((m, H - 18), result["note"][:110], fill=(180, 0, 0), font=font)
    if real:
        rx, _ = xy(real, 0)
        for yy in range(m, H - m, 8):
            d.line([rx, yy, rx, yy + 4], fill=(120, 120, 120))
        d.text((rx + 3, m + 4), "real digits", fill=(120, 120, 120), font=font)
    for k in keys:
        c = COLOURS[k]
        xys = [xy(p["diversity"], p["accuracy"]) for p in result[k]]
        d.line(xys, fill=c, width=2)
        for (px, py), p in zip(xys, result[k]):
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=c)
            d.text((px + 5, py - 12), f"{p['scale']:g}", fill=c, font=font)
    for i, k in enumerate(keys):
        d.line([W - m - 260, m + 14 + 16 * i, W - m - 240, m + 14 + 16 * i], fill=COLOURS[k], width=3)
        d.text((W - m - 235, m + 8 + 16 * i), NAMES[k], fill=COLOURS[k], font=font)
    # sample grid
    y = 20
    d.text((W + 80, 4), result.get("tiles_label", "one sample per class 0..9"), fill="black", font=font)
    for k, s in rows:
        d.text((W + 2, y + 6), f"{SHORT[k]} {s:g}", fill=COLOURS[k], font=font)
        for j, a in enumerate(samples[(k, s)]):
            tile = Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)).resize(
                (tile_px, tile_px), Image.NEAREST)
            img.paste(tile, (W + 80 + j * (tile_px + 2), y))
        y += tile_px + 4
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-per-class", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: the package's recommended")
    p.add_argument("--out", default=None,
                   help="path prefix: writes PREFIX.json and PREFIX.png (default "
                        "benchmarks/results/guidance_sweep_{digits,shapes})")
    p.add_argument("--shapes", metavar="PACKAGE",
                   help="sweep CFG and CLIP guidance (and compare thresholding at large CFG scales) on "
                        "this shapes package, which must carry a clip guidance model")
    p.add_argument("--clip-scales", default="0,30,100,300,1000")
    p.add_argument("--classifier-scales", default="0,3,10,30,100")
    p.add_argument("--base-only", action="store_true",
                   help="--shapes: run a copy of the package cut to its first stage (16x16; fast)")
    p.add_argument("--note", help="a note stored in the JSON (e.g. which runs the package came from)")
    p.add_argument("--n-prompts", type=int, default=10)
    p.add_argument("--num-images", type=int, default=4)
    a = p.parse_args(argv)
    t0 = time.time()
    if a.shapes:
        out = a.out or str(HERE / "results" / "guidance_sweep_shapes")
        package = a.shapes
        if a.base_only:
            import shutil
            import tempfile

            import pydiff.pipeline as P

            src = Path(a.shapes) if Path(a.shapes).exists() else P.bundled_path(a.shapes)
            package = str(Path(tempfile.mkdtemp(prefix="pydiff-sweep-")) / "base_only")
            shutil.copytree(src, package)
            m = json.loads((Path(package) / "manifest.json").read_text())
            m["name"] = m["name"] + "-base-only"
            m["stages"] = m["stages"][:1]
            (Path(package) / "manifest.json").write_text(json.dumps(m, indent=2))
        result, samples = sweep_shapes(package, a.n_prompts, a.num_images, a.seed,
                                       clip_scales=tuple(float(v) for v in a.clip_scales.split(",")),
                                       classifier_scales=tuple(float(v) for v in a.classifier_scales.split(",")))
        result["tiles_label"] = "one sample for each of the first 10 prompts"
        result["thresholding"] = thresholding_comparison(package, a.n_prompts, a.num_images, a.seed)
        result["seconds"] = round(time.time() - t0, 1)
        result["command"] = (f"python benchmarks/guidance_sweep.py --shapes {a.shapes}"
                             f"{' --base-only' if a.base_only else ''} --clip-scales "
                             f"{a.clip_scales} --classifier-scales {a.classifier_scales}")
        if a.note:
            result["note"] = a.note
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out + ".json").write_text(json.dumps(result, indent=1) + "\n")
        plot(result, samples, out + ".png")
        print(f"wrote {out}.json and {out}.png ({result['seconds']} s)")
        return 0
    a.out = a.out or str(HERE / "results" / "guidance_sweep_digits")
    result, samples = sweep(a.n_per_class, a.seed, a.steps)
    result["seconds"] = round(time.time() - t0, 1)
    result["command"] = "python benchmarks/guidance_sweep.py" + (
        f" --n-per-class {a.n_per_class}" if a.n_per_class != 10 else "") + (
        f" --seed {a.seed}" if a.seed else "") + (f" --steps {a.steps}" if a.steps else "")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, samples, a.out + ".png")
    print(f"wrote {a.out}.json and {a.out}.png ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
