"""Folding an exported graph's shape arithmetic (pydiff.tools.export.static_shapes): same outputs bit
for bit, no Shape ops left, every CPU-side input of a GPU kernel a constant, clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from pydiff.tools.export.static_shapes import (  # noqa: E402
    ShapeFreezeError,
    check_equal,
    computed_cpu_side_inputs,
    count_shape_ops,
    freeze_shapes,
    freeze_shapes_file,
)

BUNDLED = Path(__file__).resolve().parent.parent / "pydiff" / "bundled"
STAGE_FILES = sorted(p for p in BUNDLED.glob("*/*.onnx"))  # the text encoders live one level down


def _export(module, inputs, path, dynamic=(0,), **kw):
    torch = pytest.importorskip("torch")
    names = [f"x{i}" for i in range(len(inputs))]
    axes = {n: {d: f"d{d}" for d in dynamic} for n in names + ["y"]}
    with torch.no_grad():
        torch.onnx.export(
            module.eval(),
            tuple(inputs),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=["y"],
            dynamic_axes=axes,
            **kw,
        )
    return onnx.load(str(path))


def test_the_bundled_stages_are_frozen():
    assert len(STAGE_FILES) >= 6
    for f in STAGE_FILES:
        m = onnx.load(str(f))
        assert count_shape_ops(m) == 0, f
        assert computed_cpu_side_inputs(m) == [], f
        dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input]
        assert all(d[0] == "batch" and all(isinstance(v, int) for v in d[1:]) for d in dims), f


def test_a_traced_unet_block_freezes_bit_identically(tmp_path):
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        # the exporter's usual suspects: GroupNorm, attention reshapes, chunk, flatten, expand
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.GroupNorm(2, 4)
            self.qkv = torch.nn.Linear(4, 12)

        def forward(self, x, t):
            b, c, h, w = x.shape
            s = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
            q, k, v = self.qkv(s).chunk(3, dim=-1)
            q = q.reshape(b, h * w, 2, c // 2).transpose(1, 2)
            k = k.reshape(b, h * w, 2, c // 2).transpose(1, 2)
            a = torch.softmax(q @ k.transpose(-1, -2) / (c // 2) ** 0.5, -1)
            o = (a @ v.reshape(b, h * w, 2, c // 2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
            tt = t.expand(x.shape[0])[:, None, None, None]
            return (o + x * tt).flatten(1).reshape(x.shape[0] * 4, -1)

    g = torch.Generator().manual_seed(0)
    old = _export(Block(), (torch.randn(2, 4, 3, 5, generator=g), torch.rand(2)), tmp_path / "b.onnx")
    assert count_shape_ops(old) > 5 and computed_cpu_side_inputs(old)
    new = freeze_shapes(old)
    assert count_shape_ops(new) == 0 and computed_cpu_side_inputs(new) == []
    assert len(new.graph.node) < len(old.graph.node)
    check_equal(old, new, batches=(1, 4, 9))  # raises unless bit-identical (4 and 9 never probed)
    import onnxruntime as ort

    sess = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((6, 4, 3, 5)).astype(np.float32)
    t = np.full(6, 0.5, np.float32)
    (y,) = sess.run(None, {"x0": x, "x1": t})
    (y_old,) = ort.InferenceSession(old.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x0": x, "x1": t}
    )
    # with ORT's default optimisations the static graph may fuse differently: rounding only
    assert y.shape == (24, 15)
    np.testing.assert_allclose(y, y_old, rtol=1e-5, atol=1e-6)


def test_a_reshape_that_multiplies_the_batch_uses_minus_one(tmp_path):
    torch = pytest.importorskip("torch")

    class M(torch.nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0] * x.shape[1], x.shape[2]) * 2.0

    old = _export(M(), (torch.randn(2, 3, 4),), tmp_path / "m.onnx")
    new = freeze_shapes(old)
    targets = [
        onnx.numpy_helper.to_array(i) for i in new.graph.initializer if i.data_type == onnx.TensorProto.INT64
    ]
    assert any(t.tolist() == [-1, 4] for t in targets)
    check_equal(old, new, batches=(1, 7))


def test_a_batch_sized_ones_tensor_becomes_a_broadcast_one(tmp_path):
    torch = pytest.importorskip("torch")

    class M(torch.nn.Module):  # diffusers' UNet2DModel: timesteps * torch.ones(sample.shape[0])
        def forward(self, x, t):
            return x * (t * torch.ones(x.shape[0], dtype=t.dtype))[:, None]

    old = _export(M(), (torch.randn(2, 3), torch.rand(2)), tmp_path / "m.onnx")
    assert "ConstantOfShape" in {n.op_type for n in old.graph.node}
    new = freeze_shapes(old)
    assert count_shape_ops(new) == 0
    assert "ConstantOfShape" not in {n.op_type for n in new.graph.node}
    check_equal(old, new, batches=(1, 6))

    class Grows(torch.nn.Module):  # here the ones give the output its batch: must stay
        def forward(self, x):
            return torch.ones(x.shape[0], dtype=x.dtype) * x.sum()

    old = _export(Grows(), (torch.randn(2, 3),), tmp_path / "g.onnx")
    with pytest.raises(ShapeFreezeError, match="gives Mul's output its shape"):
        freeze_shapes(old)


def test_a_batch_dependent_value_elsewhere_is_refused(tmp_path):
    torch = pytest.importorskip("torch")

    class Positions(torch.nn.Module):  # the batch size becomes data: cannot be a constant
        def forward(self, x):
            return x + torch.arange(x.shape[0], dtype=x.dtype)[:, None]

    path = tmp_path / "p.onnx"
    old = _export(Positions(), (torch.randn(3, 2),), path)
    with pytest.raises(ShapeFreezeError, match="changes with the batch"):
        freeze_shapes(old)
    before = path.read_bytes()
    with pytest.raises(ShapeFreezeError):
        freeze_shapes_file(path)
    with pytest.warns(UserWarning, match="kept dynamic"):
        rep = freeze_shapes_file(path, strict=False)
    assert rep["frozen"] is False and path.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_a_second_dynamic_dimension_is_refused(tmp_path):
    torch = pytest.importorskip("torch")

    class M(torch.nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], -1)

    old = _export(M(), (torch.randn(2, 3, 4),), tmp_path / "m.onnx", dynamic=(0, 1))
    with pytest.raises(ShapeFreezeError, match="dimension 1 is dynamic"):
        freeze_shapes(old)


def test_the_file_rewrite_is_atomic_and_in_place(tmp_path):
    torch = pytest.importorskip("torch")

    class M(torch.nn.Module):
        def forward(self, x):
            b, c, h, w = x.shape
            return x.reshape(b, c, h * w).softmax(-1).reshape(b, c, h, w)

    real = tmp_path / "m.onnx"
    _export(M(), (torch.randn(2, 3, 4, 4),), real)
    real.chmod(0o640)
    link = tmp_path / "link.onnx"
    link.symlink_to(real.name)
    rep = freeze_shapes_file(link)  # through the link: the file it names changes
    assert rep["frozen"] and rep["shape_ops_before"] > 0 and rep["shape_ops_after"] == 0
    assert link.is_symlink() and count_shape_ops(onnx.load(str(real))) == 0
    assert real.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.onnx", "m.onnx"]


def test_a_step_function_of_the_batch_is_refused(tmp_path):
    torch = pytest.importorskip("torch")

    class M(torch.nn.Module):  # 0 at every probed batch size (1, 2, 3, 5), 1 at 8
        def forward(self, x):
            return x + (x.shape[0] // 8)

    old = _export(M(), (torch.randn(2, 3),), tmp_path / "m.onnx")
    with pytest.raises(ShapeFreezeError, match="computed from the batch size but equal"):
        freeze_shapes(old)


def test_a_shape_that_depends_on_data_is_refused(tmp_path):
    torch = pytest.importorskip("torch")

    class M(torch.nn.Module):  # probes feed zeros: NonZero would look empty and constant
        def forward(self, x, ids):
            return x * torch.nonzero(ids).shape[0]

    old = _export(M(), (torch.randn(2, 3), torch.ones(2, 4, dtype=torch.int64)), tmp_path / "m.onnx")
    with pytest.raises(ShapeFreezeError, match="depends on data"):
        freeze_shapes(old)


def _graph(nodes, inputs, outputs, inits=()):
    from onnx import helper

    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_subgraphs_and_unnamed_batches_are_refused():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["o"])],
        "br",
        [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
    )
    m = _graph(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("ReduceMax", ["s"], ["n"], keepdims=0),
            helper.make_node("Cast", ["n"], ["c"], to=TensorProto.BOOL),
            helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
        ],
        [x],
        [y],
    )
    with pytest.raises(ShapeFreezeError, match="has a subgraph"):
        freeze_shapes(m)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 2])
    m = _graph([helper.make_node("Add", ["a", "b"], ["y"])], [a, b], [y])
    with pytest.raises(ShapeFreezeError, match="unnamed dynamic dimensions"):
        freeze_shapes(m)


def test_initializers_listed_as_inputs_are_dropped_from_both(tmp_path):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    # IR < 4 style: the shape arithmetic's constants are initializers listed as inputs as well;
    # once its nodes go, a leftover input would be a required input nobody feeds
    inits = [
        numpy_helper.from_array(np.array([1, 2], np.int64), "idx"),
        numpy_helper.from_array(np.array([-1], np.int64), "mone"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 3])
    listed = [helper.make_tensor_value_info(i.name, TensorProto.INT64, list(i.dims)) for i in inits]
    m = _graph(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "idx"], ["hw"]),
            helper.make_node("ReduceProd", ["hw"], ["n"], keepdims=1),
            helper.make_node("Concat", ["mone", "n"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"]),
        ],
        [x] + listed,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6])],
        inits,
    )
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    rep = freeze_shapes_file(path)
    assert rep["frozen"] and rep["shape_ops_after"] == 0
    new = onnx.load(str(path))
    assert [i.name for i in new.graph.input] == ["x"] and "idx" not in {i.name for i in new.graph.initializer}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((5, 2, 3), np.float32)})[0].shape == (5, 6)


def test_nothing_to_freeze_leaves_the_file_alone(tmp_path):
    torch = pytest.importorskip("torch")

    class M(torch.nn.Module):
        def forward(self, x):
            return x * 2.0

    path = tmp_path / "m.onnx"
    _export(M(), (torch.randn(2, 3),), path)
    before = path.stat().st_mtime_ns, path.read_bytes()
    rep = freeze_shapes_file(path)
    assert rep["frozen"] is False and (path.stat().st_mtime_ns, path.read_bytes()) == before
