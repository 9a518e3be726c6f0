"""What a call returns: its images, as before (a list of PIL images, or a float32 array), that also
carry `.images`, `.seeds` (one per image) and `.settings` (per stage, what ran), as diffusers'
pipelines return an output object with `.images`.

`ImageList` is a list and `ImageArray` a NumPy array, so code written for the plain list or array
keeps working: indexing, iteration, `len`, slicing (a slice is a plain list or array).
"""

from __future__ import annotations

import numpy as np

__all__ = ["ImageList", "ImageArray", "result"]


class ImageList(list):
    """PIL images (`output_type="pil"`), prompt-major, with `.images`, `.seeds`, `.settings`."""

    seeds: list[int]
    settings: dict
    output_type: str = "pil"

    @property
    def images(self) -> list:
        return list(self)

    def __getitem__(self, i):
        got = super().__getitem__(i)
        return list(got) if isinstance(i, slice) else got


class ImageArray(np.ndarray):
    """float32 images [B, H, W, C] in [0, 1] (`"numpy"`) or latents [B, C, h, w] (`"latent"`), with
    `.images` (the plain array), `.seeds`, `.settings`."""

    seeds: list[int]
    settings: dict
    output_type: str

    def __array_finalize__(self, obj):
        if obj is not None:
            self.seeds = getattr(obj, "seeds", [])
            self.settings = getattr(obj, "settings", {})
            self.output_type = getattr(obj, "output_type", "numpy")

    @property
    def images(self) -> np.ndarray:
        return self.view(np.ndarray)


def result(images, *, seeds: list[int], settings: dict, output_type: str):
    """`images` (a list of PIL images or an array) as an ImageList or ImageArray."""
    if isinstance(images, np.ndarray):
        out = np.asarray(images).view(ImageArray)
    else:
        out = ImageList(images)
    out.seeds = list(seeds)
    out.settings = settings
    out.output_type = output_type
    return out
