"""Model size and cost, counted from a deploy ONNX graph (`tvmzoo info`; a build YAML's model: config/model_info.py).

Conventions (those of the public model tables):
- parameters: elements of the initializers that Conv, Gemm and MatMul nodes read (weights and biases);
  in a deploy graph every BN is folded, so a BN adds one bias per channel instead of a scale and a shift.
  The train-time count (the figure papers and model zoos publish) comes from the family's param_count.
- multiply-adds (MACs): Conv = output elements x (input channels / groups) x kernel area; Gemm / MatMul =
  output elements x the reduced dimension; per image (batch 1). Bias adds, BN, activations and pooling are
  not counted. Most "FLOPs" columns are MACs by this rule: pycls's flops (RegNetX-400MF 0.4), mmpretrain's
  Flops(G) (RepVGG-A0 "1.52 (train) | 1.36 (deploy)": 1.52 G counts the train-time 3x3 + 1x1 branches
  and BN, 1.36 G the re-parameterized 3x3 convs that deploy runs) and the RepVGG paper's 1.4 B.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from ..errors import ConfigError
from ..models import get_family, resolve_arch, resolve_source, weights_for

log = logging.getLogger(__name__)

_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
_SMALL_CONST = 64    # initializers up to this size stay constants for shape inference (Reshape shapes, ...)


@dataclass(frozen=True)
class ModelInfo:
    params_deploy: int
    macs: int
    input_shape: tuple[int, ...]        # (C, H, W) of one image
    conv_layers: int
    gemm_layers: int                    # Gemm and MatMul nodes
    params_train: int | None = None
    name: str | None = None

    def text(self) -> str:
        lines = [f"model: {self.name}"] if self.name else []
        lines.append(f"parameters (deploy): {self.params_deploy / 1e6:.2f} M")
        if self.params_train is not None:
            lines.append(f"parameters (train): {self.params_train / 1e6:.2f} M")
        lines += [f"multiply-adds: {self.macs / 1e9:.2f} G",
                  f"input: {'x'.join(str(d) for d in self.input_shape)}",
                  f"layers: {self.conv_layers} conv, {self.gemm_layers} gemm"]
        return "\n".join(lines)


# ---------------------------------------------------------------- from an ONNX graph

def _graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ConfigError(f"tvmzoo info expects a classifier ONNX with one image input, found "
                          f"{len(inputs)} ({', '.join(i.name for i in inputs) or 'none'}).")
    return inputs[0]


def _input_shape(value: onnx.ValueInfoProto, size_hw: tuple[int, int] | None) -> list[int]:
    """[1, C, H, W]: a symbolic batch becomes 1; symbolic H, W come from size_hw = (H, W)."""
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ConfigError(f"ONNX input '{value.name}' has {len(dims)} dimensions; expected N x C x H x W.")
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    shape[0] = 1
    if size_hw is not None:
        shape[2:] = [int(v) for v in size_hw]
    if None in shape:
        raise ConfigError(f"ONNX input '{value.name}' has a symbolic size {[d.dim_param or d.dim_value for d in dims]}: "
                          f"give the input size (frontend.shape in the build YAML).")
    return shape


def _skeleton(model: onnx.ModelProto, shape: list[int]) -> onnx.ModelProto:
    """The graph with a fixed input shape and its large initializers turned into typed inputs, so shape
    inference does not copy the weights."""
    g = model.graph
    image = _graph_input(model)
    inputs = [helper.make_tensor_value_info(image.name, image.type.tensor_type.elem_type, shape)]
    small = []
    for init in g.initializer:
        if math.prod(init.dims) <= _SMALL_CONST:
            small.append(init)
        else:
            inputs.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    graph = helper.make_graph(list(g.node), g.name, inputs, list(g.output), small)
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    return shapes


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    out = shapes.get(node.output[0])
    ins = [shapes.get(name) for name in node.input[:2]]
    if out is None or None in ins:
        raise ConfigError(f"cannot infer the shapes around {node.op_type} node '{node.name or node.output[0]}'; "
                          f"tvmzoo info needs a graph that onnx.shape_inference can resolve.")
    if node.op_type == "Conv":
        return math.prod(out) * math.prod(ins[1][1:])        # weight [Cout, Cin/groups, kh, kw]
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        return math.prod(out) * ins[0][0 if trans_a else 1]
    return math.prod(out) * ins[0][-1]                         # MatMul


def _constants(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of every constant tensor: initializers and Constant nodes."""
    consts = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = tuple(numpy_helper.to_array(node.attribute[0].t).shape)
    return consts


def model_info(onnx_model: onnx.ModelProto, *, size_hw: tuple[int, int] | None = None,
               name: str | None = None) -> ModelInfo:
    """Parameters, multiply-adds and layer counts of a deploy ONNX graph at its input size (or at
    size_hw = (H, W) when given or when the graph's spatial size is symbolic)."""
    shape = _input_shape(_graph_input(onnx_model), size_hw)
    consts = _constants(onnx_model)
    shapes = {**{k: list(v) for k, v in consts.items()}, **_shapes(_skeleton(onnx_model, shape))}
    weights: set[str] = set()
    macs = convs = gemms = 0
    for node in onnx_model.graph.node:
        if node.op_type not in _WEIGHT_OPS:
            continue
        weights.update(name for name in node.input if name in consts)
        macs += _node_macs(node, shapes)
        convs += node.op_type == "Conv"
        gemms += node.op_type != "Conv"
    params = sum(math.prod(consts[w]) for w in weights)
    return ModelInfo(params_deploy=params, macs=macs, input_shape=tuple(shape[1:]), conv_layers=convs,
                     gemm_layers=gemms, name=name)


# ---------------------------------------------------------------- from a model family



def family_info(family: str, arch: str, num_classes: int = 1000, size_hw: tuple[int, int] | None = None,
                *, source: str | None = None) -> ModelInfo:
    """ModelInfo of a family's arch, counted on its deploy ONNX built from random weights. source: the
    checkpoint layout[.tag] (default: the family's reference source); size_hw = (H, W)
    (default: the input size of its weights entry, tvmzoo.models.weights)."""
    fam = get_family(family)
    arch = resolve_arch(fam, arch)
    if size_hw is None:
        size_hw = weights_for(family, arch, source or fam.reference_source).size_hw
    source = resolve_source(fam, source) if source else fam.reference_source
    state = fam.random_state_dict(arch, source, np.random.default_rng(0), num_classes)
    model = fam.deploy_onnx(state, arch, source, size_hw=tuple(size_hw), batch=1)
    info = model_info(model, name=f"{fam.name} {arch} ({source} layout)")
    return ModelInfo(**{**info.__dict__, "params_train": fam.param_count(arch, source, num_classes, False)})


def num_classes(model: onnx.ModelProto) -> int:
    """The class count of a classifier ONNX: the last dimension of its first output (1000 if symbolic)."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else 1000
