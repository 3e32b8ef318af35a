"""Dynamic int8 with one activation scale per part: batch-independent, and truly batched.

Dynamic int8 (onnxruntime.quantization.quantize_dynamic) quantizes each matrix
product's input with ONE scale and zero point taken from the whole input
tensor, so in a batch a part's embedding depends on its neighbours. The Scan
wrapper this version exported before fixed that by running the graph once per part:
exact, but a batch of 8 regions then costs ~8 single calls. Such a model is still read
(its loop body unwrapped) and rewritten here.

This rewrite gives every row (every part) its own scale and zero point instead,
computed exactly as DynamicQuantizeLinear does for a batch of one:

    lo = min(0, min(x_row)); hi = max(0, max(x_row)); scale = (hi - lo) / 255
    zero = saturate(round(-lo / scale)); x_q = saturate(round(x / scale) + zero)

onnxruntime's MatMulInteger takes only a scalar input zero point, so the product
runs without it and the per-row correction is subtracted in exact int32:

    (x_q - zero_row) @ (w_q - w_zero) = x_q @ (w_q - w_zero) - zero_row * colsum(w_q - w_zero)

Every operation is row-wise or integer-exact, so a part's embedding is the same
bits alone and in any batch (tests/test_regions.py), while the batch runs as one
integer matrix product. The quantized inputs are 2-D (parts x features: the trunks'
Gemm/MatMul after Flatten); another rank fails the export gate's run, never silently.

Measured on the demo mlp (2-core Xeon, 1 thread): the Scan model 39 us a part at batch 1 and
24-27 us in batches; this graph 57 us at batch 1 (the per-row nodes, and no fused
DynamicQuantizeMatMul), 17.5 us a part at batch 8 and 11 us at 64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# The loop body's input and output in the Scan form (one part per loop) exported before.
BODY_INPUT, BODY_OUTPUT = "part_input", "part_embedding"


def _unwrap_scan(model: onnx.ModelProto) -> onnx.GraphProto:
    """The per-part graph of a Scan-wrapped model (exported before per-row scales) as a plain batched graph."""
    graph = model.graph
    if not (len(graph.node) == 1 and graph.node[0].op_type == "Scan"):
        return graph
    body = next(a.g for a in graph.node[0].attribute if a.name == "body")
    outer_in, outer_out = graph.input[0].name, graph.output[0].name
    nodes = [
        n
        for n in body.node
        if not (n.op_type in ("Unsqueeze", "Squeeze") and (n.input[0] == BODY_INPUT or n.output[0] == BODY_OUTPUT))
    ]
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
    extra = [
        _const("per_row_zero_f", 0.0, np.float32),
        _const("per_row_255_f", 255.0, np.float32),
        _const("per_row_tiny_f", np.finfo(np.float32).tiny, np.float32),
        _const("per_row_flat", [-1], np.int64),
        _const("per_row_axis1", [1], np.int64),
    ]
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
            # QuantizeLinear per row (axis 0, the row's scale): round half to even and saturate, in one kernel.
            helper.make_node("Neg", [f"{p}_lo"], [f"{p}_minus_lo"]),
            helper.make_node("Reshape", [scale, "per_row_flat"], [f"{p}_scale_flat"]),
            helper.make_node("Reshape", [f"{p}_minus_lo", "per_row_flat"], [f"{p}_minus_lo_flat"]),
            helper.make_node("QuantizeLinear", [f"{p}_minus_lo_flat", f"{p}_scale_flat"], [f"{p}_zero_u8"], axis=0),
            helper.make_node("QuantizeLinear", [x, f"{p}_scale_flat", f"{p}_zero_u8"], [x_q], axis=0),
            helper.make_node("Cast", [f"{p}_zero_u8"], [f"{p}_zero_flat"], to=TensorProto.INT32),
            helper.make_node("Unsqueeze", [f"{p}_zero_flat", "per_row_axis1"], [zero]),
        ]
        for matmul in matmuls:
            w = numpy_helper.to_array(weights[matmul.input[1]]).astype(np.int32)
            w_zero = (
                numpy_helper.to_array(weights[matmul.input[3]]).astype(np.int32)
                if len(matmul.input) > 3 and matmul.input[3]
                else np.zeros((), np.int32)
            )
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
    result_graph = helper.make_graph(
        ordered, graph.name, list(graph.input), list(graph.output), initializer=list(graph.initializer) + extra
    )
    result = helper.make_model(result_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    result.metadata_props.extend(model.metadata_props)
    onnx.checker.check_model(result)
    onnx.save(result, str(path))
    return rewritten
