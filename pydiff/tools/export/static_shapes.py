"""Fold an exported graph's shape arithmetic into constants, leaving only the batch dynamic.

The TorchScript exporter records every `x.shape[i]` the forward reads: a U-Net's GroupNorm and
attention reshapes become ~80 `Shape -> Gather -> Unsqueeze -> Concat` chains feeding `Reshape`,
`Slice` and `Unsqueeze`. ONNX Runtime's CUDA provider runs such integer chains on its CPU provider
(`GetCpuPreferredNodes`; 315 nodes of the traced shapes base stage, pydiff.tools.export.ort_placement):
host work between the device kernels of every call. TensorRT re-derives them for every shape. In a
stage network every dimension but the batch is fixed, so each of these values is a constant, or a
`Reshape`/`Expand` target whose entries that scale with the batch can say so without a shape op
(Reshape: 0 = copy the input's dimension, or -1; Expand: 1 = keep the input's dimension).

`freeze_shapes` finds the values computed from `Shape`/`Size` outputs alone ("shape values"),
evaluates those that leave the shape arithmetic at several batch sizes with ONNX Runtime, and
replaces them by initializers; the chains then have no consumer and are removed. A batch-sized
constant (`torch.ones(x.shape[0])`) that only broadcasts becomes a broadcast 1. Any other shape
value that changes with the batch raises ShapeFreezeError, and nothing is written.
`freeze_shapes_file` rewrites a file atomically after checking, with every graph optimisation off,
that the new graph's outputs are bit-identical to the old one's at batch sizes it did not probe.

    pydiff export static-shapes pydiff/bundled/shapes/base.onnx ...
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pydiff.errors import ShapeFreezeError

#: batch sizes at which the shape values are evaluated; a value equal at all of them is constant
PROBE_BATCHES = (1, 2, 3, 5)
#: batch sizes of the equality check, none of them probed
CHECK_BATCHES = (4, 7)
SHAPE_OPS = ("Shape", "Size")
BROADCAST_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where")
#: ops whose output shape depends on their input values: a Shape downstream is no constant
DATA_SHAPED_OPS = ("NonZero", "Unique", "Compress", "StringSplit")
#: ops that keep the elements of their first input in order (a reshape, a cast, a unary map)
ORDER_KEEPING_OPS = (
    "Identity",
    "Cast",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Neg",
    "Abs",
    "Floor",
    "Ceil",
    "Sqrt",
    "Relu",
    "Sign",
    "Round",
)
ELEMENTWISE_OPS = BROADCAST_OPS + (
    "Mod",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "And",
    "Or",
    "Xor",
)

# inputs that ONNX Runtime's CUDA kernels read from host memory (InputMemoryType CPU): a value a
# node computes for one of them pulls that node to the CPU provider. Also, but Clip's bounds and
# Dropout's ratio, the inputs that set an op's output shape.
CPU_SIDE_INPUTS = {
    "Reshape": [1],
    "Expand": [1],
    "Slice": [1, 2, 3, 4],
    "Unsqueeze": [1],
    "Squeeze": [1],
    "Resize": [1, 2, 3],
    "Upsample": [1],
    "Tile": [1],
    "ConstantOfShape": [0],
    "Range": [0, 1, 2],
    "Split": [1],
    "Pad": [1, 2, 3],
    "TopK": [1],
    "OneHot": [1],
    "CumSum": [1],
    "Trilu": [1],
    "Clip": [1, 2],
    "Dropout": [1, 2],
    "ReduceSum": [1],
    "ReduceMean": [1],
    "ReduceMax": [1],
    "ReduceMin": [1],
    "ReduceProd": [1],
    "ReduceL1": [1],
    "ReduceL2": [1],
    "ReduceLogSum": [1],
    "ReduceLogSumExp": [1],
    "ReduceSumSquare": [1],
}
NOT_SHAPE_SETTING = {("Clip", 1), ("Clip", 2), ("Dropout", 1), ("Dropout", 2), ("CumSum", 1), ("Trilu", 1)}


def _batch_symbol(model) -> str | None:
    """The one symbolic dimension the graph's inputs share (None when all are static)."""
    symbols, unnamed = set(), []
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                if i != 0:
                    raise ShapeFreezeError(
                        f"input {inp.name!r}: dimension {i} is dynamic; only a leading batch dimension may be"
                    )
                if d.dim_param:
                    symbols.add(d.dim_param)
                else:
                    unnamed.append(inp.name)
    if unnamed and (symbols or len(unnamed) > 1):
        raise ShapeFreezeError(
            f"inputs {unnamed} have unnamed dynamic dimensions: cannot tell whether they are one batch"
        )
    symbols.update("?" for _ in unnamed)
    if len(symbols) > 1:
        raise ShapeFreezeError(f"inputs have several dynamic batch names {sorted(symbols)}")
    return symbols.pop() if symbols else None


def _feeds(model, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs at `batch` for every graph input (values matter only for the equality
    check; integer inputs get zeros so class labels and indices stay in range)."""
    from onnx import helper

    init = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype)
    return feeds


def _session(model_bytes: bytes):
    """ONNX Runtime on the CPU with every graph optimisation off: the graph's nodes as written."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _shape_values(graph) -> set[str]:
    """Names of the shape values.

    A shape value is an output of Shape/Size, or of a node whose inputs are all shape values or
    constants (initializers, Constant outputs) with at least one shape value among them."""
    const = {i.name for i in graph.initializer}
    const |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    values: set[str] = set()
    for n in graph.node:
        if n.op_type == "Constant" or any(a.type == a.GRAPH for a in n.attribute):
            continue
        ins = [i for i in n.input if i]
        if n.op_type in SHAPE_OPS or (
            any(i in values for i in ins) and all(i in values or i in const for i in ins)
        ):
            values.update(o for o in n.output if o)
    return values


def freeze_shapes(model, probe_batches=PROBE_BATCHES):
    """Return a copy of `model` (onnx.ModelProto) with its shape arithmetic folded into
    initializers. Raises ShapeFreezeError where that would change the graph's meaning."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    if _batch_symbol(model) is None:
        return model
    _refuse_unsupported(g)
    values = _shape_values(g)
    consumers: dict[str, list] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            consumers.setdefault(i, []).append((n, k))
    graph_outputs = {o.name for o in g.output}
    # the shape values that leave the shape arithmetic: these are what the network really uses
    frontier = sorted(
        v
        for v in values
        if v in graph_outputs or any(c.output[0] not in values for c, _ in consumers.get(v, []))
    )
    if not frontier:
        return model
    # a Reshape or Expand target that scales with the batch is rewritten from the shapes its data
    # input and output really have: evaluate those as well
    producer = {o: n for n in g.node for o in n.output}
    reshape_io = sorted(
        {
            t
            for v in frontier
            for c, k in consumers.get(v, [])
            if c.op_type in ("Reshape", "Expand") and k == 1
            for t in (c.input[0], c.output[0])
        }
    )
    # a batch-sized constant (`t * torch.ones(x.shape[0])`, diffusers' UNet2DModel) can shrink to
    # ones in every dimension if the other operands alone give the result its shape
    broadcast_io = sorted(
        {
            t
            for v in frontier
            if producer[v].op_type == "ConstantOfShape"
            for c, _ in consumers.get(v, [])
            if c.op_type in BROADCAST_OPS
            for t in list(c.input) + list(c.output)
            if t and t != v
        }
    )
    runs = _probe(model, list(dict.fromkeys(sorted(values) + reshape_io + broadcast_io)), probe_batches)
    depends = _batch_dependence(g, values, runs)

    new_inits = []
    for name in frontier:
        seen = [r[name] for r in runs]
        if all(s.shape == seen[0].shape and np.array_equal(s, seen[0]) for s in seen[1:]):
            # equal at every probe; but a step function of the batch (B // 8) would be too
            if depends[name].any():
                raise ShapeFreezeError(
                    f"shape value {name!r} is computed from the batch size but "
                    f"equal at the probed sizes {tuple(probe_batches)}"
                )
            new_inits.append(numpy_helper.from_array(seen[0], name=name))
            continue
        if producer[name].op_type == "ConstantOfShape":
            value = _broadcast_constant(name, consumers.get(name, []), runs, name in graph_outputs)
        else:
            value = _batch_target(name, consumers.get(name, []), runs, name in graph_outputs)
        new_inits.append(numpy_helper.from_array(value, name=name))

    frozen = {t.name for t in new_inits}
    g.initializer.extend(new_inits)
    _remove_dead_nodes(g, frozen)
    onnx.checker.check_model(model)
    return model


def _refuse_unsupported(g) -> None:
    """Raise ShapeFreezeError for graphs whose shapes can depend on data: subgraphs (If, Loop,
    Scan: their shapes are not probed), ops with data-dependent output shapes, and ops whose
    shape-setting input (a Reshape target, a Range bound, ...) is computed from data: a Shape
    downstream of any of these may differ between the probes' inputs and real ones."""
    const = {i.name for i in g.initializer}
    const |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    values = _shape_values(g)
    data_shaped: set[str] = set()
    for n in g.node:
        if any(a.type in (a.GRAPH, a.GRAPHS) for a in n.attribute):
            raise ShapeFreezeError(f"node {n.name or n.op_type!r} ({n.op_type}) has a subgraph")
        if n.op_type in SHAPE_OPS and n.input[0] in data_shaped:
            raise ShapeFreezeError(f"{n.op_type} node {n.name!r} reads a tensor whose shape depends on data")
        shaped_by_data = n.op_type in DATA_SHAPED_OPS or any(
            i and i not in const and i not in values and (n.op_type, k) not in NOT_SHAPE_SETTING
            for k, i in enumerate(n.input)
            if k in CPU_SIDE_INPUTS.get(n.op_type, [])
        )
        if n.op_type not in SHAPE_OPS and (shaped_by_data or any(i in data_shaped for i in n.input)):
            data_shaped.update(o for o in n.output if o)


def _batch_dependence(g, values: set[str], runs: list[dict]) -> dict[str, np.ndarray]:
    """For each shape value, which of its elements (flattened) are computed from the batch size.

    A Shape output's entries depend on the batch where they differ between the probes (a tensor
    dimension is the batch times a constant, or a constant); Gather, Slice and Concat on vectors
    and order-keeping or elementwise ops carry that per element; any other op makes its output
    depend wholly on the batch as soon as one input does."""
    from onnx import numpy_helper

    dep: dict[str, np.ndarray] = {}
    known = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            known[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    known.update(runs[0])

    def of(name: str, like: np.ndarray) -> np.ndarray:
        return dep[name] if name in dep else np.zeros(like.size, bool)

    for n in g.node:
        outs = [o for o in n.output if o in values]
        if not outs:
            continue
        first = [runs[0][o] for o in outs]
        if any(any(r[o].shape != runs[0][o].shape for r in runs) for o in outs):
            for o, v in zip(outs, first):  # its shape changes with the batch
                dep[o] = np.ones(v.size, bool)
            continue
        ins = [(i, known.get(i)) for i in n.input]
        v = first[0]
        if n.op_type in SHAPE_OPS:
            stack = np.stack([r[outs[0]].reshape(-1) for r in runs])
            d = (stack != stack[0]).any(axis=0)
        elif (
            n.op_type == "Gather"
            and ins[0][1] is not None
            and ins[0][1].ndim == 1
            and ins[1][1] is not None
            and not of(ins[1][0], ins[1][1]).any()
        ):
            d = of(*ins[0])[ins[1][1].reshape(-1).astype(np.int64)]
        elif (
            n.op_type == "Slice"
            and ins[0][1] is not None
            and ins[0][1].ndim == 1
            and all(a is not None and not of(i, a).any() for i, a in ins[1:])
        ):
            start, end = int(ins[1][1].reshape(-1)[0]), int(ins[2][1].reshape(-1)[0])
            step = int(ins[4][1].reshape(-1)[0]) if len(ins) > 4 else 1
            d = of(*ins[0])[np.arange(ins[0][1].size)[slice(start, end, step)]]
        elif n.op_type == "Concat" and v.ndim == 1 and all(a is not None for _, a in ins):
            d = np.concatenate([of(i, a) for i, a in ins])
        elif (
            n.op_type in ORDER_KEEPING_OPS
            and ins[0][1] is not None
            and ins[0][1].size == v.size
            and all(a is not None and not of(i, a).any() for i, a in ins[1:])
        ):
            d = of(*ins[0])
        elif n.op_type in ELEMENTWISE_OPS and all(a is not None for _, a in ins):
            d = np.zeros(v.shape, bool)
            for i, a in ins:
                d = d | np.broadcast_to(of(i, a).reshape(a.shape), v.shape)
            d = d.reshape(-1)
        else:
            d = np.full(v.size, any(i in dep and dep[i].any() for i in n.input))
        for o, w in zip(outs, first):
            dep[o] = d if w.size == d.size else np.full(w.size, d.any())
    return dep


def _probe(model, names: list[str], batches) -> list[dict[str, np.ndarray]]:
    """The values of `names` (any tensors of the graph) at each batch size, ORT CPU, unoptimised."""
    import onnx
    from onnx import numpy_helper

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in probe.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(probe).graph
    types = {
        vi.name: vi.type for vi in list(inferred.value_info) + list(inferred.output) + list(inferred.input)
    }
    outputs = {o.name for o in probe.graph.output}
    computed = [n for n in names if n not in inits]
    for name in computed:
        if name in outputs:
            continue
        if name not in types:
            raise ShapeFreezeError(f"cannot infer the type of {name!r}")
        vi = onnx.ValueInfoProto(name=name)
        vi.type.tensor_type.elem_type = types[name].tensor_type.elem_type
        probe.graph.output.append(vi)
    sess = _session(probe.SerializeToString())
    fixed = {n: numpy_helper.to_array(inits[n]) for n in names if n in inits}
    return [dict(zip(computed, sess.run(computed, _feeds(model, b, seed=b))), **fixed) for b in batches]


def _broadcast_constant(name: str, uses: list, runs: list[dict], is_output: bool) -> np.ndarray:
    """A batch-sized ConstantOfShape output `name` as the same value with every dimension 1, when
    each consumer is an elementwise broadcast whose output shape the other operands give alone."""
    seen = [r[name] for r in runs]
    flat = seen[0].reshape(-1)
    if (
        is_output
        or not uses
        or flat.size == 0
        or any(c.op_type not in BROADCAST_OPS for c, _ in uses)
        or not (flat == flat[0]).all()
    ):
        raise ShapeFreezeError(
            f"shape value {name!r} changes with the batch and feeds {sorted({c.op_type for c, _ in uses})}"
        )
    for c, _ in uses:
        for r in runs:
            others = [r[i].shape for i in c.input if i and i != name]
            if np.broadcast_shapes(*others, (1,) * seen[0].ndim) != r[c.output[0]].shape:
                raise ShapeFreezeError(f"shape value {name!r} gives {c.op_type}'s output its shape")
    return np.full((1,) * seen[0].ndim, flat[0], dtype=seen[0].dtype)


def _batch_target(name: str, uses: list, runs: list[dict], is_output: bool) -> np.ndarray:
    """A constant target for the batch-dependent Reshape/Expand target `name`, from the shapes
    its consumers' data inputs and outputs had at every probed batch size."""
    ops = sorted({(c.op_type, k) for c, k in uses})
    if is_output or len(ops) != 1 or ops[0] not in (("Reshape", 1), ("Expand", 1)):
        raise ShapeFreezeError(
            f"shape value {name!r} changes with the batch and feeds "
            f"{sorted({c.op_type for c, _ in uses})}; only a Reshape or "
            "Expand target may"
        )
    op = ops[0][0]
    targets = set()
    for c, _ in uses:
        ins = [r[c.input[0]].shape for r in runs]
        outs = [r[c.output[0]].shape for r in runs]
        if len({len(o) for o in outs}) != 1:
            raise ShapeFreezeError(f"{op} target {name!r} changes length with the batch")
        n = len(outs[0])
        stack = np.array(outs, dtype=np.int64)
        varying = np.flatnonzero((stack != stack[0]).any(axis=0))

        # does the data input already have the output's dimension i at every batch size?
        # (aligned from the left for Reshape, from the right for Expand's broadcast)
        def copies(i: int) -> bool:
            j = i if op == "Reshape" else i - (n - len(ins[0]))
            return all(0 <= j < len(x) and x[j] == o[i] for x, o in zip(ins, outs))

        target = stack[0].copy()
        if op == "Expand":
            if not all(copies(int(i)) for i in varying):
                raise ShapeFreezeError(f"Expand target {name!r} grows a dimension with the batch")
            target[varying] = 1  # 1 = "keep the input's dimension" in a broadcast
        else:
            allowzero = any(a.name == "allowzero" and a.i for a in c.attribute)
            if (np.delete(target, varying) == 0).any():
                raise ShapeFreezeError(f"Reshape target {name!r} makes an empty dimension")
            if not allowzero and all(copies(int(i)) for i in varying):
                target[varying] = 0  # 0 = "copy the input's dimension i"
            elif len(varying) == 1:
                target[varying] = -1  # -1 = "whatever is left": the other entries are concrete
            else:
                raise ShapeFreezeError(
                    f"Reshape target {name!r}: entries {varying.tolist()} change "
                    "with the batch and cannot be inferred"
                )
        targets.add(tuple(target.tolist()))
    if len(targets) != 1:
        raise ShapeFreezeError(f"{op} target {name!r} is shared by uses that need different constants")
    return np.array(targets.pop(), dtype=runs[0][name].dtype)


def _remove_dead_nodes(g, frozen: set[str]) -> None:
    """Drop nodes producing frozen names, then every node and initializer nothing uses."""
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        outs = [o for o in n.output if o]
        if any(o in needed and o not in frozen for o in outs):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    dropped = {i.name for i in g.initializer} - {i.name for i in inits}
    del g.initializer[:]
    g.initializer.extend(inits)
    # an IR < 4 file lists its initializers as graph inputs too
    inputs = [i for i in g.input if i.name not in dropped]
    del g.input[:]
    g.input.extend(inputs)
    produced = {o for n in g.node for o in n.output}
    vis = [v for v in g.value_info if v.name in produced]
    del g.value_info[:]
    g.value_info.extend(vis)


def count_shape_ops(model) -> int:
    """Number of Shape/Size nodes left in `model`'s main graph."""
    return sum(n.op_type in SHAPE_OPS for n in model.graph.node)


def computed_cpu_side_inputs(model) -> list[tuple[str, int, str]]:
    """(op, input index, producer op) for each CPU-side input (CPU_SIDE_INPUTS) that a node other
    than Constant computes: the nodes ONNX Runtime's CUDA provider would leave on the CPU."""
    prod = {o: n for n in model.graph.node for o in n.output}
    return [
        (n.op_type, k, prod[n.input[k]].op_type)
        for n in model.graph.node
        for k in CPU_SIDE_INPUTS.get(n.op_type, [])
        if k < len(n.input) and n.input[k] in prod and prod[n.input[k]].op_type != "Constant"
    ]


def check_equal(old, new, batches=CHECK_BATCHES) -> None:
    """Raise RuntimeError unless `new` gives bit-identical outputs to `old` (ORT CPU, graph
    optimisations off, so both run exactly the arithmetic nodes they share) at `batches`."""
    a, b = _session(old.SerializeToString()), _session(new.SerializeToString())
    names = [o.name for o in a.get_outputs()]
    for batch in batches:
        feeds = _feeds(old, batch, seed=100 + batch)
        for name, x, y in zip(names, a.run(names, feeds), b.run(names, feeds)):
            if x.shape != y.shape or not np.array_equal(x, y, equal_nan=True):
                raise RuntimeError(f"frozen graph differs at batch {batch}, output {name!r}")


def freeze_shapes_file(
    path: str | os.PathLike, out: str | os.PathLike | None = None, *, strict: bool = True
) -> dict:
    """Freeze the ONNX file at `path` into `out` (default: in place) after check_equal; atomic.
    Returns {"frozen", "shape_ops_before", "shape_ops_after", "nodes_before", "nodes_after"}.
    With strict=False a graph that cannot be frozen is left as it is, with a warning naming why
    ("frozen": False, "reason": ...), as an exporter wants: the traced graph is still correct."""
    import onnx

    path = Path(path)
    out = Path(out) if out is not None else path.resolve()  # in place: through a symlink
    old = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in old.graph.initializer):
        raise ShapeFreezeError(f"{path.name}: weights in external data files are not supported")
    rep = {"shape_ops_before": count_shape_ops(old), "nodes_before": len(old.graph.node)}
    try:
        new = freeze_shapes(old)
    except ShapeFreezeError as e:
        if strict:
            raise
        import warnings

        warnings.warn(f"{path.name}: shape arithmetic kept dynamic: {e}", stacklevel=2)
        new, rep["reason"] = old, str(e)
    changed = new.SerializeToString() != old.SerializeToString()
    if changed:
        check_equal(old, new)
    rep.update(frozen=changed, shape_ops_after=count_shape_ops(new), nodes_after=len(new.graph.node))
    if not changed and out.resolve() == path.resolve():
        return rep
    import shutil
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        onnx.save(new, tmp)
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return rep
