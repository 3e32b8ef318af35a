"""Small real ONNX models for tests that need an embedder but not a trained trunk.

A fixed random projection of the pixels (with a tanh) is a legitimate, if
weak, embedding: it runs in onnxruntime exactly like an exported trunk and
carries the same self-describing metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from station.core.preprocess import Roi, prepare_crop, to_model_input


def projection_model(
    path: Path,
    seed: int = 0,
    embedding_dim: int = 32,
    width: int = 36,
    height: int = 26,
    metadata: dict[str, str] | None = None,
    layout: str = "flat",
) -> Path:
    rng = np.random.default_rng(seed)
    pixels = width * height
    weights = (rng.normal(size=(pixels, embedding_dim)) / np.sqrt(pixels) * 4).astype(np.float32)
    bias = rng.normal(scale=0.1, size=embedding_dim).astype(np.float32)
    input_shape = ["batch", pixels] if layout == "flat" else ["batch", 1, height, width]
    nodes = []
    source = "input"
    if layout == "nchw":
        nodes.append(helper.make_node("Flatten", ["input"], ["flat"], axis=1))
        source = "flat"
    nodes += [
        helper.make_node("MatMul", [source, "W"], ["projected"]),
        helper.make_node("Add", ["projected", "b"], ["shifted"]),
        helper.make_node("Tanh", ["shifted"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "projection",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", embedding_dim])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    props = {
        "input_width": str(width),
        "input_height": str(height),
        "input_layout": layout,
        "pixel_scale": str(1 / 255),
        "embedding_dim": str(embedding_dim),
        "arch": "projection",
        "quantization": "fp32",
    }
    props.update(metadata or {})
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return Path(path)


def int8_twin(fp32_path: Path, path: Path, seed: int = 0) -> Path:
    """The static int8 (QDQ, per channel) form of a projection model, quantized by onnxruntime as `station
    export` does, with the fp32 model's metadata and quantization int8-static: a real second form."""
    from onnxruntime import quantization as q

    source = onnx.load(str(fp32_path))
    props = {p.key: p.value for p in source.metadata_props}
    shape = [int(d.dim_value) for d in source.graph.input[0].type.tensor_type.shape.dim[1:]]
    crops = np.random.default_rng(seed).random((64, *shape), dtype=np.float32)

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": crops[i : i + 16]} for i in range(0, len(crops), 16)])

        def get_next(self):
            return next(self.batches, None)

    q.quantize_static(
        str(fp32_path),
        str(path),
        Reader(),
        quant_format=q.QuantFormat.QDQ,
        per_channel=True,
        activation_type=q.QuantType.QUInt8,
        weight_type=q.QuantType.QUInt8,
        op_types_to_quantize=["MatMul", "Add"],
    )
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in {**props, "quantization": "int8-static"}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return Path(path)


def model_input(frames, spec, roi: Roi | None = None) -> np.ndarray:
    """Frames (any size, grey or colour) -> the model's float32 batch, as the station makes it."""
    return to_model_input(np.stack([prepare_crop(frame, spec, roi) for frame in frames]), spec)


def embed_frames(embedder, frames, roi: Roi | None = None) -> np.ndarray:
    """Embeddings of frames through the station's own path (prepare_crop, to_model_input, Embedder.embed)."""
    return embedder.embed(model_input(frames, embedder.input_spec, roi))


def scan_per_part(path: Path):
    """The Scan form `station export` wrote before per-row scales (export/per_row.py reads it): the model at
    `path` rewritten in place to run its graph once per part, (batch, ...) -> Scan(one part) -> (batch, dim)."""
    from export.per_row import BODY_INPUT, BODY_OUTPUT

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
        nodes,
        "one_part",
        [helper.make_tensor_value_info(BODY_INPUT, TensorProto.FLOAT, part_shape)],
        [helper.make_tensor_value_info(BODY_OUTPUT, TensorProto.FLOAT, [embedding_dim])],
        initializer=list(graph.initializer) + [helper.make_tensor("batch_axis", TensorProto.INT64, [1], [0])],
    )
    scan = helper.make_node(
        "Scan", [outer_input.name], [outer_output.name], num_scan_inputs=1, body=body, name="each_part"
    )
    wrapped = helper.make_graph([scan], graph.name, [outer_input], [outer_output])
    result = helper.make_model(wrapped, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    result.metadata_props.extend(model.metadata_props)
    onnx.checker.check_model(result)
    onnx.save(result, str(path))
