"""Export a stage network to ONNX (opset 17, dynamic batch) and verify it against PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pydiff.tools.export.static_shapes import freeze_shapes_file

OPSET = 17
MAX_ABS_ERR = 1e-4


def example_inputs(
    input_names: list[str],
    batch: int,
    channels: int,
    resolution: int,
    max_length: int = 16,
    text_dim: int = 384,
    num_classes: int = 10,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random inputs [batch, ...] named as in docs/model-package.md (mask with padding)."""
    rng = np.random.default_rng(seed)
    r = resolution
    out: dict[str, np.ndarray] = {}
    for n in input_names:
        if n == "sample":
            out[n] = rng.standard_normal((batch, channels, r, r)).astype(np.float32)
        elif n == "timestep":
            out[n] = rng.uniform(0, 999, size=batch).astype(np.float32)
        elif n == "encoder_hidden_states":
            out[n] = rng.standard_normal((batch, max_length, text_dim)).astype(np.float32)
        elif n == "encoder_attention_mask":
            lengths = rng.integers(2, max_length + 1, size=batch)
            out[n] = (np.arange(max_length)[None] < lengths[:, None]).astype(np.float32)
        elif n == "class_labels":
            out[n] = rng.integers(0, num_classes + 1, size=batch).astype(np.int64)
        elif n in ("low_res", "masked_image"):
            out[n] = rng.standard_normal((batch, 3, r, r)).astype(np.float32)
        elif n == "noise_level":
            out[n] = rng.uniform(0, 250, size=batch).astype(np.float32)
        elif n == "mask":
            out[n] = (rng.random((batch, 1, r, r)) < 0.5).astype(np.float32)
        elif n == "image_condition":  # a grey image in [-1, 1]
            out[n] = rng.uniform(-1, 1, (batch, 1, r, r)).astype(np.float32)
        else:
            raise ValueError(f"unknown input {n!r}")
    return out


def store_weights_fp16(onnx_path: str | Path, min_size: int = 64) -> None:
    """Store float32 initializers with >= min_size elements as float16 plus a Cast to float32.

    Halves the file; ONNX Runtime folds the casts at load, so it still computes in float32.
    The caller must have rounded the weights to float16 already so nothing changes numerically.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path))
    g = model.graph
    keep, casts = [], []
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= min_size:
            arr = numpy_helper.to_array(init)
            half = numpy_helper.from_array(arr.astype(np.float16), name=init.name + "__fp16")
            keep.append(half)
            casts.append(
                helper.make_node(
                    "Cast", [half.name], [init.name], to=TensorProto.FLOAT, name=init.name + "__cast"
                )
            )
        else:
            keep.append(init)
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(onnx_path))


def export_stage_onnx(
    module,
    input_names: list[str],
    path: str | Path,
    *,
    channels: int,
    resolution: int,
    max_length: int = 16,
    text_dim: int = 384,
    num_classes: int = 10,
    output_name: str = "out",
    call=None,
    max_abs_err: float = MAX_ABS_ERR,
    fp16_weights: bool = False,
    static_shapes: bool = True,
) -> dict:
    """Trace `module` to ONNX at `path` and check ORT against PyTorch on fresh random inputs.

    `call(module, **inputs)` maps the named inputs to the module's forward (default: keywords).
    With `fp16_weights` the module's parameters are first rounded to float16 (in place) and
    stored as float16 in the file; the check then compares with the rounded PyTorch module.
    With `static_shapes` the graph's shape arithmetic is folded into constants (only the batch
    stays dynamic; pydiff.tools.export.static_shapes), so no node of it needs the CPU on a GPU
    provider; a graph that cannot be frozen is kept as traced, with a warning.
    Raises (and leaves nothing at `path`) if the max abs error exceeds `max_abs_err`.
    """
    import onnxruntime as ort
    import torch

    path = Path(path)
    if fp16_weights:
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(p.half().float())
    call = call or (lambda m, **kw: m(**kw))

    class Named(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *args):
            return call(self.m, **dict(zip(input_names, args)))

    wrapped = Named(module).eval()
    kw = dict(
        channels=channels,
        resolution=resolution,
        max_length=max_length,
        text_dim=text_dim,
        num_classes=num_classes,
    )
    trace = example_inputs(input_names, 2, seed=0, **kw)
    dyn = {n: {0: "batch"} for n in input_names}
    dyn[output_name] = {0: "batch"}
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(
            wrapped,
            tuple(torch.from_numpy(trace[n]) for n in input_names),
            str(tmp),
            opset_version=OPSET,
            dynamo=False,
            input_names=list(input_names),
            output_names=[output_name],
            dynamic_axes=dyn,
            do_constant_folding=True,
        )
    module.eval()  # the TorchScript exporter may leave modules in training mode
    try:
        if fp16_weights:
            store_weights_fp16(tmp)
        frozen = freeze_shapes_file(tmp, strict=False) if static_shapes else None
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        worst = 0.0
        for batch, seed in ((3, 1), (1, 2)):  # a batch size unlike the traced one
            x = example_inputs(input_names, batch, seed=seed, **kw)
            (got,) = sess.run([output_name], x)
            with torch.no_grad():
                ref = wrapped(*(torch.from_numpy(x[n]) for n in input_names)).numpy()
            if got.shape != ref.shape:
                raise RuntimeError(f"ONNX output shape {got.shape} != PyTorch {ref.shape}")
            worst = max(worst, float(np.abs(got - ref).max()))
        if not worst <= max_abs_err:
            raise RuntimeError(
                f"ONNX Runtime disagrees with PyTorch: max abs err {worst:.3g} > {max_abs_err}"
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"max_abs_err": worst, "tmp_path": str(tmp), "static_shapes": frozen}
