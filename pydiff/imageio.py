"""Images in and out of the pipeline, with explicit conversions and atomic writes.

Model space is float32 NCHW in [-1, 1] (pixel p in 0..255 maps to p / 127.5 - 1). User images are
PIL images or NumPy arrays: uint8 HWC (0..255), or float HWC in [0, 1] (what
`output_type="numpy"` returns). Anything else raises `TypeError`/`ValueError` rather than guess.

Sizes are checked before any conversion: an image or mask of more than `MAX_IMAGE_PIXELS` pixels
(twice the largest output side, squared) is a `ValueError`, and `load_image` reads that size from
the file's header before it decodes anything.

Masks (`mask_to_array`), 1 = generate, 0 = keep:

- bool: True is 1;
- integers of any dtype whose values are all 0 or 1: taken as they are;
- other uint8 values (and a PIL 'L' or '1' image): 8-bit grey, v / 255 (255 = generate);
- other integers (a signed or wider integer outside {0, 1}): a `ValueError`;
- floats (float16/32/64): values in [0, 1], NaN and infinity refused.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

from pydiff.files import atomic_write_bytes

MAX_OUTPUT_SIDE = 4096  # the largest stage resolution a package may have (package.MAX_RESOLUTION)
MAX_IMAGE_PIXELS = (2 * MAX_OUTPUT_SIDE) ** 2  # 8192 x 8192: anything larger is out of proportion

__all__ = [
    "to_model_array",
    "mask_to_array",
    "to_pil",
    "to_numpy",
    "resize",
    "make_grid",
    "save_png",
    "upsample_bilinear",
    "load_image",
    "MAX_IMAGE_PIXELS",
]


def _pil():
    return Image


def _as_hwc(image, what: str) -> np.ndarray:
    """PIL / ndarray -> float32 HWC in [0, 1] (channels kept as given)."""
    Image = _pil()
    if isinstance(image, (str, os.PathLike)):
        raise TypeError(
            f"{what}: expected an image (PIL.Image or numpy array), got a path; "
            f"open it with pydiff.imageio.load_image({str(image)!r})"
        )
    _check_size(image, what)
    if isinstance(image, Image.Image):
        mode = image.mode
        if mode in ("RGB", "L"):
            arr = np.asarray(image, dtype=np.uint8)
        elif mode in ("RGBA", "LA", "P", "CMYK", "YCbCr", "1", "I", "I;16", "F"):
            raise ValueError(
                f"{what}: PIL image mode {mode!r} is not supported; convert it with "
                f"image.convert('RGB') (or 'L' for a grayscale model)"
            )
        else:
            raise ValueError(f"{what}: PIL image mode {mode!r} is not supported")
        arr = arr.astype(np.float32) / 255.0
    elif isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            arr = image.astype(np.float32) / 255.0
        elif image.dtype.kind == "f":
            with np.errstate(over="ignore"):  # beyond float32 is infinity, refused just below
                arr = image.astype(np.float32)
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{what}: the array contains NaN or infinity")
            if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
                raise ValueError(
                    f"{what}: float arrays must be HWC in [0, 1] (got values in "
                    f"[{arr.min():.3g}, {arr.max():.3g}]); pass uint8 for 0..255"
                )
        else:
            raise TypeError(f"{what}: expected a uint8 or float array, got dtype {image.dtype}")
    else:
        raise TypeError(f"{what}: expected a PIL.Image or a numpy array, got {type(image).__name__}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"{what}: expected an HxW or HxWxC image, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: the image is empty (shape {arr.shape})")
    return arr


def _check_size(image, what: str) -> None:
    """A PIL image (its size is known before it decodes) or array of at most MAX_IMAGE_PIXELS."""
    if isinstance(image, Image.Image):
        w, h = image.size
    elif isinstance(image, np.ndarray) and image.ndim >= 2:
        h, w = image.shape[:2]
    else:
        return
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{what}: {w}x{h} is {w * h} pixels, over the limit of {MAX_IMAGE_PIXELS} "
            f"({2 * MAX_OUTPUT_SIDE}x{2 * MAX_OUTPUT_SIDE}); reduce it first"
        )


def to_model_array(image, channels: int = 3, what: str = "image") -> np.ndarray:
    """One user image -> float32 [1, C, H, W] in [-1, 1]; the channel count must match."""
    return (to_unit_array(image, channels, what).transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def to_unit_array(image, channels: int = 3, what: str = "image") -> np.ndarray:
    """One user image -> float32 [H, W, C] in [0, 1] (uint8 / 255, floats as given); the channel
    count must match."""
    arr = _as_hwc(image, what)
    c = arr.shape[2]
    if c != channels:
        if channels == 3 and c == 1:
            raise ValueError(
                f"{what}: expected an RGB image (3 channels), got a grayscale one; "
                f"convert it with image.convert('RGB')"
            )
        raise ValueError(f"{what}: expected {channels} channel(s), got {c} (shape {arr.shape})")
    return arr


def mask_to_array(mask, what: str = "mask") -> np.ndarray:
    """A mask (PIL 'L'/'1', or an HxW / HxWx1 array of any dtype; 1 = generate) -> float32
    [1, 1, H, W] in [0, 1], by the rule in this module's docstring."""
    _check_size(mask, what)
    if isinstance(mask, Image.Image):
        if mask.mode == "1":
            mask = mask.convert("L")
        if mask.mode != "L":
            raise ValueError(
                f"{what}: expected a single-channel mask (PIL mode 'L' or '1'), "
                f"got mode {mask.mode!r}; convert it with mask.convert('L')"
            )
        mask = np.asarray(mask, dtype=np.uint8)
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{what}: expected a PIL.Image or a numpy array, got {type(mask).__name__}")
    shape = mask.shape
    if mask.ndim == 3 and shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        raise ValueError(f"{what}: expected an HxW mask, got shape {shape}")
    if mask.size == 0:
        raise ValueError(f"{what}: the mask is empty (shape {shape})")
    kind = mask.dtype.kind
    if kind == "b":
        arr = mask.astype(np.float32)
    elif kind in "iu":
        lo, hi = int(mask.min()), int(mask.max())
        if lo >= 0 and hi <= 1:  # a 0/1 mask, whatever its integer type
            arr = mask.astype(np.float32)
        elif mask.dtype == np.uint8:  # 8-bit grey: 255 = generate
            arr = mask.astype(np.float32) / 255.0
        else:
            raise ValueError(
                f"{what}: an integer mask of dtype {mask.dtype} must hold only 0 and 1 (got values "
                f"in [{lo}, {hi}]); pass uint8 for 0..255 grey or floats in [0, 1]"
            )
    elif kind == "f":
        with np.errstate(over="ignore"):  # beyond float32 is infinity, refused just below
            arr = mask.astype(np.float32)
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"{what}: float masks must be in [0, 1] (NaN and infinity refused)")
    else:
        raise TypeError(f"{what}: expected a bool, integer or float array, got dtype {mask.dtype}")
    return arr[None, None]


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """Resize float32 [B, C, H, W] to size x size: by an integer factor down, the box (area) mean,
    as the bundled stages' training data and low-resolution inputs were made; otherwise PIL's
    antialiased bicubic, per channel."""
    B, C, H, W = x.shape
    if H == size and W == size:
        return x
    if H == W and H > size and H % size == 0:
        f = H // size
        return x.reshape(B, C, size, f, size, f).mean(axis=(3, 5), dtype=np.float64).astype(np.float32)
    Image = _pil()
    out = np.empty((B, C, size, size), np.float32)
    for b in range(B):
        for c in range(C):
            im = Image.fromarray(np.ascontiguousarray(x[b, c], dtype=np.float32), mode="F")
            out[b, c] = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC), np.float32)
    return out


def upsample_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [B, C, h, w] to [B, C, size, size], half-pixel centres, no antialias.

    Same as torch.nn.functional.interpolate(mode="bilinear", align_corners=False) (the model
    package format's noise-conditioning augmentation input).
    """
    B, C, h, w = x.shape

    def axis(n_in, n_out):
        scale = n_in / n_out
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
        src = np.maximum(src, 0.0)  # torch clamps negative source coords to 0
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = (src - i0).astype(np.float32)
        return i0, i1, frac

    y0, y1, fy = axis(h, size)
    x0, x1, fx = axis(w, size)
    x = np.asarray(x, np.float32)
    rows = x[:, :, y0, :] * (1 - fy)[:, None] + x[:, :, y1, :] * fy[:, None]
    return (rows[:, :, :, x0] * (1 - fx) + rows[:, :, :, x1] * fx).astype(np.float32)


# ITU-R BT.601 luma, the weights of PIL's convert("L") and of colorization work since
LUMA = (0.299, 0.587, 0.114)


def to_grey(x: np.ndarray) -> np.ndarray:
    """The luma of RGB float32 [B, 3, H, W] in [-1, 1] (BT.601), as [B, 1, H, W] in [-1, 1]:
    what a colorization stage is conditioned on (an affine map, so [-1, 1] maps to itself)."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"to_grey: expected RGB [B, 3, H, W], got shape {x.shape}")
    r, g, b = (x[:, c : c + 1].astype(np.float64) for c in range(3))
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).astype(np.float32)


def to_numpy(x: np.ndarray) -> np.ndarray:
    """Model array [B, C, H, W] in [-1, 1] -> float32 [B, H, W, C] in [0, 1]."""
    return np.clip((np.asarray(x, np.float32) + 1.0) * 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).copy()


def to_pil(x: np.ndarray) -> list:
    """Model array [B, C, H, W] in [-1, 1] -> list of PIL images (RGB, or L for one channel)."""
    return unit_to_pil(to_numpy(x))


def unit_to_pil(u: np.ndarray) -> list:
    """float32 [B, H, W, C] in [0, 1] -> list of PIL images (a uint8 input's u8 / 255 gives u8 back)."""
    Image = _pil()
    u8 = np.round(np.asarray(u, np.float32) * 255.0).astype(np.uint8)
    if u8.shape[3] == 1:
        return [Image.fromarray(a[:, :, 0], mode="L") for a in u8]
    return [Image.fromarray(a, mode="RGB") for a in u8]


def make_grid(images: list, cols: int | None = None, pad: int = 2):
    """Tile PIL images (same size) into one image, `cols` per row (default about square)."""
    Image = _pil()
    if not images:
        raise ValueError("make_grid: no images")
    n = len(images)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im, (c * (w + pad), r * (h + pad)))
    return grid


def save_png(image, path) -> None:
    """Save a PIL image as PNG, atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def load_image(path, max_pixels: int = MAX_IMAGE_PIXELS):
    """Open an image file fully (the file is closed afterwards), refusing before it decodes a file
    whose header claims more than `max_pixels` pixels. A file Pillow cannot read, takes for a
    decompression bomb or fails to decode is a ValueError naming it; a missing or unreadable path
    stays the OSError it is (FileNotFoundError, PermissionError, IsADirectoryError)."""
    Image = _pil()
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) over its own limit: the check below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
                if w * h <= max_pixels:
                    im.load()
                    return im.copy()
    except (FileNotFoundError, IsADirectoryError, PermissionError, MemoryError):
        raise
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: refused as a decompression bomb ({e})") from None
    except Image.UnidentifiedImageError as e:
        raise ValueError(f"{path}: not an image file Pillow can read ({e})") from None
    except Exception as e:  # noqa: BLE001 - a damaged file: Pillow's decoders raise many kinds
        detail = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], bytes) else e  # Pillow's b'...'
        if isinstance(detail, bytes):
            detail = detail.decode("latin-1")
        raise ValueError(f"{path}: cannot decode the image ({type(e).__name__}: {detail})") from None
    raise ValueError(
        f"{path}: the image is {w}x{h} ({w * h} pixels), over the limit of {max_pixels} pixels; reduce it first"
    )
