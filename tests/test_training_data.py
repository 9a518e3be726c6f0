"""The `shapes` and `digits` training data (issue 4's specification)."""

from __future__ import annotations

import numpy as np
import pytest

from pydiff.tools.data import shapes as S


def test_combos_and_held_out():
    assert len(S.HELD_OUT) == 12
    assert len(S.all_combos(include_held_out=True)) == 8 * 7 * 3
    seen = S.all_combos()
    assert len(seen) == 8 * 7 * 3 - 12
    assert not (set(seen) & S.HELD_OUT)
    assert all(fg != bg for fg, _, bg in seen)


def test_held_out_never_sampled():
    specs = S.sample_specs(np.random.default_rng(0), 5000)
    assert not any((s.fg, s.shape, s.bg) in S.HELD_OUT for s in specs)
    assert {s.shape for s in specs} == set(S.SHAPES)
    assert {s.fg for s in specs} == set(S.PALETTE) == {s.bg for s in specs}


def test_bounds_and_jitter():
    specs = S.sample_specs(np.random.default_rng(1), 2000)
    for s in specs:
        assert S.MIN_SIDE <= s.side <= S.MAX_SIDE
        assert 0 <= s.x0 and s.x0 + s.side <= 64 and 0 <= s.y0 and s.y0 + s.side <= 64
        assert max(map(abs, s.fg_jitter + s.bg_jitter)) <= S.JITTER


@pytest.mark.parametrize("shape,fill", [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_render_palette_and_geometry(shape, fill):
    spec = S.ShapeSpec("red", shape, "blue", x0=10.0, y0=12.0, side=32.0)
    img = S.render(spec)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == S.PALETTE["blue"]  # exact palette, no jitter
    assert tuple(img[12 + 30, 10 + 16]) == S.PALETTE["red"]  # inside every shape
    fg = (img == np.array(S.PALETTE["red"])).all(-1)
    ys, xs = np.nonzero((img != np.array(S.PALETTE["blue"])).any(-1))
    assert ys.min() >= 12 and ys.max() < 12 + 32 and xs.min() >= 10 and xs.max() < 10 + 32
    assert abs(fg.sum() / 32**2 - fill) < 0.06


def test_render_rejects_same_colour():
    with pytest.raises(ValueError):
        S.render(S.ShapeSpec("red", "circle", "red", 0, 0, 30))


def test_captions_and_resize():
    caps = S.all_captions()
    assert len(caps) == len(set(caps)) == 168 * len(S.TEMPLATES)
    assert S.caption("red", "circle", "blue") == "a red circle on a blue background"
    x = S.render_batch(S.sample_specs(np.random.default_rng(2), 4))
    assert x.shape == (4, 3, 64, 64) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    lo = S.area_resize(x, 16)
    assert lo.shape == (4, 3, 16, 16)
    np.testing.assert_allclose(lo.mean(axis=(2, 3)), x.mean(axis=(2, 3)), atol=1e-5)


def test_digits():
    pytest.importorskip("sklearn")
    from pydiff.tools.data import load_digits_images

    x, y = load_digits_images()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10))


def test_shape_reader_on_renders():
    from pydiff.tools.eval.packages import read_shape

    specs = S.sample_specs(np.random.default_rng(3), 300, include_held_out=True)
    for s in specs:
        r = read_shape(S.render(s))
        assert (r["fg"], r["shape"], r["bg"]) == (s.fg, s.shape, s.bg)


def test_caption_embedding_cache_is_keyed_on_the_encoding(tmp_path, monkeypatch):
    """The training cache of caption states is reused only for the same encoder file, captions,
    length and per-prompt encoding; a cache from the batched encoding (no "encode" key) is redone."""
    pytest.importorskip("torch")
    import json

    import pydiff.tools.training.tasks as te  # where caption_embeddings finds TextEncoder
    from pydiff.tools.training.tasks import caption_embeddings

    calls = []

    class FakeEncoder:
        def __init__(self, onnx, tokenizer, max_length, **kw):
            assert kw.get("per_prompt", True), "training must encode each caption alone"
            self.max_length = max_length

        def encode(self, prompts):
            calls.append(len(prompts))
            n = len(prompts)
            return (
                np.full((n, self.max_length, 4), float(len(calls)), np.float32),
                np.ones((n, self.max_length), np.float32),
            )

    monkeypatch.setattr(te, "TextEncoder", FakeEncoder)
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "model.onnx").write_bytes(b"one")
    cache = tmp_path / "run" / "caption_embeddings.safetensors"

    captions, states, mask = caption_embeddings(enc, 16, cache)
    assert captions[-1] == "" and states.shape == (len(captions), 16, 4) and calls == [len(captions)]
    meta = json.loads((tmp_path / "run" / "caption_embeddings.safetensors.json").read_text())
    assert meta["encode"] == "per_prompt"
    _, again, _ = caption_embeddings(enc, 16, cache)  # reused: no second encoding
    assert len(calls) == 1 and np.array_equal(again, states)

    del meta["encode"]  # a cache of the batched encoding
    (tmp_path / "run" / "caption_embeddings.safetensors.json").write_text(json.dumps(meta))
    _, redone, _ = caption_embeddings(enc, 16, cache)
    assert len(calls) == 2 and redone[0, 0, 0] == 2.0

    (enc / "model.onnx").write_bytes(b"two")  # another encoder file
    caption_embeddings(enc, 16, cache)
    assert len(calls) == 3
    caption_embeddings(enc, 8, cache)  # another length
    assert len(calls) == 4
