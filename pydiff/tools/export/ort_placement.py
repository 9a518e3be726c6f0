"""Predict, on a machine without a GPU, which nodes ONNX Runtime's CUDA provider leaves on the CPU
and how many Memcpy nodes it adds, for an ONNX file.

It replays, on the graph after ONNX Runtime's basic optimisations (the ones that run before nodes
are given to providers), the two rules that decide it:
1. nodes the CUDA provider has no kernel for run on the CPU provider (`UNSUPPORTED_ON_CUDA`:
   ONNX Runtime's CUDA provider registers no DynamicQuantizeLinear and MatMulInteger only for
   int8 A, while dynamic quantisation feeds it uint8);
2. ONNX Runtime's CPU-fallback pass (`GetCpuPreferredNodes`, core/framework/fallback_cpu_capability
   .cc): starting from CPU-side outputs (Shape's) it moves forward every node whose inputs are all
   CPU values, small initializers (<= 100 elements) or graph inputs, and backward from CPU-side
   inputs (a Reshape's target, a Slice's bounds: `CPU_SIDE_INPUTS`) every producer whose outputs
   are all CPU values;
then counts the tensors that cross between host and device (one Memcpy per tensor and direction;
graph inputs and initializers are copied by the session, not by Memcpy nodes).

Checked against the one GPU observation we have: for the bundled int8 text encoder it predicts
85 Memcpy nodes, the number ONNX Runtime 1.31.1 printed on an H200 (benchmarks/results/gpu/
ort-bench.txt). It is a model of ONNX Runtime's rules, not ONNX Runtime: a prediction. Not
modelled: other ops or types without CUDA kernels, subgraphs (If, Loop, Scan), whether a CPU kernel
exists for a node the fallback would move, graph inputs that feed both providers.

    pydiff export ort-placement pydiff/bundled/shapes/*.onnx
"""

from __future__ import annotations

import heapq
import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pydiff.tools.export.static_shapes import CPU_SIDE_INPUTS

#: outputs that ONNX Runtime's CUDA kernels write to host memory (OutputMemoryType CPU)
CPU_SIDE_OUTPUTS = {"Shape": [0], "Size": [0]}
#: op types with no CUDA kernel (MatMulInteger has one for int8 A only; dynamic quantisation
#: feeds it uint8)
UNSUPPORTED_ON_CUDA = ("DynamicQuantizeLinear",)
HALF_TYPES = (10, 16)  # TensorProto.FLOAT16, BFLOAT16: the fallback never moves nodes touching them
SMALL_INITIALIZER = 100


@dataclass
class Placement:
    """Where the CUDA provider would run a graph's nodes (after basic optimisations)."""

    nodes: int
    cpu_nodes: Counter = field(default_factory=Counter)  # op type -> count on the CPU provider
    memcpy: int = 0  # Memcpy nodes ONNX Runtime would add

    @property
    def n_cpu(self) -> int:
        return sum(self.cpu_nodes.values())


def basic_optimised(path: str | os.PathLike):
    """The model as ONNX Runtime sees it when it assigns providers (ORT_ENABLE_BASIC)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = str(Path(d) / "basic.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def predict_cuda_placement(model, unsupported=UNSUPPORTED_ON_CUDA) -> Placement:
    """Replay the CUDA provider's placement on `model` (an onnx.ModelProto, already optimised
    as by basic_optimised). See the module docstring for the rules."""
    import onnx

    g = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    elem = {
        v.name: v.type.tensor_type.elem_type
        for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
    }
    elem.update({i.name: i.data_type for i in g.initializer})

    def no_kernel(n) -> bool:
        return n.op_type in unsupported or (
            n.op_type == "MatMulInteger" and elem.get(n.input[0]) != onnx.TensorProto.INT8
        )

    nodes = list(g.node)
    order = {id(n): i for i, n in enumerate(nodes)}
    producer = {o: n for n in nodes for o in n.output if o}
    consumers = defaultdict(list)
    for n in nodes:
        for i in n.input:
            if i:
                consumers[i].append(n)
    inits = {i.name: i for i in g.initializer}
    graph_inputs = {i.name for i in g.input} - set(inits)  # as GraphViewer::GetInputs()

    def small_initializer(name: str) -> bool:
        if name not in inits:
            return False
        size = 1
        for d in inits[name].dims:
            size *= d
        return size <= SMALL_INITIALIZER

    on_cuda = {id(n) for n in nodes if not no_kernel(n)}
    cpu_values: set[str] = set()
    forward, backward = [], []
    for n in nodes:
        if id(n) not in on_cuda:
            continue
        for k, o in enumerate(n.output):
            if k in CPU_SIDE_OUTPUTS.get(n.op_type, []):
                cpu_values.add(o)
                forward += consumers[o]
        for k, i in enumerate(n.input):
            if i and k in CPU_SIDE_INPUTS.get(n.op_type, []):
                cpu_values.add(i)
                if i in producer:
                    backward.append(producer[i])

    fallback: set[int] = set()
    # forward, in topological order: nodes computing only from CPU values move to the CPU
    heap = [(order[id(n)], id(n), n) for n in forward]
    heapq.heapify(heap)
    seen: set[int] = set()
    while heap:
        _, key, n = heapq.heappop(heap)
        if key in seen or key not in on_cuda:
            continue
        seen.add(key)
        # an omitted optional input is a NodeArg that exists nowhere: it keeps the node on CUDA
        if all(
            i
            and elem.get(i) not in HALF_TYPES
            and (
                small_initializer(i)
                or i in graph_inputs
                or (i in cpu_values and k not in CPU_SIDE_INPUTS.get(n.op_type, []))
            )
            for k, i in enumerate(n.input)
        ):
            fallback.add(key)
            cpu_values.update(n.output)
            for o in n.output:
                for c in consumers[o]:
                    heapq.heappush(heap, (order[id(c)], id(c), c))
    # backward, in reverse order: producers whose outputs are all CPU values move too
    heap = [(-order[id(n)], id(n), n) for n in backward]
    heapq.heapify(heap)
    seen.clear()
    while heap:
        _, key, n = heapq.heappop(heap)
        if key in seen or key in fallback or key not in on_cuda:
            continue
        seen.add(key)
        if all(
            o
            and o in cpu_values
            and elem.get(o) not in HALF_TYPES
            and k not in CPU_SIDE_OUTPUTS.get(n.op_type, [])
            for k, o in enumerate(n.output)
        ) and all(elem.get(i) not in HALF_TYPES for i in n.input if i):
            fallback.add(key)
            cpu_values.update(i for i in n.input if i)
            for i in n.input:
                if i in producer:
                    p = producer[i]
                    heapq.heappush(heap, (-order[id(p)], id(p), p))

    on_cpu = {id(n) for n in nodes if id(n) not in on_cuda} | fallback
    crossings = set()
    for n in nodes:
        for k, i in enumerate(n.input):
            p = producer.get(i)
            if p is None:  # graph inputs and initializers: copied by the session
                continue
            host = id(p) in on_cpu or list(p.output).index(i) in CPU_SIDE_OUTPUTS.get(p.op_type, [])
            wants_host = id(n) in on_cpu or k in CPU_SIDE_INPUTS.get(n.op_type, [])
            if host != wants_host:
                crossings.add((i, wants_host))
    return Placement(
        nodes=len(nodes),
        cpu_nodes=Counter(n.op_type for n in nodes if id(n) in on_cpu),
        memcpy=len(crossings),
    )


def predict_file(path: str | os.PathLike) -> Placement:
    return predict_cuda_placement(basic_optimised(path))
