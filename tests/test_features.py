"""pydiff.discriminative.features: the feature graph against its torch twin, streaming, shared noise."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pydiff.discriminative import FeatureExtractor, features, upsample_bilinear  # noqa: E402
from pydiff.errors import PackageError  # noqa: E402
from pydiff.package import load_package  # noqa: E402
from pydiff.tools.discriminative.export_features import DecoderFeatures, export_feature_graph  # noqa: E402
from pydiff.tools.training.from_package import torch_module  # noqa: E402

TESTS = Path(__file__).resolve().parent  # no pydiff/ here: subprocesses import the installed one


@pytest.fixture(scope="module")
def digits_graph(tmp_path_factory):
    return export_feature_graph("digits", out=tmp_path_factory.mktemp("f") / "digits-base.onnx")


def _images(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32)


def test_graph_matches_torch_decoder(digits_graph):
    fx = FeatureExtractor("digits", t=[100], graph=digits_graph, seed=3)
    x = _images(3)
    st = load_package("digits").stages[0]
    net = torch_module(st.onnx)
    head = DecoderFeatures(net, st.inputs)
    xt = fx.schedule.add_noise(x, np.broadcast_to(fx.noise, x.shape), 100)
    with torch.no_grad():
        want = head(torch.from_numpy(xt), torch.full((3,), 100.0), torch.full((3,), 10, dtype=torch.int64))
    want = np.concatenate(
        [torch.nn.functional.interpolate(f, size=8, mode="bilinear").numpy() for f in want], 1
    )
    np.testing.assert_allclose(fx(x), want, rtol=1e-4, atol=1e-4)


def test_streams_in_chunks_with_the_stated_width(digits_graph):
    chunks = list(
        features(_images(5), t=[50, 200], blocks=[0, 2], model="digits", batch=2, graph=digits_graph)
    )
    assert [len(c) for c in chunks] == [2, 2, 1]
    fx = FeatureExtractor("digits", t=[50, 200], blocks=[0, 2], graph=digits_graph)
    assert chunks[0].shape[1:] == (fx.channels, 8, 8)
    assert fx.channels == 2 * (fx.available[0]["channels"] + fx.available[2]["channels"])


def test_noise_is_shared_between_images_and_seeded(digits_graph):
    x = _images(1)
    both = np.concatenate([x, _images(1, 1), x])
    f = next(features(both, t=[300], model="digits", seed=7, graph=digits_graph))
    np.testing.assert_allclose(f[0], f[2], atol=1e-5)  # the same image, the same noise: same features
    g = next(features(x, t=[300], model="digits", seed=8, graph=digits_graph))
    assert np.abs(f[0] - g[0]).max() > 1e-3


def test_upsample_matches_torch_bilinear():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=16, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(upsample_bilinear(x, 16), want.numpy(), atol=1e-5)


def test_bad_input_is_named(digits_graph, tmp_path):
    with pytest.raises(ValueError, match="blocks"):
        FeatureExtractor("digits", blocks=[99], graph=digits_graph)
    with pytest.raises(ValueError, match="t:"):
        FeatureExtractor("digits", t=[1000], graph=digits_graph)
    with pytest.raises(ValueError, match="images"):
        next(features(np.zeros((2, 3, 8, 8), np.float32), model="digits", graph=digits_graph))
    with pytest.raises(PackageError, match="pydiff segment features"):
        FeatureExtractor("digits", graph=tmp_path / "none.onnx")


def test_runtime_imports_no_torch():
    code = "import sys, pydiff.discriminative; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=TESTS)
