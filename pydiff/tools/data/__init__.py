"""Training data: the procedural `shapes` text-to-image set and scikit-learn's `digits`."""

from __future__ import annotations

from pydiff.tools.data.digits import load_digits_images
from pydiff.tools.data.shapes import (
    HELD_OUT,
    PALETTE,
    SHAPES,
    TEMPLATES,
    ShapeSpec,
    all_combos,
    area_resize,
    caption,
    is_held_out,
    render,
    render_batch,
    sample_specs,
)

__all__ = [
    "PALETTE",
    "SHAPES",
    "HELD_OUT",
    "TEMPLATES",
    "ShapeSpec",
    "all_combos",
    "caption",
    "render",
    "render_batch",
    "sample_specs",
    "area_resize",
    "is_held_out",
    "load_digits_images",
]
