"""Per-pixel features from a stage network's decoder, after Baranchuk et al. (2022), Sec. 3.

The images are noised to each timestep t by the forward process, x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps (DDPM eq. 4), with one noise draw eps shared by every image and every t (the
paper's choice: the features then differ between images only through the images). The feature
graph (`pydiff segment features` writes it, see docs/model-package.md) returns the stage's decoder
blocks' activations; they are upsampled bilinearly to the stage's resolution and concatenated
(t-major, block-minor) along channels. Work is done `batch` images at a time and yielded, so that
memory does not grow with the number of images.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pydiff.backends.ort import create_session, resolve_providers
from pydiff.backends.text_encoder import load_text_encoder
from pydiff.errors import PackageError
from pydiff.package import Package, Stage, input_dtype, load_package
from pydiff.schedules import Schedule

FEATURES_KEY = "pydiff.features"  # ONNX metadata: {"blocks": [{"name", "channels", "resolution"}]}


def decoder_block_outputs(index: int) -> str:
    """The feature graph's output name for decoder block `index` (0 = the coarsest)."""
    return f"decoder_{index}"


def _cache_root() -> Path:
    root = os.environ.get("PYDIFF_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "pydiff"


def default_feature_graph(package: Package, stage: Stage) -> Path:
    """Where the feature graph of `stage` is looked for: `<package>/features/<stage>.onnx` when the
    package ships one, else the user cache, keyed by the stage file's content
    (`$PYDIFF_CACHE` or ~/.cache/pydiff, `features/<package>-<stage>-<sha256[:12]>.onnx`)."""
    shipped = package.path / "features" / f"{stage.name}.onnx"
    if shipped.is_file():
        return shipped
    digest = hashlib.sha256(Path(stage.onnx).read_bytes()).hexdigest()[:12]
    return _cache_root() / "features" / f"{package.name}-{stage.name}-{digest}.onnx"


def upsample_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [B, C, h, w] to [B, C, size, size] (half-pixel centres, as torch's
    `interpolate(..., mode="bilinear", align_corners=False)`)."""
    b, c, h, w = x.shape
    if h == size and w == size:
        return x

    def weights(n: int) -> np.ndarray:
        src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        m = np.zeros((size, n), np.float32)
        np.add.at(m, (np.arange(size), lo), 1 - (src - lo))
        np.add.at(m, (np.arange(size), hi), src - lo)
        return m

    wy, wx = weights(h), weights(w)
    return np.einsum("yh,bchw,xw->bcyx", wy, x, wx, optimize=True).astype(np.float32)


def _chunks(images, batch: int) -> Iterator[np.ndarray]:
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"images: expected [N, C, H, W], got shape {images.shape}")
        for i in range(0, len(images), batch):
            yield images[i : i + batch]
        return
    if not isinstance(images, Iterable):
        raise TypeError(
            f"images: expected an array [N, C, H, W] or an iterable of them, got {type(images).__name__}"
        )
    for chunk in images:
        chunk = np.asarray(chunk)
        if chunk.ndim == 3:
            chunk = chunk[None]
        yield from _chunks(chunk, batch)


class FeatureExtractor:
    """The feature graph of one stage on ONNX Runtime, with its unconditional inputs.

    `__call__(images [B, C, R, R] in [-1, 1])` -> float32 [B, len(t) * sum(channels), R, R]."""

    def __init__(
        self, model=None, *, stage=None, t=(50, 150), blocks=None, seed=0, graph=None, providers="cpu"
    ):
        self.package = model if isinstance(model, Package) else load_package(model)
        self.stage = self.package.stage(stage) if stage else self.package.stages[0]
        st = self.stage
        path = Path(graph) if graph is not None else default_feature_graph(self.package, st)
        if not path.is_file():
            raise PackageError(
                f"{path}: no feature graph for stage {st.name!r} of {self.package.name!r}; write it with "
                f"`pydiff segment features --model {self.package.path} --stage {st.name}`"
            )
        self.session = create_session(path, resolve_providers(providers), required=())
        meta = self.session.get_modelmeta().custom_metadata_map
        if FEATURES_KEY not in meta:
            raise PackageError(f"{path}: no {FEATURES_KEY!r} metadata (not a pydiff feature graph)")
        self.available = json.loads(meta[FEATURES_KEY])["blocks"]
        self.blocks = list(range(len(self.available))) if blocks is None else [int(b) for b in blocks]
        bad = [b for b in self.blocks if not 0 <= b < len(self.available)]
        if bad or not self.blocks:
            raise ValueError(
                f"blocks: {bad or self.blocks} not among the graph's decoder blocks 0..{len(self.available) - 1}"
            )
        self.schedule = Schedule.from_config(dict(st.scheduler))
        self.t = [int(v) for v in np.atleast_1d(t)]
        if not self.t or any(not 0 <= v < self.schedule.num_train_timesteps for v in self.t):
            raise ValueError(f"t: {self.t}; each must be in [0, {self.schedule.num_train_timesteps - 1}]")
        r = st.resolution
        self.noise = np.random.default_rng(seed).standard_normal((1, st.channels, r, r)).astype(np.float32)
        self.channels = len(self.t) * sum(self.available[b]["channels"] for b in self.blocks)
        self._cond = self._unconditional()

    def _unconditional(self) -> dict[str, np.ndarray]:
        st = self.stage
        if st.conditioning == "text":
            enc = load_text_encoder(self.package, resolve_providers("cpu"))
            states, mask = enc.encode([""])
            return {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        if st.conditioning == "class":
            return {"class_labels": np.array([st.num_classes], np.int64)}
        if st.conditioning == "none":
            return {}
        raise PackageError(
            f"stage {st.name!r}: features for {st.conditioning!r} conditioning are not supported"
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        st = self.stage
        x = np.asarray(images, np.float32)
        want = (st.channels, st.resolution, st.resolution)
        if x.ndim != 4 or x.shape[1:] != want:
            raise ValueError(
                f"images: expected [B, {want[0]}, {want[1]}, {want[2]}] in [-1, 1], got {x.shape}"
            )
        b = len(x)
        names = [decoder_block_outputs(k) for k in self.blocks]
        out = []
        for t in self.t:
            feed = {"sample": self.schedule.add_noise(x, np.broadcast_to(self.noise, x.shape), t)}
            feed["timestep"] = np.full(b, t, np.float32)
            feed.update({k: np.repeat(v, b, axis=0).astype(input_dtype(k)) for k, v in self._cond.items()})
            for f in self.session.run(names, feed):
                out.append(upsample_bilinear(np.asarray(f, np.float32), st.resolution))
        return np.concatenate(out, axis=1)


def features(
    images, t=(50, 150), blocks=None, seed=0, *, model=None, stage=None, batch=16, graph=None, providers="cpu"
) -> Iterator[np.ndarray]:
    """Per-pixel diffusion features of `images`, streamed: yields float32 [b, D, R, R] for each
    chunk of at most `batch` images, D = len(t) * the chosen blocks' channels.

    `images`: float32 [N, C, R, R] in [-1, 1] at the stage's resolution, or an iterable of such
    chunks (or of single [C, R, R] images); `model`: a package or bundled name (default shapes);
    `stage`: its name (default the first); `blocks`: decoder block indices (default all)."""
    fx = FeatureExtractor(model, stage=stage, t=t, blocks=blocks, seed=seed, graph=graph, providers=providers)
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    return (fx(chunk) for chunk in _chunks(images, batch))
