"""Import a Keras 3 Siamese model of the source study's shape as the mlp trunk.

The source study's base network is Dense 936 -> 512 (relu) -> 256 (relu) ->
128 (linear) on flattened 26x36 crops scaled to [0, 1], usually wrapped in a
Siamese model with a Lambda distance layer. The .keras archive is read as
data (config.json and model.weights.h5, with json and h5py): Keras itself is
never run, so a Lambda layer in the file, which is code, is never executed.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from station.core.errors import ModelError

# (input, output) of the three Dense layers, and their activations, in order.
DENSE_SHAPES = ((936, 512), (512, 256), (256, 128))
DENSE_ACTIVATIONS = ("relu", "relu", "linear")


def _dense_configs(node) -> list[dict]:
    """Every Dense layer's config in the model config, depth first (nested models included)."""
    found = []
    if isinstance(node, dict):
        if node.get("class_name") == "Dense":
            found.append(node.get("config", {}))
        for value in node.values():
            found += _dense_configs(value)
    elif isinstance(node, list):
        for value in node:
            found += _dense_configs(value)
    return found


def _weight_pairs(weights_h5: bytes) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """{kernel shape: (kernel, bias)} for every layer with a 2-d kernel and a 1-d bias."""
    import h5py

    pairs = {}
    with h5py.File(io.BytesIO(weights_h5), "r") as weights:

        def visit(name, item):
            if isinstance(item, h5py.Group) and name.endswith("/vars") and "0" in item and "1" in item:
                kernel, bias = np.asarray(item["0"]), np.asarray(item["1"])
                if kernel.ndim == 2 and bias.shape == (kernel.shape[1],):
                    pairs.setdefault(tuple(kernel.shape), (kernel, bias))

        weights.visititems(visit)
    return pairs


def read_keras_mlp(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The three (kernel, bias) pairs of the base network, checked against the expected shape."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
            weights = archive.read("model.weights.h5")
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a Keras 3 .keras archive ({exc})") from exc
    dense = _dense_configs(config)
    shape = [(d.get("units"), d.get("activation")) for d in dense]
    expected = [(out, act) for (_, out), act in zip(DENSE_SHAPES, DENSE_ACTIVATIONS)]
    if shape != expected:
        raise ModelError(
            f"{path}: expected the source study's Dense 936-512-256-128 (relu, relu, linear), "
            f"found Dense layers {shape}"
        )
    pairs = _weight_pairs(weights)
    missing = [s for s in DENSE_SHAPES if s not in pairs]
    if missing:
        raise ModelError(f"{path}: no weights of shape {missing} in model.weights.h5")
    return [pairs[s] for s in DENSE_SHAPES]


def keras_checkpoint(path: Path, out: Path, data_path: Path | None = None) -> Path:
    """Write a station trunk checkpoint holding the Keras weights (then `station export` it)."""
    import torch

    from export.trunk import LEGACY_TRUNK_OPTIONS, build_trunk, input_spec_for, save_checkpoint

    layers = read_keras_mlp(path)
    spec = input_spec_for("mlp")
    # The plain MLP: no input standardization, batch norm or L2 normalization, as in Keras.
    model = build_trunk("mlp", DENSE_SHAPES[-1][1], spec, LEGACY_TRUNK_OPTIONS)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for linear, (kernel, bias) in zip(linears, layers):
            linear.weight.copy_(torch.from_numpy(kernel.T.astype(np.float32)))  # Keras: (in, out)
            linear.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    model.eval()
    save_checkpoint(
        out,
        model,
        "mlp",
        DENSE_SHAPES[-1][1],
        spec,
        trunk_options=LEGACY_TRUNK_OPTIONS,
        data_fingerprint="keras:" + hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        data_path=None if data_path is None else str(Path(data_path).resolve()),
        source=str(path),
        loss="imported",
        epochs=0,
        seed=0,
    )
    return Path(out)
