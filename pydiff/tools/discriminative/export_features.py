"""The feature graph of a stage: its network, rebuilt from the package's ONNX weights, returning
every decoder block's activations (after the block's attention where it has one)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import onnx
import torch

from pydiff.discriminative.features import FEATURES_KEY, decoder_block_outputs, default_feature_graph
from pydiff.files import atomic_write_bytes
from pydiff.package import load_package
from pydiff.tools.models.unet import AttnBlock
from pydiff.tools.training.from_package import torch_module


class DecoderFeatures(torch.nn.Module):
    """`net`'s forward, returning the outputs of its decoder's ResBlock entries, coarsest first."""

    def __init__(self, net, input_names):
        super().__init__()
        self.net = net
        self.input_names = list(input_names)
        self._taps = [
            blk[1] if isinstance(blk[1], AttnBlock) else blk[0]
            for blk in net.up
            if len(blk) == 2 and not isinstance(blk[0], torch.nn.Upsample)
        ]
        self._store: list = []
        for m in self._taps:
            m.register_forward_hook(lambda _m, _i, out: self._store.append(out))

    def forward(self, *inputs):
        self._store.clear()
        self.net(**dict(zip(self.input_names, inputs)))
        out = tuple(self._store)
        self._store.clear()
        return out


def export_feature_graph(model=None, stage: str | None = None, out: str | Path | None = None) -> Path:
    """Write the feature graph of `stage` of package `model` to `out` (default: where
    `pydiff.discriminative.features` looks for it); returns the path."""
    package = load_package(model)
    st = package.stage(stage) if stage else package.stages[0]
    net = torch_module(st.onnx)
    head = DecoderFeatures(net, st.inputs).eval()
    cfg = net.cfg
    b, r = 2, st.resolution
    example = {"sample": torch.zeros(b, st.channels, r, r), "timestep": torch.full((b,), 100.0)}
    if cfg.conditioning == "text":
        example["encoder_hidden_states"] = torch.zeros(b, 4, cfg.text_dim)
        example["encoder_attention_mask"] = torch.ones(b, 4)
    elif cfg.conditioning == "class":
        example["class_labels"] = torch.zeros(b, dtype=torch.int64)
    inputs = list(st.inputs)
    args = tuple(example[k] for k in inputs)
    with torch.no_grad():
        feats = head(*args)
    names = [decoder_block_outputs(i) for i in range(len(feats))]
    dynamic = {k: {0: "batch"} for k in inputs}
    if "encoder_hidden_states" in dynamic:
        dynamic["encoder_hidden_states"] = {0: "batch", 1: "tokens"}
        dynamic["encoder_attention_mask"] = {0: "batch", 1: "tokens"}
    dynamic.update({n: {0: "batch"} for n in names})
    path = Path(out) if out is not None else default_feature_graph(package, st)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.onnx.export(
        head,
        args,
        buf,
        input_names=inputs,
        output_names=names,
        dynamic_axes=dynamic,
        opset_version=17,
        dynamo=False,
    )
    graph = onnx.load_from_string(buf.getvalue())
    entry = graph.metadata_props.add()
    blocks = [
        {"name": n, "channels": int(f.shape[1]), "resolution": int(f.shape[2])} for n, f in zip(names, feats)
    ]
    entry.key, entry.value = (
        FEATURES_KEY,
        json.dumps({"blocks": blocks, "stage": st.name, "package": package.name}),
    )
    atomic_write_bytes(path, graph.SerializeToString())
    return path
