"""The torch networks of a model package, rebuilt from the package's own ONNX weights.

A stage file exported by pydiff carries its network's config in the ONNX metadata (key
`pydiff.network`, `{"class": "UNet", "config": UNetConfig.to_dict()}`); its weights are the file's
initializers, named like the torch parameters (`m.<name>`, `__fp16` when stored as float16). The
exporter folds GroupNorm's scale and shift into anonymous `Mul` / `Add` initializers after an
`InstanceNormalization`; their node names (`/m/<module path>/Mul`) say which module they belong to.
So a checkout needs no training run to get the torch twin of a bundled network (the benchmark's
peer, the torch backend).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from pydiff.errors import PackageError
from pydiff.package import Package, load_package
from pydiff.tools.models import build_model

NETWORK_KEY = "pydiff.network"


def network_config(model: onnx.ModelProto, path) -> dict:
    """The `pydiff.network` metadata of an exported stage file."""
    meta = {p.key: p.value for p in model.metadata_props}
    if NETWORK_KEY not in meta:
        raise PackageError(
            f"{path}: no {NETWORK_KEY!r} metadata (not exported by pydiff's exporter); give the torch "
            f"networks yourself: pydiff.load(path, backend='torch', modules={{stage: module}})"
        )
    net = json.loads(meta[NETWORK_KEY])
    if net.get("class") != "UNet":
        raise PackageError(f"{path}: network class {net.get('class')!r}; this pydiff rebuilds 'UNet' only")
    return net["config"]


def write_network_config(path: str | Path, config: dict) -> None:
    """Record the network config in an ONNX file's metadata (what `torch_modules` reads back)."""
    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if p.key != NETWORK_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    entry = model.metadata_props.add()
    entry.key, entry.value = NETWORK_KEY, json.dumps({"class": "UNet", "config": config}, sort_keys=True)
    onnx.save(model, str(path))


def onnx_state_dict(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """float32 arrays by torch parameter name, from an exported stage's initializers."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    casts = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}

    def value(name):
        return inits[casts.get(name, name)] if casts.get(name, name) in inits else None

    out = {}
    for name, arr in inits.items():
        if name.startswith("m."):
            out[name.removeprefix("m.").removesuffix("__fp16")] = arr.astype(np.float32)
    # Parameters the exporter renamed: GroupNorm's scale and shift (/m/<path>/Mul, /m/<path>/Add after
    # an InstanceNormalization) and the weights of Linear layers on 3-d inputs (/m/<path>/MatMul, the
    # weight transposed), the module path taken from the node's name
    for node in model.graph.node:
        parts = node.name.split("/")
        if len(parts) < 4 or parts[1] != "m" or parts[-1] not in ("Mul", "Add", "MatMul"):
            continue
        if node.op_type != parts[-1]:
            continue
        anon = [i for i in node.input if i.startswith("onnx::")]
        arr = value(anon[0]) if len(anon) == 1 else None
        if arr is None:
            continue
        path = ".".join(parts[2:-1])
        if node.op_type == "MatMul":
            out[path + ".weight"] = arr.astype(np.float32).T
        else:
            out[path + (".weight" if node.op_type == "Mul" else ".bias")] = arr.astype(np.float32).reshape(-1)
    return out


def torch_module(path: str | Path) -> torch.nn.Module:
    """The network of one exported stage file as a torch module in eval mode, with its weights."""
    model = onnx.load(str(path))
    net = build_model(network_config(model, path))
    weights = onnx_state_dict(model)
    want = net.state_dict()
    missing = sorted(k for k in want if k not in weights)
    if missing:
        raise PackageError(f"{path}: the file lacks the weights {missing[:4]} of its network config")
    state = {
        k: torch.from_numpy(np.ascontiguousarray(weights[k]).reshape(tuple(v.shape))) for k, v in want.items()
    }
    net.load_state_dict(state, strict=True)
    return net.eval()


def torch_modules(package: Package | str | Path) -> dict[str, torch.nn.Module]:
    """{stage name: its network as a torch module in eval mode}, with the package's weights
    (`pydiff.load(package, backend="torch", modules=torch_modules(package))`)."""
    package = package if isinstance(package, Package) else load_package(package)
    return {st.name: torch_module(st.onnx) for st in package.stages}
