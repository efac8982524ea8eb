"""The DFL softmax rewrite: same outputs, softmax over the last axis, other graphs untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from roadloop.models.graph_rewrites import dfl_softmax_last_axis, rewrite_onnx_file

from .helpers import SHARED_DIR, require_shared

ANCHORS = 21


def _dfl_graph(*, perm=(0, 2, 1, 3), axis=1, group=1, bins=16) -> onnx.ModelProto:
    """(1, 4·bins, A) → Reshape(1, 4, bins, A) → Transpose → Softmax → Conv 1×1 → (1, 4, A),
    the Ultralytics Detect head's DFL as it exports."""
    weights = np.arange(bins, dtype=np.float32).reshape(1, bins, 1, 1)
    nodes = [
        helper.make_node("Reshape", ["x", "shape4"], ["r"], name="/model.23/dfl/Reshape"),
        helper.make_node("Transpose", ["r"], ["t"], name="/model.23/dfl/Transpose", perm=perm),
        helper.make_node("Softmax", ["t"], ["s"], name="/model.23/dfl/Softmax", axis=axis),
        helper.make_node("Conv", ["s", "w"], ["c"], name="/model.23/dfl/conv/Conv",
                         kernel_shape=[1, 1], group=group),
        helper.make_node("Reshape", ["c", "shape3"], ["y"], name="/model.23/dfl/Reshape_1"),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 4, bins, ANCHORS], np.int64), "shape4"),
        numpy_helper.from_array(np.array([1, 4, ANCHORS], np.int64), "shape3"),
        numpy_helper.from_array(weights, "w"),
    ]
    graph = helper.make_graph(
        nodes, "dfl", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4 * bins, ANCHORS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, ANCHORS])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return onnx.shape_inference.infer_shapes(model)  # value_info for the old layout, as exported


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_rewrite_gives_the_same_outputs_with_the_softmax_last() -> None:
    model = _dfl_graph()
    x = np.random.default_rng(0).normal(0, 3, (1, 64, ANCHORS)).astype(np.float32)
    before = _run(model, x)
    assert dfl_softmax_last_axis(model) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type: n for n in model.graph.node}
    assert "Conv" not in ops and "MatMul" in ops
    assert helper.get_attribute_value(ops["Softmax"].attribute[0]) == -1
    assert list(helper.get_attribute_value(ops["Transpose"].attribute[0])) == [0, 1, 3, 2]
    assert ops["MatMul"].name.startswith("/model.23/dfl/")  # still inside the float-kept tail
    assert "w" not in {i.name for i in model.graph.initializer}  # the unused conv weight left
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-6, atol=1e-6)
    assert dfl_softmax_last_axis(model) == 0  # nothing left to rewrite


@pytest.mark.parametrize("change", [{"perm": (0, 1, 3, 2)}, {"axis": -1}, {"bins": 8, "group": 2}])
def test_other_graphs_are_left_alone(change: dict) -> None:
    model = _dfl_graph(**change)
    before = model.SerializeToString()
    assert dfl_softmax_last_axis(model) == 0
    assert model.SerializeToString() == before


def test_the_shared_export_gives_the_same_outputs_rewritten(tmp_path: Path) -> None:
    """The checkpoint's own export (old layout) gives the same outputs rewritten on real
    frames (``quantize_int8`` applying it: tests/test_int8_gate.py)."""
    src = SHARED_DIR / "models" / "atl_v2_yolo11n_gpu_320.onnx"
    require_shared(src, SHARED_DIR / "datasets" / "atl_v2")
    from roadloop.models.quantize import list_images, preprocess

    frames = list_images(SHARED_DIR / "datasets" / "atl_v2" / "images" / "val")[:2]
    dst = tmp_path / "rewritten.onnx"
    assert rewrite_onnx_file(src, dst) == 1
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (src, dst)]
    for f in frames:  # the shared export takes batch 1
        x = preprocess(f, 320)
        before, after = (s.run(None, {"images": x})[0] for s in sessions)
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-3)  # boxes in pixels
