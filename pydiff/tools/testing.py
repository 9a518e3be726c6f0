"""Tiny synthetic model packages for tests and examples (needs `onnx`, a dev dependency).

`make_tiny_package(dir)` writes a complete format-v1 package whose "networks" are a few ONNX
ops: `out = 0.1 * sample + 0.5 * bias(cond) [+ 0.3 * low_res] + 0 * (other inputs)`, where
`bias` is a projection of the mask-pooled text states or a class embedding. They carry the exact
input names of docs/model-package.md, so the whole cascade runs in milliseconds.
`gaussian_eps_model(cov, schedule)` is an exact network: the eps-prediction of Gaussian data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def gaussian_eps_model(cov, schedule):
    """The exact eps(x_t, t) = E[eps | x_t] for data x0 ~ N(0, cov) over [B, D] samples:
    sqrt(1 - abar) (abar cov + (1 - abar) I)^-1 x_t, in float64, returned as float32."""
    cov = np.asarray(cov, np.float64)
    abar = schedule.alphas_cumprod

    def model(x, t):
        out = np.empty(x.shape, np.float32)
        for tv in np.unique(t):
            ab = abar[int(tv)]
            sel = t == tv
            c = ab * cov + (1.0 - ab) * np.eye(len(cov))
            out[sel] = np.sqrt(1.0 - ab) * np.linalg.solve(c, x[sel].T.astype(np.float64)).T
        return out

    return model


WORDS = [
    "a",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "on",
    "background",
    "small",
    "large",
]


def _tensor(name, arr):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(arr), name=name)


def _stage_graph(
    path: Path,
    *,
    channels: int,
    resolution: int,
    conditioning: str,
    hidden: int,
    max_length: int,
    num_classes: int,
    super_res: bool,
    mask: bool,
    seed: int,
    image_condition: bool = False,
    output: str = "out",
    opset: int = 17,
):
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    B = "batch"
    inputs = [
        helper.make_tensor_value_info("sample", TensorProto.FLOAT, [B, channels, resolution, resolution]),
        helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [B]),
    ]
    names = ["sample", "timestep"]
    inits = [
        _tensor("k_sample", np.float32(0.1)),
        _tensor("k_zero", np.float32(0.0)),
        _tensor("k_bias", np.float32(0.5)),
        _tensor("k_lowres", np.float32(0.3)),
        _tensor("axes_123", np.array([1, 2, 3], np.int64)),
        _tensor("axes_1", np.array([1], np.int64)),
        _tensor("axes_2", np.array([2], np.int64)),
        _tensor("axes_23", np.array([2, 3], np.int64)),
    ]
    nodes = [
        helper.make_node("Mul", ["sample", "k_sample"], ["s_scaled"]),
        helper.make_node("Unsqueeze", ["timestep", "axes_123"], ["t4"]),
        helper.make_node("Mul", ["t4", "k_zero"], ["t_zero"]),
        helper.make_node("Add", ["s_scaled", "t_zero"], ["acc0"]),
    ]
    acc = "acc0"

    def add(term, tag):
        nonlocal acc
        nodes.append(helper.make_node("Add", [acc, term], [f"acc_{tag}"]))
        acc = f"acc_{tag}"

    if conditioning == "text":
        inputs += [
            helper.make_tensor_value_info(
                "encoder_hidden_states", TensorProto.FLOAT, [B, max_length, hidden]
            ),
            helper.make_tensor_value_info("encoder_attention_mask", TensorProto.FLOAT, [B, max_length]),
        ]
        names += ["encoder_hidden_states", "encoder_attention_mask"]
        inits.append(
            _tensor("proj", (rng.standard_normal((hidden, channels)) / np.sqrt(hidden)).astype(np.float32))
        )
        inits.append(_tensor("eps", np.float32(1e-6)))
        nodes += [
            helper.make_node("Unsqueeze", ["encoder_attention_mask", "axes_2"], ["m3"]),
            helper.make_node("Mul", ["encoder_hidden_states", "m3"], ["hm"]),
            helper.make_node("ReduceSum", ["hm", "axes_1"], ["hsum"], keepdims=0),  # [B, D]
            helper.make_node("ReduceSum", ["encoder_attention_mask", "axes_1"], ["msum"], keepdims=1),
            helper.make_node("Add", ["msum", "eps"], ["msum_e"]),
            helper.make_node("Div", ["hsum", "msum_e"], ["pooled"]),
            helper.make_node("MatMul", ["pooled", "proj"], ["b2"]),  # [B, C]
            helper.make_node("Unsqueeze", ["b2", "axes_23"], ["b4"]),
            helper.make_node("Mul", ["b4", "k_bias"], ["bias"]),
        ]
        add("bias", "text")
    elif conditioning == "class":
        inputs.append(helper.make_tensor_value_info("class_labels", TensorProto.INT64, [B]))
        names.append("class_labels")
        emb = rng.standard_normal((num_classes + 1, channels)).astype(np.float32)
        emb[num_classes] = 0.0
        inits.append(_tensor("class_emb", emb))
        nodes += [
            helper.make_node("Gather", ["class_emb", "class_labels"], ["c2"], axis=0),
            helper.make_node("Unsqueeze", ["c2", "axes_23"], ["c4"]),
            helper.make_node("Mul", ["c4", "k_bias"], ["cbias"]),
        ]
        add("cbias", "class")
    if super_res:
        inputs += [
            helper.make_tensor_value_info("low_res", TensorProto.FLOAT, [B, 3, resolution, resolution]),
            helper.make_tensor_value_info("noise_level", TensorProto.FLOAT, [B]),
        ]
        names += ["low_res", "noise_level"]
        nodes += [
            helper.make_node("Mul", ["low_res", "k_lowres"], ["lr"]),
            helper.make_node("Unsqueeze", ["noise_level", "axes_123"], ["nl4"]),
            helper.make_node("Mul", ["nl4", "k_zero"], ["nl_zero"]),
            helper.make_node("Add", ["lr", "nl_zero"], ["lr2"]),
        ]
        if channels != 3:
            raise ValueError("a tiny super-resolution stage needs 3 channels")
        add("lr2", "lowres")
    if mask:
        inputs += [
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, [B, 1, resolution, resolution]),
            helper.make_tensor_value_info("masked_image", TensorProto.FLOAT, [B, 3, resolution, resolution]),
        ]
        names += ["mask", "masked_image"]
        nodes += [
            helper.make_node("Mul", ["mask", "k_zero"], ["mz"]),
            helper.make_node("Mul", ["masked_image", "k_zero"], ["miz"]),
            helper.make_node("ReduceSum", ["miz", "axes_1"], ["miz1"], keepdims=1),
            helper.make_node("Add", ["mz", "miz1"], ["mm"]),
        ]
        add("mm", "mask")
    if image_condition:  # Palette: the grey image, 0.3 x it in every channel (it broadcasts)
        inputs += [
            helper.make_tensor_value_info(
                "image_condition", TensorProto.FLOAT, [B, 1, resolution, resolution]
            )
        ]
        names += ["image_condition"]
        nodes += [helper.make_node("Mul", ["image_condition", "k_lowres"], ["ic"])]
        add("ic", "image")
    nodes.append(helper.make_node("Identity", [acc], [output]))
    outputs = [
        helper.make_tensor_value_info(output, TensorProto.FLOAT, [B, channels, resolution, resolution])
    ]
    used = {n for node in nodes for n in node.input}
    inits = [t for t in inits if t.name in used]  # ORT warns about unused initializers
    graph = helper.make_graph(nodes, "tiny_stage", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pydiff.tools.testing"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return names


def _text_encoder(dirpath: Path, hidden: int, max_length: int, seed: int):
    import onnx
    from onnx import TensorProto, helper
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dirpath / "tokenizer.json"))

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((len(vocab), hidden)).astype(np.float32)
    B, L = "batch", "length"
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "axes_2"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_text_encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, L]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, L]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [B, L, hidden])],
        initializer=[_tensor("emb", emb), _tensor("axes_2", np.array([2], np.int64))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(dirpath / "model.onnx"))


def make_tiny_package(
    path,
    *,
    conditioning: str = "text",
    resolutions=(8, 16),
    channels: int = 3,
    num_classes: int = 4,
    hidden: int = 8,
    max_length: int = 6,
    mask_channel: bool = False,
    image_condition: bool = False,
    steps: int = 4,
    sampler: str = "ddim",
    guidance_scale: float = 2.0,
    thresholding: str = "dynamic",
    noise_aug_level: int = 100,
    name: str = "tiny",
    prediction_type: str = "epsilon",
) -> Path:
    """Write a tiny cascade (one stage per resolution; stages after the first are SR) to `path`."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "format": "pydiff-package",
        "version": 1,
        "name": name,
        "description": f"tiny synthetic {conditioning}-conditional cascade for tests",
        "stages": [],
    }
    if conditioning == "text":
        (root / "text_encoder").mkdir(exist_ok=True)
        _text_encoder(root / "text_encoder", hidden, max_length, seed=1)
        manifest["text_encoder"] = {
            "onnx": "text_encoder/model.onnx",
            "tokenizer": "text_encoder/tokenizer.json",
            "max_length": max_length,
            "hidden_size": hidden,
            "name": "tiny word-level embedding",
        }
    scheduler = {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": prediction_type,
        "timestep_spacing": "trailing",
    }
    recommended = {
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "eta": 0.0,
        "thresholding": thresholding,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.5,
    }
    prev = None
    for i, res in enumerate(resolutions):
        sr = i > 0
        sname = "base" if i == 0 else f"sr{res}"
        fname = f"{sname}.onnx"
        inputs = _stage_graph(
            root / fname,
            channels=3 if sr else channels,
            resolution=res,
            conditioning=conditioning,
            hidden=hidden,
            max_length=max_length,
            num_classes=num_classes,
            super_res=sr,
            mask=mask_channel,
            seed=10 + i,
            image_condition=image_condition and i == 0,
        )
        st = {
            "name": sname,
            "onnx": fname,
            "resolution": res,
            "channels": 3 if sr else channels,
            "conditioning": conditioning,
            "num_classes": num_classes if conditioning == "class" else None,
            "inputs": inputs,
            "output": "out",
            "prediction_type": prediction_type,
            "scheduler": dict(scheduler),
            "recommended": dict(recommended),
        }
        if image_condition and i == 0:
            st["image_condition"] = {"from": "grey"}
        if sr:
            st["low_res_resolution"] = prev
            st["noise_aug"] = {
                "scheduler": {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"},
                "level": noise_aug_level,
            }
        manifest["stages"].append(st)
        prev = res
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def tiny_torch_modules(path) -> dict:
    """torch twins of a tiny text-conditional package's stage networks (for backend tests)."""
    import torch
    from onnx import load as onnx_load
    from onnx import numpy_helper

    class TinyStage(torch.nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = torch.nn.Parameter(torch.from_numpy(proj.copy()))

        def forward(
            self,
            sample,
            timestep,
            encoder_hidden_states,
            encoder_attention_mask,
            low_res=None,
            noise_level=None,
        ):
            m = encoder_attention_mask
            pooled = (encoder_hidden_states * m[:, :, None]).sum(1) / (m.sum(1, keepdim=True) + 1e-6)
            out = (
                0.1 * sample
                + 0.5 * (pooled @ self.proj)[:, :, None, None]
                + 0 * timestep[:, None, None, None]
            )
            if low_res is not None:
                out = out + 0.3 * low_res + 0 * noise_level[:, None, None, None]
            return out

    root = Path(path)
    manifest = json.loads((root / "manifest.json").read_text())
    mods = {}
    for st in manifest["stages"]:
        if st["conditioning"] != "text":
            raise ValueError("tiny_torch_modules covers text-conditional tiny packages")
        w = {t.name: numpy_helper.to_array(t) for t in onnx_load(str(root / st["onnx"])).graph.initializer}
        mods[st["name"]] = TinyStage(w["proj"])
    return mods
