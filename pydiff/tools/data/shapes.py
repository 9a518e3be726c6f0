"""The procedural `shapes` text-to-image data set (issue 4), rendered with NumPy.

64x64 RGB; one palette-coloured background; one shape (circle, square or upright isosceles
triangle with width == height) fully inside the frame, bounding-box side uniform in [24, 44] px,
position uniform, anti-aliased by 4x4 supersampling, per-image colour jitter up to +-8 per
channel. Twelve (shape colour, shape, background) combinations are never rendered for training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# (shape colour, shape, background): held out to test compositional generalisation.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "square", "yellow"),
        ("orange", "circle", "purple"),
        ("yellow", "triangle", "black"),
        ("green", "circle", "white"),
        ("blue", "triangle", "orange"),
        ("purple", "square", "green"),
        ("white", "triangle", "red"),
        ("black", "circle", "blue"),
        ("green", "triangle", "purple"),
        ("blue", "square", "white"),
        ("yellow", "circle", "red"),
        ("black", "square", "orange"),
    }
)

TEMPLATES: tuple[str, ...] = (
    "a {fg} {shape} on a {bg} background",
    "{fg} {shape}, {bg} background",
    "a {bg} background with a {fg} {shape}",
    "a {fg} {shape} in front of a {bg} background",
)

SIZE = 64
MIN_SIDE, MAX_SIDE = 24, 44
JITTER = 8
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """One image: colours, shape, bounding box (left x0, top y0, side) in 64x64 pixels, jitter."""

    fg: str
    shape: str
    bg: str
    x0: float
    y0: float
    side: float
    fg_jitter: tuple[int, int, int] = (0, 0, 0)
    bg_jitter: tuple[int, int, int] = (0, 0, 0)


def is_held_out(fg: str, shape: str, bg: str) -> bool:
    return (fg, shape, bg) in HELD_OUT


def all_combos(include_held_out: bool = False) -> list[tuple[str, str, str]]:
    """Every (fg, shape, bg) with fg != bg; 168 in all, 156 without the held-out ones."""
    out = []
    for fg in COLORS:
        for shape in SHAPES:
            for bg in COLORS:
                if fg != bg and (include_held_out or not is_held_out(fg, shape, bg)):
                    out.append((fg, shape, bg))
    return out


def caption(fg: str, shape: str, bg: str, template: int = 0) -> str:
    return TEMPLATES[template].format(fg=fg, shape=shape, bg=bg)


def all_captions(include_held_out: bool = True) -> list[str]:
    """Every distinct caption, in a fixed order (combo-major, template-minor)."""
    return [caption(*c, template=k) for c in all_combos(include_held_out) for k in range(len(TEMPLATES))]


def sample_specs(rng: np.random.Generator, n: int, include_held_out: bool = False) -> list[ShapeSpec]:
    """Draw n training specs uniformly over the allowed combinations, sizes and positions."""
    combos = all_combos(include_held_out)
    specs = []
    for _ in range(n):
        fg, shape, bg = combos[int(rng.integers(len(combos)))]
        side = float(rng.uniform(MIN_SIDE, MAX_SIDE))
        x0 = float(rng.uniform(0, SIZE - side))
        y0 = float(rng.uniform(0, SIZE - side))
        fj = tuple(int(v) for v in rng.integers(-JITTER, JITTER + 1, size=3))
        bj = tuple(int(v) for v in rng.integers(-JITTER, JITTER + 1, size=3))
        specs.append(ShapeSpec(fg, shape, bg, x0, y0, side, fj, bj))
    return specs


def _coverage(shape: str, x0: float, y0: float, side: float) -> np.ndarray:
    """Fraction of each pixel covered by the shape, float32 [64, 64], by 4x4 supersampling."""
    s = SUPERSAMPLE
    c = (np.arange(SIZE * s, dtype=np.float64) + 0.5) / s  # subpixel centres in pixel units
    yy, xx = c[:, None], c[None, :]
    if shape == "circle":
        r = side / 2
        inside = (xx - (x0 + r)) ** 2 + (yy - (y0 + r)) ** 2 <= r * r
    elif shape == "square":
        inside = (xx >= x0) & (xx <= x0 + side) & (yy >= y0) & (yy <= y0 + side)
    elif shape == "triangle":
        # Apex at (x0 + side/2, y0), base from (x0, y0 + side) to (x0 + side, y0 + side).
        half_width = (yy - y0) / 2  # width grows linearly from 0 at the apex to side at the base
        inside = (yy >= y0) & (yy <= y0 + side) & (np.abs(xx - (x0 + side / 2)) <= half_width)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    inside = np.broadcast_to(inside, (SIZE * s, SIZE * s))
    return inside.reshape(SIZE, s, SIZE, s).mean(axis=(1, 3)).astype(np.float32)


def render(spec: ShapeSpec) -> np.ndarray:
    """Render one spec to uint8 [64, 64, 3]."""
    if spec.fg == spec.bg:
        raise ValueError("the shape's colour must differ from the background's")
    fg = np.clip(np.array(PALETTE[spec.fg]) + np.array(spec.fg_jitter), 0, 255).astype(np.float32)
    bg = np.clip(np.array(PALETTE[spec.bg]) + np.array(spec.bg_jitter), 0, 255).astype(np.float32)
    a = _coverage(spec.shape, spec.x0, spec.y0, spec.side)[..., None]
    return np.clip(np.rint(a * fg + (1 - a) * bg), 0, 255).astype(np.uint8)


def render_batch(specs: list[ShapeSpec]) -> np.ndarray:
    """Render specs to float32 NCHW [N, 3, 64, 64] in [-1, 1]."""
    imgs = np.stack([render(s) for s in specs]).astype(np.float32)
    return (imgs / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def area_resize(x: np.ndarray, size: int) -> np.ndarray:
    """Area (box) downsampling of NCHW [N, C, H, W] to [N, C, size, size]; H must be a multiple."""
    n, c, h, w = x.shape
    f = h // size
    if f * size != h or w != h:
        raise ValueError(f"cannot area-resize {h}x{w} to {size}")
    return x.reshape(n, c, size, f, size, f).mean(axis=(3, 5))
