"""The embedder: an onnxruntime session plus what the model says about itself.

A model file carries its own preprocessing settings in ONNX ``metadata_props``
(written by ``station export``). The runtime reads them here and nowhere else,
so nothing about the model is hard-coded in the station.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from station.core.errors import ModelError
from station.core.preprocess import FeatureGrid, InputSpec
from station.core.user_files import read_bytes

# Keys of the model's metadata_props; `station export` writes every one.
REQUIRED_METADATA = (
    "input_width",
    "input_height",
    "input_layout",
    "pixel_scale",
    "embedding_dim",
    "arch",
    "quantization",
)
OPTIONAL_METADATA = (
    "members",
    "batch_independent",
    "data_fingerprint",
    "trained_on",
    "created",
    "station_version",
    "backbone",
)
# A per-position model (export/positions.py) says so with all three: its `embedding` is the feature map,
# row-major positions then channels; `positions` "ROWSxCOLS", `position_channels` C, `position_stride` the
# model-input pixels per cell; optionally `position_offset`, where cell 0's block starts (model-input
# pixels, default 0: preprocess.FeatureGrid). Plain models carry none of them.
POSITION_METADATA = ("positions", "position_channels", "position_stride")
POSITION_OFFSET = "position_offset"
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
MAX_MODEL_BYTES = (2 << 30) - 1  # protobuf's limit: a larger ONNX model keeps its weights outside the file


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    input_spec: InputSpec
    embedding_dim: int
    arch: str
    quantization: str
    extra: dict[str, str]
    positions: FeatureGrid | None = None  # a per-position model's map; None for a plain embedding

    @property
    def short_id(self) -> str:
        return self.sha256[:12]


def _parse_metadata(path: Path, sha256: str, props: dict[str, str]) -> ModelInfo:
    missing = [key for key in REQUIRED_METADATA if key not in props]
    if missing:
        raise ModelError(
            f"{path}: the model does not describe itself (metadata lacks {', '.join(missing)}); "
            "export it with `station export`"
        )
    try:
        spec = InputSpec(
            width=int(props["input_width"]),
            height=int(props["input_height"]),
            layout=props["input_layout"],
            pixel_scale=float(props["pixel_scale"]),
        )
        embedding_dim = int(props["embedding_dim"])
    except (ValueError, Exception) as exc:  # DataError from InputSpec, ValueError from int()
        raise ModelError(f"{path}: invalid model metadata: {exc}") from exc
    return ModelInfo(
        path=path,
        sha256=sha256,
        input_spec=spec,
        embedding_dim=embedding_dim,
        arch=props["arch"],
        quantization=props["quantization"],
        extra={key: props[key] for key in OPTIONAL_METADATA if key in props},
        positions=_parse_positions(path, props, embedding_dim),
    )


def _parse_positions(path: Path, props: dict[str, str], embedding_dim: int) -> FeatureGrid | None:
    """The feature grid of a per-position model, None for a plain one; a partial or inconsistent one is refused."""
    present = [key for key in POSITION_METADATA if key in props]
    if not present:
        return None
    if len(present) != len(POSITION_METADATA):
        missing = [key for key in POSITION_METADATA if key not in props]
        raise ModelError(
            f"{path}: per-position metadata is incomplete: has {', '.join(present)}, lacks {', '.join(missing)}"
        )
    try:
        rows, cols = (int(part) for part in props["positions"].lower().split("x"))
        grid = FeatureGrid(
            rows,
            cols,
            int(props["position_channels"]),
            int(props["position_stride"]),
            int(props.get(POSITION_OFFSET, "0")),
        )
    except (ValueError, Exception) as exc:  # "7x" or "ax3" (ValueError), sizes below 1 (DataError)
        raise ModelError(
            f"{path}: invalid per-position metadata (positions {props['positions']!r}, "
            f"position_channels {props['position_channels']!r}, position_stride "
            f"{props['position_stride']!r}, {POSITION_OFFSET} {props.get(POSITION_OFFSET)!r}): {exc}"
        ) from exc
    if grid.size != embedding_dim:
        raise ModelError(
            f"{path}: per-position metadata {grid.rows}x{grid.cols} positions x {grid.channels} "
            f"channels = {grid.size} values, but embedding_dim is {embedding_dim}"
        )
    return grid


def build_session(model: Path | bytes, threads: int = 1, spinning: bool = False):
    """The one place an onnxruntime session is built (station, bench, export gate).

    Latency-tuned for a small CPU: a 100k-parameter trunk gains nothing from
    a thread pool, and spinning threads steal the capture loop's core.
    """
    import onnxruntime as ort

    # A line PC must not phone home; under the systemd sandbox the attempt also fails noisily.
    ort.disable_telemetry_events()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


class Embedder:
    """Loads a self-describing ONNX trunk and turns images into embeddings."""

    def __init__(self, model_path: Path, threads: int = 1, spinning: bool = False, expected_sha256: str | None = None):
        model_path = Path(model_path)
        model_bytes = read_bytes(model_path, ModelError, MAX_MODEL_BYTES, "ONNX model")
        sha256 = hashlib.sha256(model_bytes).hexdigest()
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise ModelError(f"{model_path}: sha256 {sha256[:12]} is not the expected {expected_sha256[:12]}")
        try:
            # From the bytes already hashed: the file could change between hash and load.
            self.session = build_session(model_bytes, threads, spinning)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelError(f"{model_path}: onnxruntime cannot load the model: {exc}") from exc
        self.info = _parse_metadata(model_path, sha256, dict(self.session.get_modelmeta().custom_metadata_map))
        self._check_signature()
        self._output_names = [OUTPUT_NAME]
        # A dynamic int8 model not exported per part (before batch_independent
        # existed) would let batch neighbours move a part's embedding.
        self._per_part = self.info.quantization == "int8-dynamic" and self.info.extra.get("batch_independent") != "true"

    def _check_signature(self):
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise ModelError(
                f"{self.info.path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                f"found {sorted(inputs)} -> {sorted(outputs)}"
            )
        declared = inputs[INPUT_NAME].shape[1:]
        if [d for d in declared if isinstance(d, int)] != [d for d in self.info.input_spec.sample_shape]:
            raise ModelError(
                f"{self.info.path}: input shape {inputs[INPUT_NAME].shape} does not match its metadata "
                f"{self.info.input_spec.sample_shape}"
            )
        if outputs[OUTPUT_NAME].shape[1:] != [self.info.embedding_dim]:
            raise ModelError(
                f"{self.info.path}: output shape {outputs[OUTPUT_NAME].shape} does not match its metadata "
                f"embedding_dim {self.info.embedding_dim}"
            )

    @property
    def input_spec(self) -> InputSpec:
        return self.info.input_spec

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed float32 batch -> (n, embedding_dim) float32 embeddings.

        Dynamic int8 models quantize activations with a scale taken from the
        whole input tensor. `station export` gives each part its own scale
        inside the graph (export/per_row.py; before it, a Scan ran the graph
        once per part); older ones are run here one part per call. Either way a part gets the same embedding at
        calibration, evaluation and in the daemon, whatever its neighbours.
        """
        if len(batch) == 0:  # onnxruntime's Scan refuses an empty batch
            return np.empty((0, self.info.embedding_dim), np.float32)
        if not self._per_part or len(batch) == 1:
            return self.session.run(self._output_names, {INPUT_NAME: batch})[0]
        return np.concatenate(
            [self.session.run(self._output_names, {INPUT_NAME: batch[i : i + 1]})[0] for i in range(len(batch))]
        )

    def warm_up(self, runs: int = 3):
        """First runs allocate; do them before the station says READY."""
        dummy = np.zeros((1,) + self.input_spec.sample_shape, np.float32)
        for _ in range(runs):
            self.embed(dummy)


def same_input(embedders: dict, paths):
    """Every form must see the same crop: frame sizes, regions and calibration are checked against one input."""
    specs = {form: embedder.input_spec for form, embedder in embedders.items()}
    if len(set(specs.values())) > 1:
        said = "; ".join(f"{paths[form]}: {spec.width}x{spec.height} {spec.layout}" for form, spec in specs.items())
        raise ModelError(f"the model's forms take different inputs ({said}): they must be forms of one model")
