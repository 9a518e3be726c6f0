"""Evaluators for the bundled models (no torch, no learned model for shapes).

shapes: read (shape colour, shape, background) back from a 64x64 image analytically: the border
colour gives the background, the pixels far from it are the foreground, their median colour the
shape colour, and the fill ratio of the foreground's bounding box the shape (disk pi/4 ~ 0.785,
square 1.0, triangle 0.5).
digits: accuracy of a scikit-learn classifier trained on the real digits, plus diversity (mean
pairwise distance) and memorisation (distance to the nearest training image) figures.
The guidance sweep (`pydiff eval guidance`) built on these: pydiff.tools.eval.guidance_sweep.
`pydiff eval WHAT` runs each of them.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from pydiff import imageio
from pydiff.pipeline import bundled_path, load
from pydiff.tools.data import shapes as S

_NAMES = list(S.PALETTE)
_RGB = np.array([S.PALETTE[n] for n in _NAMES], dtype=np.float64)


def nearest_colour(rgb) -> str:
    d = ((_RGB - np.asarray(rgb, dtype=np.float64)) ** 2).sum(-1)
    return _NAMES[int(np.argmin(d))]


def _distance_to(a: np.ndarray, colour: str) -> np.ndarray:
    """Per-pixel RGB distance of a float [H, W, 3] image in 0..255 to a palette colour."""
    return np.sqrt(((a - _RGB[_NAMES.index(colour)]) ** 2).sum(-1))


def foreground(img, bg: str) -> np.ndarray:
    """bool [H, W]: the pixels of an image (uint8, or float in [0, 1]) far from palette colour bg."""
    a = np.asarray(img).astype(np.float64)
    a = a * 255.0 if np.asarray(img).dtype != np.uint8 else a
    return _distance_to(a, bg) > 45.0


def read_shape(img) -> dict:
    """Analyse one image (uint8 [H, W, 3] or float [H, W, 3] in [0, 1]).

    Returns {"fg", "shape", "bg", "fill", "area"}; "shape" is None when no foreground is found.
    """
    a = np.asarray(img)
    a = a.astype(np.float64) * (255.0 if a.dtype != np.uint8 and a.max() <= 1.0 + 1e-6 else 1.0)
    h, w, _ = a.shape
    b = max(1, h // 32)
    border = np.concatenate(
        [a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3), a[:, -b:].reshape(-1, 3)]
    )
    bg_rgb = np.median(border, axis=0)
    bg = nearest_colour(bg_rgb)
    dist = _distance_to(a, bg)
    mask = dist > 45.0  # palette colours are >= 85 apart; jitter is <= 8 per channel
    # Drop stray pixels: keep rows/columns with at least 2 foreground pixels for the box.
    rows = np.where(mask.sum(1) >= 2)[0]
    cols = np.where(mask.sum(0) >= 2)[0]
    area = int(mask.sum())
    if area < 16 or len(rows) == 0 or len(cols) == 0:
        return {"fg": None, "shape": None, "bg": bg, "fill": 0.0, "area": area}
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = mask[y0:y1, x0:x1]
    # Anti-aliased edge pixels count fractionally, by how far they are from the background.
    core = dist[y0:y1, x0:x1]
    fg_rgb = np.median(a[y0:y1, x0:x1][box & (core >= np.percentile(core[box], 50))], axis=0)
    fg_dist = np.sqrt(((fg_rgb - _RGB[_NAMES.index(bg)]) ** 2).sum())
    frac = np.clip(core / max(fg_dist, 1e-6), 0, 1)
    frac = np.where(frac > 0.15, frac, 0.0)  # ignore faint noise around the shape
    # Sub-pixel box: height = sum over rows of the row's largest coverage (same for width).
    height = float(frac.max(1).sum())
    width = float(frac.max(0).sum())
    fill = float(frac.sum() / max(height * width, 1e-6))
    aspect = height / max(width, 1e-6)
    fg = nearest_colour(fg_rgb)
    if fill < 0.68:
        shape = "triangle"
    elif fill < 0.905:
        shape = "circle"
    else:
        shape = "square"
    return {"fg": fg, "shape": shape, "bg": bg, "fill": fill, "area": area, "aspect": float(aspect)}


def shapes_prompts(n_per_split: int, seed: int = 0) -> dict[str, list[tuple[str, str, str, str]]]:
    """(caption, fg, shape, bg) lists for "seen" and "held_out" combos, template 0 captions."""
    rng = np.random.default_rng(seed)
    seen = S.all_combos(include_held_out=False)
    held = sorted(S.HELD_OUT)
    out = {}
    for split, combos in (("seen", seen), ("held_out", held)):
        picks = (
            [combos[i % len(combos)] for i in rng.permutation(max(n_per_split, len(combos)))][:n_per_split]
            if split == "seen"
            else [combos[i % len(combos)] for i in range(n_per_split)]
        )
        out[split] = [(S.caption(*c, template=0), *c) for c in picks]
    return out


def evaluate_shapes(
    package=None,
    n_per_split: int = 200,
    batch: int = 25,
    seed: int = 0,
    save_grid: str | None = None,
    **settings,
) -> dict:
    """Generate n_per_split images for seen and for held-out prompts; report alignment."""

    pipe = load(package)
    report: dict = {}
    grid = []
    t0 = time.time()
    for split, items in shapes_prompts(n_per_split, seed).items():
        ok = {"all": 0, "fg": 0, "shape": 0, "bg": 0}
        for i in range(0, len(items), batch):
            chunk = items[i : i + batch]
            imgs = pipe.generate(
                [c[0] for c in chunk], output_type="numpy", progress=False, seed=seed + i, **settings
            )
            for img, (_, fg, shape, bg) in zip(imgs, chunk):
                r = read_shape(img)
                hit = {"fg": r["fg"] == fg, "shape": r["shape"] == shape, "bg": r["bg"] == bg}
                for k, v in hit.items():
                    ok[k] += int(v)
                ok["all"] += int(all(hit.values()))
            if len(grid) < 64:
                grid.extend(imgs[: 64 - len(grid)])
        n = len(items)
        report[split] = {k: v / n for k, v in ok.items()} | {"n": n}
    report["seconds"] = round(time.time() - t0, 1)
    report["settings"] = settings
    if save_grid:
        save_image_grid(np.stack(grid), save_grid)
    return report


def evaluate_shapes_sr(
    package=None,
    n: int = 40,
    seed: int = 0,
    stage: str | None = None,
    save_grid: str | None = None,
    **settings,
) -> dict:
    """The super-resolution stage alone: upscale n rendered training images area-resized to the
    stage's low resolution, with their captions, and compare with the originals.

    Reports the alignment read back from the 64x64 outputs and their PSNR against the originals,
    beside the same figures for plain bilinear upsampling of the same inputs (the floor an SR stage
    should beat on alignment; PSNR favours the blur of bilinear, so it is context, not a target)."""

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    pipe = load(package)
    st = next((x for x in pipe.package.stages if x.is_super_resolution and stage in (None, x.name)), None)
    if st is None:
        raise ValueError(
            f"{pipe.package.path}: no super-resolution stage" + (f" named {stage!r}" if stage else "")
        )
    specs = S.sample_specs(np.random.default_rng(seed), n)
    hi = S.render_batch(specs)  # [n, 3, 64, 64] in [-1, 1]
    if hi.shape[-1] != st.resolution:
        raise ValueError(
            f"stage {st.name!r} is {st.resolution}x{st.resolution}; the shapes set is "
            f"{hi.shape[-1]}x{hi.shape[-1]}"
        )
    low = S.area_resize(hi, st.low_res_resolution)
    ref = imageio.to_numpy(hi)
    first = imageio.to_numpy(low[:1])[0]
    used = (
        pipe.plan(kind="upscale", prompt="", image=first, stage=st.name, **settings)
        .settings[st.name]
        .as_dict()
    )  # what the stage runs with, defaults too
    t0 = time.time()
    out = np.concatenate(
        [
            pipe.upscale(
                imageio.to_numpy(low[i : i + 1])[0],
                S.caption(sp.fg, sp.shape, sp.bg, 0),
                stage=st.name,
                output_type="numpy",
                progress=False,
                seed=seed + i,
                **settings,
            )
            for i, sp in enumerate(specs)
        ]
    )
    seconds = time.time() - t0
    bilinear = imageio.to_numpy(np.clip(imageio.upsample_bilinear(low, st.resolution), -1, 1))

    def figures(imgs):
        ok = sum(
            all(read_shape(im)[k] == getattr(sp, k) for k in ("fg", "shape", "bg"))
            for im, sp in zip(imgs, specs)
        )
        mse = float(np.mean((imgs.astype(np.float64) - ref) ** 2))
        return {"alignment": ok / n, "psnr_db": round(float(10 * np.log10(1.0 / mse)), 2)}

    if save_grid:  # originals, bilinear, SR: 8 per row
        k = min(8, n)
        save_image_grid(np.concatenate([ref[:k], bilinear[:k], out[:k]]), save_grid, cols=k)
    return {
        "stage": st.name,
        "n": n,
        "sr": figures(out),
        "bilinear": figures(bilinear),
        "seconds": round(seconds, 1),
        "settings": used,
    }


# Palette colours whose BT.601 grey levels are this close (on [0, 1]) cannot be told apart from the
# grey image alone: red 0.368, purple 0.387 and blue 0.329 are one such group; the others are >= 0.08
# from every other colour.
GREY_AMBIGUITY = 0.06


def grey_level(colour: str) -> float:
    """A palette colour's BT.601 luma on [0, 1]."""
    return float(np.dot(imageio.LUMA, _RGB[_NAMES.index(colour)] / 255.0))


def grey_twins(colour: str) -> set[str]:
    """The palette colours (itself included) within GREY_AMBIGUITY of `colour`'s grey level."""
    g = grey_level(colour)
    return {c for c in _NAMES if abs(grey_level(c) - g) < GREY_AMBIGUITY}


def evaluate_shapes_colorize(
    package, n: int = 100, seed: int = 0, save_grid: str | None = None, **settings
) -> dict:
    """Colorization: n rendered shapes images as grey, coloured by the package's colorization stage
    from the grey alone (prompt "") and with each image's caption.

    Reports, per prompt mode: the share whose shape and background colours read back as the
    original's, over the images whose two colours are unambiguous in grey (no other palette colour
    within GREY_AMBIGUITY of either) and over all; for the ambiguous colours, the share where the
    colour read back is one of the original's grey twins (a plausible choice) and how much of the
    region takes its most common colour (patches of several twins score below 1); the shape read
    back; and the PSNR against the original colour image."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    pipe = load(package)
    st = pipe.package.stages[0]
    if st.image_condition != "grey":
        raise ValueError(
            f"{pipe.package.path}: its first stage is not a colorization stage (image_condition grey)"
        )
    specs = S.sample_specs(np.random.default_rng(seed), n)
    hi = S.render_batch(specs)  # [n, 3, 64, 64] in [-1, 1]
    ref = imageio.to_numpy(hi)
    grey = imageio.to_numpy(imageio.to_grey(hi))[..., 0]  # [n, 64, 64] in [0, 1]
    used = pipe.plan(kind="colorize", image=grey[0], prompt="", **settings).settings[st.name].as_dict()
    unambiguous = [len(grey_twins(sp.fg)) == 1 and len(grey_twins(sp.bg)) == 1 for sp in specs]
    report: dict = {"n": n, "unambiguous_images": int(sum(unambiguous)), "settings": used}
    outs = {}
    for mode in ("grey only", "with caption"):
        t0 = time.time()
        out = np.concatenate(
            [
                pipe.colorize(grey[i], "" if mode == "grey only" else S.caption(sp.fg, sp.shape, sp.bg, 0),
                              output_type="numpy", progress=False, seed=seed + i, **settings)
                for i, sp in enumerate(specs)
            ]
        )  # fmt: skip
        seconds = time.time() - t0
        reads = [read_shape(im) for im in out]
        both = [r["fg"] == sp.fg and r["bg"] == sp.bg for r, sp in zip(reads, specs)]
        twins = [
            r[k] in grey_twins(getattr(sp, k))
            for r, sp in zip(reads, specs)
            for k in ("fg", "bg")
            if len(grey_twins(getattr(sp, k))) > 1
        ]
        # one colour per region? In an ambiguous grey a model may paint patches of the twins: the
        # share of the region's pixels nearest to its most common colour (1 = one consistent choice)
        consistency = []
        for im, r0, sp in zip(out, ref, specs):
            fg_px = foreground(r0, sp.bg)
            nearest = np.argmin(((im.astype(np.float64)[:, :, None, :] * 255.0 - _RGB) ** 2).sum(-1), axis=-1)
            for region, colour in ((fg_px, sp.fg), (~fg_px, sp.bg)):
                if len(grey_twins(colour)) > 1 and region.sum() >= 16:
                    consistency.append(float(np.bincount(nearest[region]).max() / region.sum()))
        mse = float(np.mean((out.astype(np.float64) - ref) ** 2))
        report[mode] = {
            "colours_unambiguous": round(
                sum(b for b, u in zip(both, unambiguous) if u) / max(1, sum(unambiguous)), 3
            ),
            "colours_all": round(sum(both) / n, 3),
            "ambiguous_colour_is_a_grey_twin": round(sum(twins) / max(1, len(twins)), 3),
            "ambiguous_colours": len(twins),
            "ambiguous_region_one_colour": round(float(np.mean(consistency)), 3) if consistency else None,
            "shape": round(sum(r["shape"] == sp.shape for r, sp in zip(reads, specs)) / n, 3),
            "psnr_db": round(float(10 * np.log10(1.0 / mse)), 2),
            "seconds": round(seconds, 1),
        }
        outs[mode] = out
    if save_grid:  # originals, grey, coloured from grey, coloured with the caption: 8 per row
        k = min(8, n)
        g3 = np.repeat(grey[:k, :, :, None], 3, axis=-1)
        save_image_grid(
            np.concatenate([ref[:k], g3, outs["grey only"][:k], outs["with caption"][:k]]), save_grid, cols=k
        )
    return report


_IDEAL_FILL = {"circle": float(np.pi / 4), "square": 1.0, "triangle": 0.5}


def _another_colour_and_shape(sp, rng) -> tuple[str, str]:
    """A shape colour other than the spec's shape and background colours, and another shape."""
    fgs = [c for c in S.COLORS if c not in (sp.bg, sp.fg)]
    fg = fgs[int(rng.integers(len(fgs)))]
    return fg, [x for x in S.SHAPES if x != sp.shape][int(rng.integers(2))]


def inpaint_cases(n: int, seed: int = 0) -> list[dict]:
    """The two inpainting tasks on n rendered training images (64x64), fixed by the seed.

    complete: the right half of the shape's bounding box (from its centre, 4 px margin) is
    regenerated from the image's own caption; the original is the ground truth there.
    replace: the whole box (4 px margin) is regenerated from a caption with another shape colour
    (not the background's) and another shape on the same background.
    """
    pick = np.random.default_rng([seed, 1])  # apart from the specs, so that cases[:k] keep with n
    cases = []
    for sp in S.sample_specs(np.random.default_rng(seed), n):
        img = S.render(sp)
        top, bottom = int(max(0, np.floor(sp.y0 - 4))), int(min(S.SIZE, np.ceil(sp.y0 + sp.side + 4)))
        left, right = int(max(0, np.floor(sp.x0 - 4))), int(min(S.SIZE, np.ceil(sp.x0 + sp.side + 4)))
        half = np.zeros((S.SIZE, S.SIZE), bool)
        half[top:bottom, int(round(sp.x0 + sp.side / 2)) : right] = True
        box = np.zeros((S.SIZE, S.SIZE), bool)
        box[top:bottom, left:right] = True
        fg, shape = _another_colour_and_shape(sp, pick)
        cases.append(
            {
                "image": img,
                "spec": sp,
                "complete": (half, S.caption(sp.fg, sp.shape, sp.bg), (sp.fg, sp.shape, sp.bg)),
                "replace": (box, S.caption(fg, shape, sp.bg), (fg, shape, sp.bg)),
            }
        )
    return cases


def evaluate_shapes_inpaint(
    package=None, n: int = 40, seed: int = 0, save_grid: str | None = None, **settings
) -> dict:
    """Inpainting on the two tasks of `inpaint_cases`, one `inpaint` call per image (seed i).

    complete: alignment (the original's colours and shape read back) and the PSNR of the
    regenerated region against the original. replace: alignment to the new caption and the mean
    |fill ratio - the shape's ideal| (0.785 disk, 1 square, 0.5 triangle) as a shape-quality figure.
    `settings` are `inpaint` keywords (per-stage dicts allowed); the report records what ran."""

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    pipe = load(package)
    cases = inpaint_cases(n, seed)
    first = cases[0]
    used = {
        k: v.as_dict()
        for k, v in pipe.plan(
            kind="inpaint", prompt="", image=first["image"], mask=first["complete"][0], **settings
        ).settings.items()
    }
    report: dict = {"n": n}
    shown = {"complete": [], "replace": []}
    t0 = time.time()
    for task in ("complete", "replace"):
        ok = {"all": 0, "fg": 0, "shape": 0, "bg": 0}
        sq_err, n_px, fill_err = 0.0, 0, []
        for i, case in enumerate(cases):
            mask, prompt, want = case[task]
            out = pipe.inpaint(
                case["image"], mask, prompt, output_type="numpy", progress=False, seed=seed + i, **settings
            )[0]
            r = read_shape(out)
            hit = {"fg": r["fg"] == want[0], "shape": r["shape"] == want[1], "bg": r["bg"] == want[2]}
            for k, v in hit.items():
                ok[k] += int(v)
            ok["all"] += int(all(hit.values()))
            diff = out.astype(np.float64) - case["image"].astype(np.float64) / 255.0
            sq_err += float((diff[mask] ** 2).sum())
            n_px += int(mask.sum()) * 3
            fill_err.append(abs(r["fill"] - _IDEAL_FILL[want[1]]) if r["shape"] else 1.0)
            if len(shown[task]) < 8:
                shown[task].append((np.where(mask[..., None], 0.85, case["image"] / 255.0), out))
        rep = {"alignment": ok["all"] / n} | {k: ok[k] / n for k in ("fg", "shape", "bg")}
        if task == "complete":
            rep["masked_psnr_db"] = round(float(10 * np.log10(n_px / max(sq_err, 1e-12))), 2)
        else:
            rep["fill_error"] = round(float(np.mean(fill_err)), 4)
        report[task] = rep
    report["seconds"] = round(time.time() - t0, 1)
    report["settings"] = used
    if save_grid:  # per task: the input with the mask in grey, then the result
        rows = [np.stack([p[j] for p in shown[t]]) for t in ("complete", "replace") for j in (0, 1)]
        save_image_grid(np.concatenate(rows), save_grid, cols=len(shown["complete"]), scale=2)
    return report


SEAM_BAND = 4  # px beyond the seam whose continuation uncropping is scored on


def evaluate_shapes_uncrop(
    package=None, n: int = 40, seed: int = 0, save_grid: str | None = None, **settings
) -> dict:
    """Uncropping (Palette's task; `inpaint` with the image's far side as the mask): for n rendered
    images, everything beyond a vertical seam through the shape's centre (the side alternating
    left / right) is regenerated from the image's own caption.

    Reports the alignment of the whole result to the caption (colours and shape read back), the
    PSNR of the SEAM_BAND columns just beyond the seam against the original (the shape and the
    background continued across it), of the whole regenerated side, and the time."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    pipe = load(package)
    specs = S.sample_specs(np.random.default_rng(seed), n)
    ok, band_err, band_px, side_err, side_px, shown = 0, 0.0, 0, 0.0, 0, []
    used = None
    t0 = time.time()
    for i, sp in enumerate(specs):
        img = S.render(sp)
        seam = int(round(sp.x0 + sp.side / 2))
        mask = np.zeros((S.SIZE, S.SIZE), bool)
        band = np.zeros_like(mask)
        if i % 2 == 0:  # regenerate the right side
            mask[:, seam:] = True
            band[:, seam : seam + SEAM_BAND] = True
        else:
            mask[:, :seam] = True
            band[:, max(0, seam - SEAM_BAND) : seam] = True
        prompt = S.caption(sp.fg, sp.shape, sp.bg)
        if used is None:
            plan = pipe.plan(kind="inpaint", prompt=prompt, image=img, mask=mask, **settings)
            used = {k: v.as_dict() for k, v in plan.settings.items()}
        out = pipe.inpaint(img, mask, prompt, output_type="numpy", progress=False, seed=seed + i, **settings)[
            0
        ]
        r = read_shape(out)
        ok += int((r["fg"], r["shape"], r["bg"]) == (sp.fg, sp.shape, sp.bg))
        diff = out.astype(np.float64) - img.astype(np.float64) / 255.0
        band_err += float((diff[band] ** 2).sum())
        band_px += int(band.sum()) * 3
        side_err += float((diff[mask] ** 2).sum())
        side_px += int(mask.sum()) * 3
        if len(shown) < 8:
            shown.append((np.where(mask[..., None], 0.85, img / 255.0), out))
    seconds = time.time() - t0

    def psnr(err, px):
        return round(float(10 * np.log10(px / max(err, 1e-12))), 2)

    if save_grid:  # the input with the regenerated side in grey, then the result
        save_image_grid(np.concatenate([np.stack([p[j] for p in shown]) for j in (0, 1)]), save_grid,
                        cols=len(shown), scale=2)  # fmt: skip
    return {
        "n": n,
        "alignment": round(ok / n, 3),
        "seam_band_psnr_db": psnr(band_err, band_px),
        "side_psnr_db": psnr(side_err, side_px),
        "seconds": round(seconds, 1),
        "settings": used,
    }


def evaluate_shapes_img2img(
    package=None,
    n: int = 24,
    seed: int = 0,
    strengths=(0.3, 0.5, 0.7, 0.85, 1.0),
    later_strength: float | None = None,
    save_grid: str | None = None,
    **settings,
) -> dict:
    """SDEdit (`img2img`) on n rendered training images at each strength, for two edits.

    recolour: the caption with another shape colour (not the background's); reshape: with another
    shape. Per strength: the alignment to the new caption, and how much of the layout is kept, the
    IoU of the output's foreground with the original shape's (1 = the same place and size).
    One call per image (seed i); each strength applies to every stage, or with `later_strength`
    to the first stage only, the later ones running at `later_strength`. `settings` are img2img
    keywords."""

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    pipe = load(package)
    names = [st.name for st in pipe.package.stages]

    def per_stage(strength):
        if later_strength is None:
            return strength
        return {name: strength if k == 0 else later_strength for k, name in enumerate(names)}

    pick = np.random.default_rng([seed, 2])
    specs = S.sample_specs(np.random.default_rng(seed), n)
    edits = []
    for sp in specs:
        fg, shape = _another_colour_and_shape(sp, pick)
        edits.append({"recolour": (fg, sp.shape, sp.bg), "reshape": (sp.fg, shape, sp.bg)})
    report: dict = {"n": n, "strengths": list(strengths), "later_strength": later_strength}
    rows = []
    t0 = time.time()
    for task in ("recolour", "reshape"):
        per = []
        for strength in strengths:
            ok, iou = 0, []
            shown = []
            for i, (sp, e) in enumerate(zip(specs, edits)):
                img = S.render(sp)
                want = e[task]
                out = pipe.img2img(
                    img,
                    S.caption(*want),
                    strength=per_stage(strength),
                    output_type="numpy",
                    progress=False,
                    seed=seed + i,
                    **settings,
                )[0]
                r = read_shape(out)
                ok += int((r["fg"], r["shape"], r["bg"]) == want)
                a, b = foreground(img, sp.bg), foreground(out, sp.bg)
                iou.append(float((a & b).sum() / max((a | b).sum(), 1)))
                if len(shown) < 8:
                    shown.append(out)
            per.append(
                {"strength": strength, "alignment": ok / n, "layout_iou": round(float(np.mean(iou)), 3)}
            )
            rows.append(np.stack(shown))
        report[task] = per
    report["seconds"] = round(time.time() - t0, 1)
    report["settings"] = {
        k: v.as_dict()
        for k, v in pipe.plan(
            kind="img2img", prompt="", image=S.render(specs[0]), strength=per_stage(strengths[-1]), **settings
        ).settings.items()
    }
    if save_grid:  # the originals, then per task one row per strength
        k = min(8, n)
        orig = np.stack([S.render(sp) / 255.0 for sp in specs[:k]])
        save_image_grid(np.concatenate([orig] + [r[:k] for r in rows]), save_grid, cols=k, scale=2)
    return report


def save_image_grid(imgs: np.ndarray, path: str, cols: int = 8, scale: int = 2) -> None:
    """imgs float [N, H, W, C] in [0, 1] -> one PNG grid."""
    from PIL import Image

    imgs = np.clip(np.asarray(imgs, dtype=np.float64), 0, 1)
    if imgs.shape[-1] == 1:
        imgs = np.repeat(imgs, 3, axis=-1)
    n, h, w, c = imgs.shape
    rows = (n + cols - 1) // cols
    g = np.ones((rows * (h + 2), cols * (w + 2), 3))
    for i, im in enumerate(imgs):
        r, q = divmod(i, cols)
        g[r * (h + 2) : r * (h + 2) + h, q * (w + 2) : q * (w + 2) + w] = im
    Image.fromarray((g * 255).round().astype(np.uint8)).resize(
        (g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST
    ).save(path)


@functools.lru_cache(maxsize=4)
def digits_classifier(seed: int = 0):
    """An SVM (RBF) on the real digits, 0..16 scaled to [0, 1]; returns (clf, held-out accuracy).

    Cached: a guidance sweep scores many sets of samples against the same classifier.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    d = load_digits()
    x = d.data / 16.0
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, random_state=seed, stratify=d.target)
    acc = float(SVC(gamma="scale", C=10).fit(xtr, ytr).score(xte, yte))
    return SVC(gamma="scale", C=10).fit(x, d.target), acc


@functools.lru_cache(maxsize=1)
def _real_digits() -> tuple[np.ndarray, np.ndarray, float, float]:
    """(real [1797, 64] in [0, 1], labels [1797], mean same-class pairwise distance, median
    leave-one-out nearest distance): the real-data figures, computed once (~5 s)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    real = d.data / 16.0
    rr = np.sqrt(((real[:, None, :] - real[None]) ** 2).sum(-1))
    np.fill_diagonal(rr, np.inf)
    same_class = float(np.mean([mean_pairwise_distance(real[d.target == c]) for c in range(10)]))
    return real, d.target, same_class, float(np.median(rr.min(1)))


def mean_pairwise_distance(a: np.ndarray) -> float:
    """Mean L2 distance over the ordered pairs of distinct rows of a [N, D] (0 when N < 2)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    d = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))
    k = len(a)
    return float(d.sum() / max(1, k * (k - 1)))


def digits_figures(samples: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """samples float [N, 8, 8] in [0, 1] (or [N, 8, 8, 1]); labels int [N]."""
    x = np.asarray(samples, dtype=np.float64).reshape(len(samples), 64)
    clf, real_acc = digits_classifier(seed)
    acc = float((clf.predict(x) == labels).mean())
    real, _, real_same_class, real_nn_median = _real_digits()
    d_nn = np.sqrt(((x[:, None, :] - real[None]) ** 2).sum(-1)).min(1)
    per_class_gen = [mean_pairwise_distance(x[labels == c]) for c in range(10) if (labels == c).sum() > 1]
    return {
        "accuracy": acc,
        "classifier_real_test_accuracy": real_acc,
        "n": int(len(x)),
        "mean_pairwise_distance_same_class": float(np.mean(per_class_gen)),
        "real_mean_pairwise_distance_same_class": real_same_class,
        "nearest_training_distance_median": float(np.median(d_nn)),
        # the same figure for real images against the other real images (leave-one-out)
        "real_leave_one_out_nearest_distance_median": real_nn_median,
        "fraction_near_copies": float((d_nn < 0.5).mean()),
    }


def evaluate_digits(
    package="digits", n_per_class: int = 30, seed: int = 0, save_grid: str | None = None, **settings
) -> dict:

    if package == "digits":
        package = bundled_path("digits")
    pipe = load(package)
    labels = np.repeat(np.arange(10), n_per_class)
    t0 = time.time()
    imgs = pipe.generate(
        class_label=[int(v) for v in labels], output_type="numpy", progress=False, seed=seed, **settings
    )
    rep = digits_figures(imgs[..., 0], labels, seed)
    if save_grid:
        save_image_grid(
            imgs[np.argsort(np.tile(np.arange(n_per_class), 10), kind="stable")][:100],
            save_grid,
            cols=10,
            scale=4,
        )
    rep["seconds"] = round(time.time() - t0, 1)
    rep["settings"] = settings
    return rep
