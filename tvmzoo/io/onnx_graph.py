"""A small graph builder over onnx.helper: models are written as a few calls, weights as numpy."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class GraphBuilder:
    """Collects nodes and initializers; every method returns the name of its output tensor."""

    def __init__(self, name: str, opset: int = OPSET) -> None:
        self.name = name
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counts: dict[str, int] = {}

    @classmethod
    def for_model(cls, model: str, kind: str) -> GraphBuilder:
        """A graph named after the model and its form: 'RegNetX-400MF', 'deploy' -> regnetx_400mf_deploy."""
        return cls(f"{model}_{kind}".lower().replace("-", "_").replace(" ", "_"))

    def _unique(self, hint: str) -> str:
        n = self._counts.get(hint, 0)
        self._counts[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def input(self, shape: Sequence[int | str | None], name: str = INPUT_NAME,
              elem_type: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def image_input(self, batch: int | None, size_hw: Sequence[int]) -> tuple[int | str, str]:
        """The model input [N, 3, H, W] (N symbolic when batch is None): (N, input name)."""
        n = batch_dim(batch)
        return n, self.input([n, 3, int(size_hw[0]), int(size_hw[1])])

    def const(self, value: np.ndarray, name: str) -> str:
        name = self._unique(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], name: str | None = None, **attrs) -> str:
        out = self._unique(name or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def conv(self, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str, *,
             stride: int = 1, pads: Sequence[int] | None = None, groups: int = 1) -> str:
        """Conv with a [out, in/groups, kh, kw] weight; default padding keeps 'same' size for odd kernels."""
        kh, kw = weight.shape[2:]
        if pads is None:
            pads = (kh // 2, kw // 2, kh // 2, kw // 2)
        inputs = [x, self.const(weight.astype(np.float32), f"{name}.weight")]
        if bias is not None:
            inputs.append(self.const(bias.astype(np.float32), f"{name}.bias"))
        return self.op("Conv", inputs, name=name, kernel_shape=[kh, kw], strides=[stride, stride],
                       pads=list(pads), group=groups)

    def batch_norm(self, x: str, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
                   name: str, eps: float) -> str:
        """An unfolded BatchNormalization node (the reference graphs keep BN to check the folding)."""
        ins = [self.const(np.asarray(a).astype(np.float32), f"{name}.{n}")
               for a, n in ((gamma, "weight"), (beta, "bias"), (mean, "mean"), (var, "var"))]
        return self.op("BatchNormalization", [x, *ins], name=name, epsilon=eps)

    def gemm(self, x: str, weight: np.ndarray, bias: np.ndarray, name: str) -> str:
        """y = x @ weight.T + bias, weight as [out, in] (torch Linear layout)."""
        return self.op("Gemm", [x, self.const(weight.astype(np.float32), f"{name}.weight"),
                                self.const(bias.astype(np.float32), f"{name}.bias")],
                       name=name, transB=1)

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def scalar(self, value: float, name: str) -> str:
        """A float32 scalar initializer, shared by every node that uses the same `name`."""
        if name not in self._counts:
            self.const(np.array(value, np.float32), name)
        return name

    def relu6(self, x: str) -> str:
        return self.op("Clip", [x, self.scalar(0.0, "relu6_min"), self.scalar(6.0, "relu6_max")], name="relu6")

    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b])

    def global_avg_pool(self, x: str) -> str:
        return self.op("GlobalAveragePool", [x])

    def flatten(self, x: str) -> str:
        return self.op("Flatten", [x], axis=1)

    def output(self, x: str, shape: Sequence[int | str | None], name: str = OUTPUT_NAME) -> str:
        """Expose tensor x as a graph output called `name` (an Identity keeps names stable)."""
        self.nodes.append(helper.make_node("Identity", [x], [name], name=name))
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def classifier(self, x: str, weight: np.ndarray, bias: np.ndarray, name: str, batch: int | str,
                   num_classes: int) -> str:
        """The head every family ends with: global average pool, flatten, Linear (Gemm), exposed as the
        graph output [batch, num_classes]."""
        return self.output(self.gemm(self.flatten(self.global_avg_pool(x)), weight, bias, name), [batch, num_classes])

    def build(self, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="tvmzoo", doc_string=doc)
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def batch_dim(batch: int | None) -> int | str:
    """ONNX dimension for the batch: a fixed size, or the symbolic 'N'."""
    return "N" if batch is None else int(batch)
