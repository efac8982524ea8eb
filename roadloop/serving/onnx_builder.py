"""Small helpers for writing ONNX graphs by hand with ``onnx.helper``: nodes and constants
under one name prefix, a model with another model's opsets, a tensor's dims."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphBuilder:
    """Collects nodes and constants under one name prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        full = self.prefix + name
        self.inits.append(numpy_helper.from_array(np.asarray(value), full))
        return full

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> str:
        outs = (
            [self.prefix + name]
            if n_out == 1
            else [f"{self.prefix}{name}_{i}" for i in range(n_out)]
        )
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=self.prefix + name + "_node", **attrs)
        )
        return outs[0]


def model_like(b: GraphBuilder, inputs, outputs, like: onnx.ModelProto, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, name, inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=list(like.opset_import))
    model.ir_version = like.ir_version
    return model


def dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    """A tensor's dims: ints where static, the symbol (or "?") where dynamic."""
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
        for d in value_info.type.tensor_type.shape.dim
    ]
