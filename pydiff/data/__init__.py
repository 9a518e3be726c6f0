"""Training data: the procedural `shapes` text-to-image set and scikit-learn's `digits`."""
from __future__ import annotations

from .shapes import (PALETTE, SHAPES, HELD_OUT, TEMPLATES, ShapeSpec, all_combos, caption,
                     render, render_batch, sample_specs, area_resize, is_held_out)
from .digits import load_digits_images

__all__ = ["PALETTE", "SHAPES", "HELD_OUT", "TEMPLATES", "ShapeSpec", "all_combos", "caption",
           "render", "render_batch", "sample_specs", "area_resize", "is_held_out",
           "load_digits_images"]
