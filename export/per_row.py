"""Dynamic int8 with one activation scale per part: batch-independent, and truly batched.

Dynamic int8 (onnxruntime.quantization.quantize_dynamic) quantizes each matrix
product's input with ONE scale and zero point taken from the whole input
tensor, so in a batch a part's embedding depends on its neighbours. The Scan
wrapper (export/per_part.py) fixed that by running the graph once per part:
exact, but a batch of 8 regions then costs ~8 single calls.

This rewrite gives every row (every part) its own scale and zero point instead,
computed exactly as DynamicQuantizeLinear does for a batch of one:

    lo = min(0, min(x_row)); hi = max(0, max(x_row)); scale = (hi - lo) / 255
    zero = saturate(round(-lo / scale)); x_q = saturate(round(x / scale) + zero)

onnxruntime's MatMulInteger takes only a scalar input zero point, so the product
runs without it and the per-row correction is subtracted in exact int32:

    (x_q - zero_row) @ (w_q - w_zero) = x_q @ (w_q - w_zero) - zero_row * colsum(w_q - w_zero)

Every operation is row-wise or integer-exact, so a part's embedding is the same
bits alone and in any batch (tests/test_regions.py), while the batch runs as one
integer matrix product.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.per_part import BODY_INPUT, BODY_OUTPUT


def _unwrap_scan(model: onnx.ModelProto) -> onnx.GraphProto:
    """The per-part graph of a Scan-wrapped model (export/per_part.py) as a plain batched graph."""
    graph = model.graph
    if not (len(graph.node) == 1 and graph.node[0].op_type == "Scan"):
        return graph
    body = next(a.g for a in graph.node[0].attribute if a.name == "body")
    outer_in, outer_out = graph.input[0].name, graph.output[0].name
    nodes = [n for n in body.node if not (n.op_type in ("Unsqueeze", "Squeeze") and
                                          (n.input[0] == BODY_INPUT or n.output[0] == BODY_OUTPUT))]
    first = next(n for n in body.node if n.op_type == "Unsqueeze" and n.input[0] == BODY_INPUT).output[0]
    last = next(n for n in body.node if n.op_type == "Squeeze" and n.output[0] == BODY_OUTPUT).input[0]
    renamed = {first: outer_in, last: outer_out}
    for node in nodes:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    initializers = [i for i in body.initializer if i.name != "batch_axis"]
    return helper.make_graph(nodes, graph.name, list(graph.input), list(graph.output), initializer=initializers)


def _const(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def per_row_dynamic(path: Path) -> int:
    """Rewrite the dynamic int8 model at `path` in place; returns the matrix products rewritten."""
    model = onnx.load(str(path))
    graph = _unwrap_scan(model)
    weights = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    extra = [_const("per_row_zero_f", 0.0, np.float32), _const("per_row_255_f", 255.0, np.float32),
             _const("per_row_tiny_f", np.finfo(np.float32).tiny, np.float32)]
    nodes, rewritten = [], 0
    corrections: dict[int, list[onnx.NodeProto]] = {}  # id(MatMulInteger) -> the nodes that follow it
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        x, (x_q, scale, zero) = node.input[0], node.output
        matmuls = [n for n in consumers.get(x_q, []) if n.op_type == "MatMulInteger"]
        if len(matmuls) != len(consumers.get(x_q, [])) or any(n.input[2] != zero for n in matmuls):
            raise ValueError(f"{path}: {node.name or x}: unexpected use of a dynamically quantized tensor")
        p = f"{x}_per_row"
        nodes += [
            helper.make_node("ReduceMin", [x], [f"{p}_min"], axes=[-1], keepdims=1),
            helper.make_node("ReduceMax", [x], [f"{p}_max"], axes=[-1], keepdims=1),
            helper.make_node("Min", [f"{p}_min", "per_row_zero_f"], [f"{p}_lo"]),
            helper.make_node("Max", [f"{p}_max", "per_row_zero_f"], [f"{p}_hi"]),
            helper.make_node("Sub", [f"{p}_hi", f"{p}_lo"], [f"{p}_range"]),
            helper.make_node("Div", [f"{p}_range", "per_row_255_f"], [f"{p}_scale_raw"]),
            # An all-zero row (possible after a ReLU): any scale quantizes it to zeros; avoid 0/0.
            helper.make_node("Max", [f"{p}_scale_raw", "per_row_tiny_f"], [scale]),
            helper.make_node("Div", [f"{p}_lo", scale], [f"{p}_lo_steps"]),
            helper.make_node("Neg", [f"{p}_lo_steps"], [f"{p}_zero_raw"]),
            helper.make_node("Round", [f"{p}_zero_raw"], [f"{p}_zero_round"]),
            helper.make_node("Clip", [f"{p}_zero_round", "per_row_zero_f", "per_row_255_f"], [f"{p}_zero_f"]),
            helper.make_node("Div", [x, scale], [f"{p}_steps"]),
            helper.make_node("Round", [f"{p}_steps"], [f"{p}_steps_round"]),
            helper.make_node("Add", [f"{p}_steps_round", f"{p}_zero_f"], [f"{p}_shifted"]),
            helper.make_node("Clip", [f"{p}_shifted", "per_row_zero_f", "per_row_255_f"], [f"{p}_clipped"]),
            helper.make_node("Cast", [f"{p}_clipped"], [x_q], to=TensorProto.UINT8),
            helper.make_node("Cast", [f"{p}_zero_f"], [zero], to=TensorProto.INT32),
        ]
        for matmul in matmuls:
            w = numpy_helper.to_array(weights[matmul.input[1]]).astype(np.int32)
            w_zero = numpy_helper.to_array(weights[matmul.input[3]]).astype(np.int32) if len(matmul.input) > 3 \
                and matmul.input[3] else np.zeros((), np.int32)
            colsum = f"{matmul.input[1]}_colsum"
            extra.append(_const(colsum, (w - w_zero).sum(axis=0), np.int32))
            product = matmul.output[0]
            matmul.input[2] = ""  # scalar zero point only: corrected below
            matmul.output[0] = f"{product}_uncorrected"
            corrections[id(matmul)] = [
                helper.make_node("Mul", [zero, colsum], [f"{product}_correction"]),
                helper.make_node("Sub", [f"{product}_uncorrected", f"{product}_correction"], [product]),
            ]
        rewritten += 1
    ordered = []
    for node in nodes:  # each corrected product right after its MatMulInteger
        ordered += [node, *corrections.get(id(node), [])]
    result_graph = helper.make_graph(ordered, graph.name, list(graph.input), list(graph.output),
                                     initializer=list(graph.initializer) + extra)
    result = helper.make_model(result_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    result.metadata_props.extend(model.metadata_props)
    onnx.checker.check_model(result)
    onnx.save(result, str(path))
    return rewritten
