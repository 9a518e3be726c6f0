"""Segmentation on shapes: exact labels, the bounded pixel reservoir, the NumPy ensemble, mIoU, CLI."""

import tracemalloc

import numpy as np
import pytest

pytest.importorskip("torch")

from pydiff.cli import main  # noqa: E402
from pydiff.discriminative import FeatureExtractor, PixelEnsemble  # noqa: E402
from pydiff.errors import PackageError  # noqa: E402
from pydiff.tools.discriminative.export_features import export_feature_graph  # noqa: E402
from pydiff.tools.discriminative.segmentation import (  # noqa: E402
    PixelReservoir,
    fit_diffusion_ensemble,
    miou,
    shapes_segmentation,
    train_ensemble,
)


def test_labels_are_exact_classes():
    x, y = shapes_segmentation(0, 8)
    assert x.shape == (8, 3, 16, 16) and y.shape == (8, 16, 16)
    for img, lab in zip(x, y):
        kinds = set(np.unique(lab)) - {0}
        assert len(kinds) == 1 and kinds <= {1, 2, 3}  # one shape per image, one kind
        inside = lab > 0
        assert 0.05 < inside.mean() < 0.8
        # the labelled pixels are the shape's colour: nearer its median than the background's
        fg, bg = np.median(img[:, inside], 1), np.median(img[:, ~inside], 1)
        d_fg = np.abs(img - fg[:, None, None]).sum(0)
        d_bg = np.abs(img - bg[:, None, None]).sum(0)
        assert ((d_fg < d_bg) == inside).mean() > 0.9


def test_reservoir_memory_is_bounded_on_a_large_stream():
    """200 labelled images x 256 pixels x 128 features (26 MB) into a 2,000-pixel reservoir."""
    res = PixelReservoir(2000, 128, seed=0)
    rng = np.random.default_rng(0)
    tracemalloc.start()
    for _ in range(25):  # 25 chunks of 8 images, as the feature stream yields them
        labels = rng.integers(0, 4, (8, 16, 16))
        feats = np.broadcast_to(labels[:, None].astype(np.float32), (8, 128, 16, 16)).copy()
        res.add(feats, labels)
        del feats
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert res.seen == 200 * 256
    x, y = res.arrays()
    assert x.shape == (2000, 128)
    assert peak < 4e6  # one chunk (1 MB) and the reservoir (1 MB, allocated before): not 26 MB
    np.testing.assert_array_equal(x[:, 0], y)  # each kept feature row beside its own label
    assert np.abs(np.bincount(y, minlength=4) / 2000 - 0.25).max() < 0.05  # a uniform sample


def test_fit_keeps_max_pixels_from_the_real_feature_stream(tmp_path):
    """64 labelled 8x8 digits through the digits feature graph into a 512-pixel reservoir."""
    graph = export_feature_graph("digits", out=tmp_path / "g.onnx")
    fx = FeatureExtractor("digits", t=[100], blocks=[3, 5], graph=graph)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (64, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 4, (64, 8, 8))
    ens, res = fit_diffusion_ensemble(fx, x, y, max_pixels=512, members=2, steps=5, hidden=(8,))
    assert res.seen == 64 * 64 and res.arrays()[0].shape == (512, fx.channels)
    assert len(ens.members) == 2 and ens.meta["blocks"] == [3, 5]


def test_ensemble_predicts_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0)
    ens = train_ensemble(x, y, members=3, hidden=(16,), steps=400, meta={"t": [1]})
    feats = x.T.reshape(1, 4, 20, 30)
    labels, unc = ens.predict(feats)
    assert (labels.reshape(-1) == y).mean() > 0.85
    assert unc.shape == (1, 20, 30) and 0 <= unc.min() and unc.max() <= 2 / 3
    ens.save(tmp_path / "e.safetensors")
    back = PixelEnsemble.load(tmp_path / "e.safetensors")
    np.testing.assert_array_equal(back.predict(feats)[0], labels)
    assert back.meta == {"t": [1]}
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(PackageError, match="pixel-ensemble"):
        PixelEnsemble.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="feats"):
        ens.predict(np.zeros((1, 5, 2, 2), np.float32))


def test_identical_members_never_disagree():
    w = [(np.eye(4, dtype=np.float32), np.zeros(4, np.float32))]
    ens = PixelEnsemble([w, w], np.zeros(4), np.ones(4))
    _, unc = ens.predict(np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32))
    assert unc.max() == 0


def test_miou():
    t = np.array([[0, 0, 1, 1]])
    assert miou(t, t, 2)[0] == 1.0
    assert miou(np.array([[0, 0, 0, 1]]), t, 2)[0] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_cli_segment_bad_n_exits_2(tmp_path):
    assert main(["segment", "train", "-n", "0", "-o", str(tmp_path / "e.safetensors")]) == 2
