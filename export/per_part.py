"""Make a dynamically quantized model judge each part on its own, inside the graph.

Dynamic int8 takes its activation scale from the whole input tensor, so in a
batch a part's embedding would depend on its neighbours. Wrapping the graph in
an ONNX Scan over the batch axis runs it once per part in a single onnxruntime
call: the same numbers as one call per part (tested bit for bit), without a
Python round trip and a GIL handoff per part, and correct for any caller that
batches, not only for our embedder.
"""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

BODY_INPUT, BODY_OUTPUT = "part_input", "part_embedding"


def scan_per_part(path: Path):
    """Rewrite the model at `path` in place: (batch, ...) -> Scan(one part) -> (batch, dim)."""
    model = onnx.load(str(path))
    graph = model.graph
    outer_input, outer_output = graph.input[0], graph.output[0]
    part_shape = [d.dim_value for d in outer_input.type.tensor_type.shape.dim[1:]]
    embedding_dim = outer_output.type.tensor_type.shape.dim[1].dim_value

    # Inside the loop body the graph sees a batch of one under its own names
    # (names must not repeat the outer graph's).
    renamed = {outer_input.name: "one_part_batch", outer_output.name: "one_part_embedding"}
    nodes = [helper.make_node("Unsqueeze", [BODY_INPUT, "batch_axis"], ["one_part_batch"])]
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [renamed.get(name, name) for name in copy.input]
        copy.output[:] = [renamed.get(name, name) for name in copy.output]
        nodes.append(copy)
    nodes.append(helper.make_node("Squeeze", ["one_part_embedding", "batch_axis"], [BODY_OUTPUT]))
    body = helper.make_graph(
        nodes, "one_part",
        [helper.make_tensor_value_info(BODY_INPUT, TensorProto.FLOAT, part_shape)],
        [helper.make_tensor_value_info(BODY_OUTPUT, TensorProto.FLOAT, [embedding_dim])],
        initializer=list(graph.initializer) + [helper.make_tensor("batch_axis", TensorProto.INT64, [1], [0])],
    )
    scan = helper.make_node("Scan", [outer_input.name], [outer_output.name], num_scan_inputs=1, body=body,
                            name="each_part")
    wrapped = helper.make_graph([scan], graph.name, [outer_input], [outer_output])
    result = helper.make_model(wrapped, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    result.metadata_props.extend(model.metadata_props)
    onnx.checker.check_model(result)
    onnx.save(result, str(path))
