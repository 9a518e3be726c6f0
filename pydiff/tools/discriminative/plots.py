"""A small PNG line plot with Pillow alone (the figures of docs/discriminative.md)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def line_plot(path, xs, series: dict, title="", ylabel="", size=(480, 320)) -> None:
    """A small PNG line plot (PIL only): {label: (means, stds)} against xs (log x axis)."""
    w, h = size
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 50, w - 130, 30, h - 40
    lx = np.log(np.asarray(xs, float))
    px = left + (lx - lx.min()) / max(lx.max() - lx.min(), 1e-9) * (right - left)
    lo = min(min(m) - max(s) for m, s in series.values())
    hi = max(max(m) + max(s) for m, s in series.values())
    lo, hi = max(0.0, np.floor(lo * 10) / 10), min(1.0, np.ceil(hi * 10) / 10)

    def py(v):
        return bottom - (v - lo) / max(hi - lo, 1e-9) * (bottom - top)

    d.rectangle([left, top, right, bottom], outline="black")
    for v in np.linspace(lo, hi, 5):
        d.text((5, py(v) - 6), f"{v:.2f}", fill="black")
    for x, p in zip(xs, px):
        d.text((p - 4, bottom + 5), str(x), fill="black")
    d.text((left, 8), title, fill="black")
    d.text((right - 40, bottom + 20), ylabel, fill="black")
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    for i, (label, (m, s)) in enumerate(series.items()):
        c = colors[i % len(colors)]
        pts = [(float(p), float(py(v))) for p, v in zip(px, m)]
        d.line(pts, fill=c, width=2)
        for (a, b), sv in zip(pts, s):
            d.line([(a, py(m[pts.index((a, b))] - sv)), (a, py(m[pts.index((a, b))] + sv))], fill=c)
            d.ellipse([a - 3, b - 3, a + 3, b + 3], fill=c)
        d.text((right + 8, top + 16 * i), label, fill=c)
    im.save(path)
