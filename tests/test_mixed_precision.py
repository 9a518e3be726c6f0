"""The float16 graph rewrite TensorRT 11's fp16 engines are built from (pydiff.backends.float16, `pydiff export float16`).

Numbers are checked with onnx's reference evaluator, which computes every float16 op in NumPy float16
(ONNX Runtime's CPU provider runs float16 graphs too, but computes many float16 ops in float32 and
drops the casts between them, so it does not show float16 rounding or overflow).
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pydiff.backends import float16 as mp  # noqa: E402
from pydiff.pipeline import bundled_path  # noqa: E402

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _types(model):
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    t = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.value_info) + list(g.output)}
    t.update({i.name: i.data_type for i in g.initializer})
    return t


def _feeds(model, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        shape = [d.dim_value or batch for d in i.type.tensor_type.shape.dim]
        if i.type.tensor_type.elem_type == TensorProto.INT64:
            feeds[i.name] = rng.integers(0, 10, shape).astype(np.int64)
        elif i.name in ("timestep", "noise_level"):
            feeds[i.name] = rng.uniform(0, 999, shape).astype(np.float32)
        elif "mask" in i.name:
            feeds[i.name] = np.ones(shape, np.float32)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _reference(model, feeds):
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)[0]


def _ort(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model, feeds):
    return _ort(model).run(None, feeds)[0]


@pytest.mark.parametrize("package,stage", [("digits", "model"), ("shapes", "base"), ("shapes", "sr64")])
def test_bundled_networks_in_float16(package, stage):
    model = onnx.load(str(bundled_path(package) / f"{stage}.onnx"))
    half = mp.convert(model, stage)
    types = _types(half)
    g = half.graph
    # the buffers pydiff binds keep their types
    assert [(i.name, i.type.tensor_type.elem_type) for i in g.input] == [
        (i.name, i.type.tensor_type.elem_type) for i in model.graph.input
    ]
    assert all(o.type.tensor_type.elem_type == F32 for o in g.output)
    # the heavy ops compute in float16 on float16 weights; statistics and the phases stay float32
    for n in g.node:
        if n.op_type in ("Conv", "MatMul", "Gemm"):
            assert all(types[i] == F16 for i in n.input if i), n.name
        if n.op_type in mp.KEEP_FLOAT32:
            assert all(types[o] == F32 for o in n.output), n.name
    phases = [n for n in g.node if n.op_type in ("Sin", "Cos")]
    assert phases and all(types[n.input[0]] == F32 for n in phases)
    assert not any(t.data_type == F32 and t.dims and np.prod(t.dims) > 16 for t in g.initializer), (
        "a float32 weight tensor was left"
    )
    s = mp.summary(half)
    assert s["float16_nodes"] > s["nodes"] / 2 and s["casts"] < s["nodes"] / 5

    feeds = _feeds(model, batch=2 if stage != "sr64" else 1)
    ref = _run(model, feeds)
    # the reference evaluator's float16 NumPy convolutions take minutes at 64x64: ONNX Runtime there
    out = _run(half, feeds) if stage == "sr64" else _reference(half, feeds)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    err = np.abs(out - ref).max() / np.abs(ref).max()
    # seed 0: 1.1e-3 digits, 6.2e-4 base (float16 NumPy), 5.6e-4 sr64 (ORT); float16's roundoff 4.9e-4
    assert err < 2e-3, err
    assert err > 0  # it did compute in float16


def _graph(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape=(2, 3), t=F32):
    return helper.make_tensor_value_info(name, t, list(shape))


def test_unknown_ops_stay_float32_and_casts_go_only_at_boundaries():
    w = numpy_helper.from_array(np.full((3, 3), 0.5, np.float32), "w")
    model = _graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("Softsign", ["a"], ["b"]),  # not in either list: float32
            helper.make_node("Add", ["b", "b"], ["c"]),
            helper.make_node("Exp", ["c"], ["y"]),
        ],  # kept in float32
        [_vi("x")],
        [_vi("y")],
        [w],
    )
    half = mp.convert(model)
    t = _types(half)
    ops = [n.op_type for n in half.graph.node]
    assert ops == ["Cast", "MatMul", "Cast", "Softsign", "Cast", "Add", "Cast", "Exp"]
    assert t["a"] == F16 and t["b"] == F32 and t["c"] == F16 and t["y"] == F32
    assert {i.name: i.data_type for i in half.graph.initializer} == {"w/fp16": F16}
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(_run(half, {"x": x}), _run(model, {"x": x}), rtol=5e-3)


def test_float16_weights_stored_with_a_cast_feed_float16_ops_directly():
    w16 = numpy_helper.from_array(np.full((3, 3), 0.25, np.float16), "w16")
    model = _graph(
        [
            helper.make_node("Cast", ["w16"], ["w"], to=F32),
            helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(3.0))),
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("Mul", ["a", "k"], ["y"]),
        ],
        [_vi("x")],
        [_vi("y")],
        [w16],
    )
    half = mp.convert(model)
    ops = [(n.op_type, list(n.input)) for n in half.graph.node]
    assert ops == [
        ("Cast", ["x"]),
        ("MatMul", ["x/fp16", "w16"]),
        ("Mul", ["a", "k/fp16"]),
        ("Cast", ["y/fp16"]),
    ]
    assert {i.name: i.data_type for i in half.graph.initializer} == {"w16": F16, "k/fp16": F16}


def test_resize_scales_stay_float32():
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    model = _graph(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")],
        [_vi("x", (1, 2, 3, 3))],
        [_vi("y", (1, 2, 6, 6))],
        [scales],
    )
    half = mp.convert(model)
    t = _types(half)
    assert t["scales"] == F32 and t["y/fp16"] == F16
    x = np.arange(18, dtype=np.float32).reshape(1, 2, 3, 3)
    np.testing.assert_array_equal(_run(half, {"x": x}), _run(model, {"x": x}))


def test_ops_with_constants_beyond_float16_stay_float32():
    """A -1e9 mask fill or a Clip at FLT_MAX would be inf in float16: such ops keep float32 (as
    AutoCast's init_max rule), whether the constant is an initializer or a Constant attribute."""
    big = numpy_helper.from_array(np.array(1e5, np.float32), "big")
    hi = numpy_helper.from_array(np.array(np.finfo(np.float32).max, np.float32), "hi")
    model = _graph(
        [
            helper.make_node("Mul", ["x", "big"], ["a"], name="scale"),
            helper.make_node("Constant", [], ["k"], value_float=-1e9),
            helper.make_node("Add", ["a", "k"], ["b"]),
            helper.make_node("Clip", ["b", "", "hi"], ["c"]),
            helper.make_node("Relu", ["x"], ["d"]),
        ],
        [_vi("x")],
        [_vi("c"), _vi("d")],
        [big, hi],
    )
    half = mp.convert(model, "m")
    t = _types(half)
    assert (t["a"], t["b"], t["c"], t["d/fp16"]) == (F32, F32, F32, F16)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    from onnx.reference import ReferenceEvaluator

    c, d = ReferenceEvaluator(half).run(None, {"x": x})
    want_c, want_d = _ort(model).run(None, {"x": x})
    np.testing.assert_array_equal(c, want_c)  # float32 all the way: -1e9 + 1e5 x
    np.testing.assert_allclose(d, want_d, rtol=1e-3)


def test_a_graph_output_read_inside_the_graph():
    w = numpy_helper.from_array(np.full((3, 3), 0.5, np.float32), "w")
    model = _graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("Relu", ["a"], ["b"]),  # float16 reader
            helper.make_node("Exp", ["a"], ["c"]),  # float32 reader
            helper.make_node("Add", ["b", "c"], ["y"]),
        ],
        [_vi("x")],
        [_vi("a"), _vi("y")],
        [w],
    )
    half = mp.convert(model)
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [F32, F32]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    from onnx.reference import ReferenceEvaluator

    for got, want in zip(ReferenceEvaluator(half).run(None, {"x": x}), _ort(model).run(None, {"x": x})):
        np.testing.assert_allclose(got, want, rtol=2e-3)


def test_an_initializer_that_is_also_an_input_stays_an_input():
    s = numpy_helper.from_array(np.array(2.0, np.float32), "s")
    model = _graph([helper.make_node("Mul", ["x", "s"], ["y"])], [_vi("x"), _vi("s", ())], [_vi("y")], [s])
    half = mp.convert(model)
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(_reference(half, {"x": x, "s": np.array(3.0, np.float32)}), 3 * x)
    np.testing.assert_array_equal(_run(half, {"x": x}), 2 * x)  # the default still applies


def test_computed_resize_scales_stay_float32():
    two = numpy_helper.from_array(np.array([1, 1, 1, 1], np.float32), "one")
    model = _graph(
        [
            helper.make_node("Add", ["one", "one"], ["scales"]),
            helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest"),
        ],
        [_vi("x", (1, 2, 3, 3))],
        [_vi("y", (1, 2, 6, 6))],
        [two],
    )
    half = mp.convert(model)
    assert _types(half)["scales"] == F32
    x = np.arange(18, dtype=np.float32).reshape(1, 2, 3, 3)
    np.testing.assert_array_equal(_reference(half, {"x": x}), _run(model, {"x": x}))


def test_new_names_do_not_collide():
    w = numpy_helper.from_array(np.full((3, 3), 0.5, np.float32), "w")
    model = _graph(
        [
            helper.make_node("Relu", ["x"], ["x/fp16"]),  # names the pass would make
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("Add", ["a", "x/fp16"], ["y"]),
            helper.make_node("Identity", ["y"], ["y/fp16"]),
        ],
        [_vi("x")],
        [_vi("y"), _vi("y/fp16")],
        [w],
    )
    half = mp.convert(model)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    for got, want in zip(_ort(half).run(None, {"x": x}), _ort(model).run(None, {"x": x})):
        np.testing.assert_allclose(got, want, rtol=2e-3)


def test_subgraphs_are_refused():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [], [_vi("z")])
    cond = _graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        [_vi("x"), _vi("c", (), TensorProto.BOOL)],
        [_vi("y")],
    )
    with pytest.raises(mp.MixedPrecisionError, match="m: node 'If' .* has a subgraph"):
        mp.convert(cond, "m")


def test_command_line_writes_atomically(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")  # `pydiff export` comes with the [train] extra
    from pydiff import cli

    def float16_cli(argv):
        return cli.main(["export", "float16", *argv])

    monkeypatch.setenv("PYDIFF_DEBUG", "1")  # the command's exceptions reach the test
    src = bundled_path("digits") / "model.onnx"
    dst = tmp_path / "model_fp16.onnx"
    assert float16_cli([str(src), str(dst)]) == 0
    assert "float16_nodes" in capsys.readouterr().out
    assert any(t.data_type == F16 for t in onnx.load(str(dst)).graph.initializer)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(Exception):
        float16_cli([str(bad), str(tmp_path / "out.onnx")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "model_fp16.onnx"]
    with pytest.raises(SystemExit):
        float16_cli([str(src)])  # argparse: DST missing


def test_a_float16_package_generates_the_float32_image(tmp_path):
    """`--package`: every stage network rewritten, everything else copied; the copy loads and samples
    like the original (ONNX Runtime CPU; measured max 0.13/255 on digits, 10/255 on shapes at 20 steps)."""
    import pydiff

    src = bundled_path("digits")
    dst = tmp_path / "digits16"
    report = mp.convert_package(src, dst)
    assert list(report) == ["model.onnx"] and report["model.onnx"]["float16_nodes"] > 0
    assert (dst / "classifier.onnx").read_bytes() == (src / "classifier.onnx").read_bytes()
    from pydiff.package import load_package

    assert "float16" in load_package(dst).description
    kw = dict(class_label=[3, 7], num_images=2, seed=1, steps=20, output_type="numpy", progress=False)
    want = pydiff.load(src, providers="cpu").generate(**kw)
    got = pydiff.load(dst, providers="cpu").generate(**kw)
    assert 0 < np.abs(got - want).max() <= 2 / 255

    with pytest.raises(FileExistsError, match="exists"):
        mp.convert_package(src, dst)
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(src, broken)
    (broken / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(Exception):
        mp.convert_package(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "digits16"]  # nothing half-made
