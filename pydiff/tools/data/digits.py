"""scikit-learn's handwritten digits (8x8 grey, 1797 images) as float32 NCHW in [-1, 1]."""

from __future__ import annotations

import numpy as np


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """Return (images float32 [N, 1, 8, 8] in [-1, 1], labels int64 [N]); 0..16 maps to -1..1."""
    from sklearn.datasets import load_digits  # lazy: only needed to train and evaluate

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return x, d.target.astype(np.int64)
