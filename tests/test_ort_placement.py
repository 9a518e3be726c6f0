"""The CUDA-provider placement model (pydiff.tools.export.ort_placement): it reproduces the Memcpy
count ONNX Runtime printed on an H200, and predicts none for the bundled (frozen) stage graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pydiff.tools.export.ort_placement import basic_optimised, predict_cuda_placement, predict_file  # noqa: E402

BUNDLED = Path(__file__).resolve().parent.parent / "pydiff" / "bundled"


def test_it_reproduces_the_memcpy_count_seen_on_the_h200():
    # benchmarks/results/gpu/ort-bench.txt: ONNX Runtime 1.31.1 on an H200 printed "85 Memcpy
    # nodes are added" once per pydiff.load(providers="cuda"); this file has not changed since
    r = predict_file(BUNDLED / "shapes" / "text_encoder" / "model.onnx")
    assert r.memcpy == 85
    assert r.cpu_nodes["DynamicQuantizeLinear"] == 24 and r.cpu_nodes["MatMulInteger"] == 36


@pytest.mark.parametrize("path", sorted(BUNDLED.glob("*/*.onnx")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_bundled_stage_graphs_run_wholly_on_cuda(path):
    r = predict_file(path)
    assert r.n_cpu == 0 and r.memcpy == 0, r


def test_a_traced_graph_keeps_its_shape_arithmetic_on_the_cpu(tmp_path):
    torch = pytest.importorskip("torch")
    from pydiff.tools.export.static_shapes import freeze_shapes_file

    class M(torch.nn.Module):
        def forward(self, x):
            b, c, h, w = x.shape
            return torch.softmax(x.reshape(b, c, h * w), -1).reshape(b, c, h, w) * 2.0

    path = tmp_path / "m.onnx"
    with torch.no_grad():
        torch.onnx.export(
            M(),
            (torch.randn(2, 3, 4, 4),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
        )
    traced = predict_file(path)
    # the Shape -> Gather -> Unsqueeze -> Concat chains go to the CPU, without copies (Shape's
    # output is on the host already)
    assert traced.n_cpu >= 4 and traced.cpu_nodes["Gather"] >= 1 and traced.memcpy == 0
    freeze_shapes_file(path)
    frozen = predict_file(path)
    assert frozen.n_cpu == 0 and frozen.memcpy == 0 and frozen.nodes < traced.nodes


def test_memcpy_counts_each_crossing_once(tmp_path):
    # relu (GPU) -> DynamicQuantizeLinear (CPU) -> MatMulInteger uint8 (CPU) -> Cast (GPU) -> Mul
    # by the dynamic scale (GPU): r goes to the host, the product and the scale come back
    w = numpy_helper.from_array(np.arange(12, dtype=np.uint8).reshape(4, 3), "w")
    wz = numpy_helper.from_array(np.array(3, np.uint8), "wz")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("DynamicQuantizeLinear", ["r"], ["q", "s", "z"]),
        helper.make_node("MatMulInteger", ["q", "w", "z", "wz"], ["i"]),
        helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "s"], ["m"]),
        helper.make_node("Relu", ["r"], ["r2h"]),
        helper.make_node("ReduceSum", ["r2h"], ["r2"], keepdims=1),
        helper.make_node("Add", ["m", "r2"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
        [w, wz],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    path = tmp_path / "q.onnx"
    onnx.save(m, str(path))
    r = predict_cuda_placement(basic_optimised(path))
    assert dict(r.cpu_nodes) == {"DynamicQuantizeLinear": 1, "MatMulInteger": 1}
    assert r.memcpy == 3  # r to the host once (two consumers on the GPU need none), i and s back


def test_half_precision_values_stay_on_the_gpu(tmp_path):
    # ORT's fallback never moves a node with a float16 input (forward) or output (backward):
    # Shape -> Cast(fp16) moves, Mul(fp16) and Cast(int64) stay, so two copies cross
    c = numpy_helper.from_array(np.array([1.0], np.float16), "c")
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Cast", ["s"], ["h"], to=TensorProto.FLOAT16),
        helper.make_node("Mul", ["h", "c"], ["m"]),
        helper.make_node("Cast", ["m"], ["t"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "t"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [c],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "h.onnx"
    onnx.save(m, str(path))
    r = predict_cuda_placement(basic_optimised(path))
    assert dict(r.cpu_nodes) == {"Cast": 1} and r.memcpy == 2
