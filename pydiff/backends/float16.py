"""Mixed-precision ONNX graphs: float16 compute with float32 inputs and outputs.

TensorRT 11 networks are strongly typed (the FP16 builder flag is gone): an engine computes in the
types its ONNX file declares, so fp16 means rewriting the graph, the step NVIDIA's migration guide
gives to ModelOpt AutoCast (`keep_io_types=True`). This pass does that for pydiff's networks without
the dependency, by rules that can be read and tested:

- the ops in `FLOAT16_OPS` (convolutions, matrix products, elementwise arithmetic and activations,
  data movement) run in float16; their float32 weights are stored as float16;
- statistics and exponentials stay in float32 (`KEEP_FLOAT32`: normalisations, softmax, reductions,
  exp / log / pow / sqrt), as every other op the pass does not know;
- the arguments of Sin and Cos stay in float32 with everything that computes them (a timestep
  embedding's t * frequency reaches 999: float16 spacing there is 0.5, a phase error of 0.25 rad),
  and so do Resize's scales and roi with what computes them;
- an op with a constant beyond float16's range (a -1e9 mask fill, Clip at FLT_MAX) stays in float32,
  as AutoCast's `init_max` rule does;
- the graph's inputs and outputs keep their float32 types, so the buffers pydiff binds do not change.

A float32 value beyond 65504 that reaches a float16 op becomes +-inf there, as in any float16
engine; a sampler then stops with NonFiniteError. So a normalisation written out as separate ops
(ReduceMean, Sub, Pow, ReduceMean, Add eps, ...) adds its variance to eps in float16 and overflows
on large activations; pydiff's exports use ONNX's InstanceNormalization / LayerNormalization. Casts go only where a float32 tensor meets a
float16 op or back; a float16 weight stored with a Cast
to float32 (how pydiff packages store weights) feeds float16 ops directly, and float constants are
folded to float16. The result passes ONNX shape inference and the full checker.

    pydiff export float16 IN.onnx OUT.onnx
    pydiff export float16 --package SRC_PACKAGE DST_PACKAGE
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pydiff.errors import MixedPrecisionError
from pydiff.files import atomic_write_bytes, write_folder_atomic
from pydiff.package import load_package

VERSION = 1  # part of the TensorRT engine cache key: a change to these rules builds new engines

FLOAT16_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "MatMul",
        "Gemm",
        "Einsum",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Abs",
        "Max",
        "Min",
        "Clip",
        "Where",
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "HardSigmoid",
        "Tanh",
        "Erf",
        "Elu",
        "Selu",
        "Softplus",
        "Mish",
        "Concat",
        "Split",
        "Slice",
        "Reshape",
        "Transpose",
        "Unsqueeze",
        "Squeeze",
        "Flatten",
        "Expand",
        "Gather",
        "Identity",
        "Resize",
        "Pad",
        "Tile",
        "DepthToSpace",
        "SpaceToDepth",
        "AveragePool",
        "MaxPool",
        "GlobalAveragePool",
    }
)
KEEP_FLOAT32 = frozenset(
    {
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "BatchNormalization",
        "Softmax",
        "LogSoftmax",
        "ReduceSum",
        "ReduceMean",
        "ReduceProd",
        "ReduceL2",
        "ReduceLogSumExp",
        "ReduceSumSquare",
        "Exp",
        "Log",
        "Pow",
        "Sqrt",
        "Reciprocal",
        "Sin",
        "Cos",
        "Range",
        "CumSum",
    }
)
PHASE_OPS = frozenset({"Sin", "Cos"})
# inputs of float16 ops that are not the op's data type: Resize's roi and scales
NOT_DATA_INPUTS = {"Resize": {1, 2}}
# ops that take any type and give no float output: their inputs need no cast
TYPE_AGNOSTIC = frozenset({"Shape", "Size"})
FP16_MAX = float(np.finfo(np.float16).max)


def convert(model, what: str = "model"):
    """A float16-compute copy of `model` (an onnx.ModelProto) with float32 inputs and outputs."""
    import onnx  # lazily: the [tensorrt] extra; ONNX graphs are edited only here
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as e:
        raise MixedPrecisionError(f"{what}: ONNX shape inference fails on this graph ({e})") from e
    g = model.graph
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise MixedPrecisionError(
                f"{what}: node {node.name or node.op_type!r} ({node.op_type}) has "
                f"a subgraph; this pass handles flat graphs only"
            )

    elem = {}  # the exported type of every tensor
    for v in list(g.input) + list(g.value_info) + list(g.output):
        elem[v.name] = v.type.tensor_type.elem_type
    graph_inputs = {v.name for v in g.input}
    # an initializer that is also a graph input is a default the caller may override: not a constant
    inits = {t.name: t for t in g.initializer if t.name not in graph_inputs}
    for t in g.initializer:
        elem[t.name] = t.data_type
    producer = {o: n for n in g.node for o in n.output if o}
    taken = set(elem) | set(producer) | {n.name for n in g.node}

    def fresh(name):
        """`name`, or `name.1`, `name.2`, ... if the graph already has it."""
        out, k = name, 0
        while out in taken:
            k += 1
            out = f"{name}.{k}"
        taken.add(out)
        return out

    def is_float(name):
        if name not in elem:
            raise MixedPrecisionError(
                f"{what}: the type of tensor {name!r} is not known after shape "
                f"inference; cannot decide its precision"
            )
        return elem[name] == FLOAT

    def constant_value(name):
        """The value of an initializer or a Constant node's output; None for anything else."""
        if name in inits:
            return numpy_helper.to_array(inits[name])
        p = producer.get(name)
        if p is None or p.op_type != "Constant" or len(p.attribute) != 1:
            return None
        a = p.attribute[0]
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.float32(a.f)
        if a.name == "value_floats":
            return np.array(a.floats, np.float32)
        return None

    def out_of_range(name):
        v = constant_value(name) if elem.get(name) == FLOAT else None
        return v is not None and np.abs(v[np.isfinite(v)]).max(initial=0.0) > FP16_MAX

    # 1. which nodes compute in float16
    low = {
        id(n) for n in g.node if n.op_type in FLOAT16_OPS and not any(out_of_range(i) for i in n.input if i)
    }
    stack = [i for n in g.node if n.op_type in PHASE_OPS for i in n.input if i]
    stack += [
        n.input[k]
        for n in g.node
        for k in NOT_DATA_INPUTS.get(n.op_type, ())
        if k < len(n.input) and n.input[k]
    ]
    seen = set()
    while stack:  # Sin/Cos arguments and Resize's scales, and what computes them, stay float32
        name = stack.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        p = producer[name]
        low.discard(id(p))
        stack.extend(i for i in p.input if i)

    def produced(name):
        """The type a tensor has after the rewrite."""
        p = producer.get(name)
        if p is not None and id(p) in low and elem.get(name) == FLOAT:
            return FLOAT16
        return elem[name]

    new_inits, new_nodes_before = [], {}  # inserted casts go right before their first consumer
    fp16_of = {}  # tensor -> its float16 twin's name

    def as_fp16(name, consumer):
        if name in fp16_of:
            return fp16_of[name]
        p = producer.get(name)
        if p is not None and p.op_type == "Cast" and elem.get(p.input[0]) == FLOAT16:
            fp16_of[name] = p.input[0]  # float16 -> float32 -> float16 is the identity
            return p.input[0]
        value = constant_value(name)  # in float16's range: its consumers would stay float32
        twin = fresh(f"{name}/fp16")
        if value is not None:
            new_inits.append(numpy_helper.from_array(np.asarray(value).astype(np.float16), twin))
        else:
            new_nodes_before.setdefault(id(consumer), []).append(
                helper.make_node("Cast", [name], [twin], name=fresh(f"{name}/to_fp16"), to=FLOAT16)
            )
        fp16_of[name] = twin
        return twin

    fp32_of = {}

    def as_fp32(name, consumer):
        if name not in fp32_of:
            twin = fresh(f"{name}/fp32")
            new_nodes_before.setdefault(id(consumer), []).append(
                helper.make_node("Cast", [name], [twin], name=fresh(f"{name}/to_fp32"), to=FLOAT)
            )
            fp32_of[name] = twin
        return fp32_of[name]

    # 2. retype the edges
    for node in g.node:
        if node.op_type in TYPE_AGNOSTIC:
            continue
        skip = NOT_DATA_INPUTS.get(node.op_type, set()) if id(node) in low else set()
        want = FLOAT16 if id(node) in low else FLOAT
        for i, name in enumerate(node.input):
            if not name or i in skip or not is_float(name):
                continue
            have = produced(name)
            if have == want:
                continue
            node.input[i] = as_fp16(name, node) if want == FLOAT16 else as_fp32(name, node)

    # 3. graph outputs keep float32: a float16 node's output gets a new name, which its readers in
    #    the graph take too, and a Cast right after the node gives the output's name back
    outputs = {o.name for o in g.output}
    after, renamed = {}, {}
    for node in g.node:
        if id(node) not in low:
            continue
        for j, name in enumerate(node.output):
            if name in outputs and elem.get(name) == FLOAT:
                inner = renamed[name] = fresh(f"{name}/fp16")
                node.output[j] = inner
                after.setdefault(id(node), []).append(
                    helper.make_node("Cast", [inner], [name], name=fresh(f"{name}/to_fp32"), to=FLOAT)
                )
    nodes = []
    for node in g.node:
        nodes.extend(new_nodes_before.get(id(node), []))
        nodes.append(node)
        nodes.extend(after.get(id(node), []))
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]

    # 4. drop what nothing reads any more (the float32 casts of float16 weights, folded constants)
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        keep = [n for n in nodes if any(o in used for o in n.output if o)]
        if len(keep) == len(nodes):
            break
        nodes = keep
    used = {i for n in nodes for i in n.input} | outputs
    g.ClearField("node")
    g.node.extend(nodes)
    kept_inits = [t for t in g.initializer if t.name in used] + [t for t in new_inits if t.name in used]
    g.ClearField("initializer")
    g.initializer.extend(kept_inits)
    g.ClearField("value_info")
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise MixedPrecisionError(f"{what}: the float16 graph does not check ({e})") from e
    return model


def summary(model) -> dict:
    """Counts of nodes computing in float16 and in float32 and of float16 weights (for reports)."""
    import onnx  # lazily: the [tensorrt] extra; ONNX graphs are edited only here
    from onnx import TensorProto

    model = onnx.shape_inference.infer_shapes(model)
    elem = {
        v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)
    }
    fp16 = sum(
        1
        for n in model.graph.node
        if n.op_type != "Cast" and any(elem.get(o) == TensorProto.FLOAT16 for o in n.output)
    )
    return {
        "nodes": len(model.graph.node),
        "float16_nodes": fp16,
        "casts": sum(n.op_type == "Cast" for n in model.graph.node),
        "float16_weights": sum(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer),
    }


def convert_package(src, dst) -> dict:
    """A copy of model package `src` at `dst` whose stage networks compute in float16 (float32 inputs
    and outputs, so it loads and runs like the original); the text encoder and guidance models are
    copied as they are. Written to a temporary folder beside `dst`, checked, then renamed."""
    import json
    import shutil

    import onnx  # lazily: the [tensorrt] extra; ONNX graphs are edited only here

    src, dst = Path(src).resolve(), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} exists; give a new folder")
    pkg = load_package(src)
    report = {}

    def build(tmp: Path):
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        for path in dict.fromkeys(st.onnx for st in pkg.stages):  # each file once
            rel = path.relative_to(src)
            half = convert(onnx.load(str(path)), str(rel))
            onnx.save(half, str(tmp / rel))
            report[str(rel)] = summary(half)
        manifest = json.loads((tmp / "manifest.json").read_text())
        note = f"stage networks in float16 (pydiff export float16, rewrite v{VERSION})"
        manifest["description"] = f"{manifest.get('description', '')}; {note}".lstrip("; ")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        load_package(tmp)  # the copy is a valid package before it gets its name

    write_folder_atomic(dst, build)
    return report


def convert_file(src, dst) -> dict:
    """Rewrite the ONNX file `src` to float16 into `dst` (written atomically); returns its `summary`."""
    import onnx  # lazily: the [tensorrt] extra; ONNX graphs are edited only here

    out = convert(onnx.load(str(src)), str(src))
    atomic_write_bytes(dst, out.SerializeToString())
    return summary(out)
