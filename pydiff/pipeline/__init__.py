"""The cascaded pipeline and the module-level API (`pydiff.generate`, ...).

The module-level functions run on a pipeline cached per (package path, backend); `model=` picks
the package (a path or a `Pipeline`), default the bundled `shapes` cascade.
"""

from __future__ import annotations

import os
import threading

from pydiff.errors import PackageError
from pydiff.package import bundled_packages, bundled_path, load_package, package_path
from pydiff.pipeline.pipeline import Pipeline

__all__ = [
    "Pipeline",
    "load",
    "generate",
    "inpaint",
    "img2img",
    "upscale",
    "colorize",
    "PackageError",
    "load_package",
    "bundled_path",
    "bundled_packages",
    "clear_cache",
]

_cache: dict[tuple[str, str, str], Pipeline] = {}
_cache_lock = threading.Lock()


def load(path=None, backend: str = "auto", **backend_options) -> Pipeline:
    """A new pipeline for the model package at `path`, or the bundled package of that name
    ("digits"); None: the bundled shapes cascade."""
    return Pipeline(path, backend=backend, **backend_options)


def _pipeline(model, backend="auto", **backend_options) -> Pipeline:
    if isinstance(model, Pipeline):
        return model
    path = package_path(model)
    key = (os.path.realpath(path), str(backend), repr(sorted(backend_options.items())))
    with _cache_lock:
        pipe = _cache.get(key)
        if pipe is None:
            # None: load_package explains a missing bundled package itself
            pipe = _cache[key] = Pipeline(None if model is None else path, backend=backend, **backend_options)
        return pipe


def clear_cache() -> None:
    """Forget the cached default pipelines."""
    with _cache_lock:
        _cache.clear()


def generate(prompt=None, *, model=None, backend="auto", **kwargs):
    """`Pipeline.generate` on the cached pipeline for `model` (default: bundled shapes)."""
    return _pipeline(model, backend).generate(prompt, **kwargs)


def inpaint(image, mask, prompt=None, *, model=None, backend="auto", **kwargs):
    """`Pipeline.inpaint` on the cached pipeline for `model`."""
    return _pipeline(model, backend).inpaint(image, mask, prompt, **kwargs)


def img2img(image, prompt=None, *, model=None, backend="auto", **kwargs):
    """`Pipeline.img2img` on the cached pipeline for `model`."""
    return _pipeline(model, backend).img2img(image, prompt, **kwargs)


def upscale(image, prompt=None, *, model=None, backend="auto", **kwargs):
    """`Pipeline.upscale` on the cached pipeline for `model`."""
    return _pipeline(model, backend).upscale(image, prompt, **kwargs)


def colorize(image, prompt=None, *, model, backend="auto", **kwargs):
    """`Pipeline.colorize` on the cached pipeline for `model` (a package with a colorization stage)."""
    return _pipeline(model, backend).colorize(image, prompt, **kwargs)
