"""A frozen per-position model: the pretrained backbone's feature map as the embedding (issue 27).

    PretrainedFeatures(cut, head="map") --[fixed channel subset]--> (n, C, h, w) --> (n, h*w*C) "embedding"

Nothing is trained: the ImageNet weights of export/backbone.py, cut at stride 8 or 16. The output
is the map row-major, positions then channels, and the model's metadata says so (`positions`
"ROWSxCOLS", `position_channels`, `position_stride`: station/core/embedder.py), so calibration
fits one Gaussian per position (calibration/positions.py: calibrate_positions, a format-3 reference set)
and the verdict names the worst position's box in frame pixels.

A per-position covariance costs C x C per position to store and to score; `channels` keeps a fixed
random subset of the cut's channels (PaDiM's reduction, Defard et al. 2020: a random subset does as
well as PCA there), sorted, drawn from `seed`, inside the graph. Measured in docs/calibration.md.

Exported through export/onnx_export.py (export_fp32, write_metadata, batch1_latency_ms) and checked
against torch with the scale-relative limit of export/gate.py (the raw map reaches ~40).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.backbone import CUT_CHANNELS, CUTS, WEIGHTS_PACKAGE, WEIGHTS_SHA256, WEIGHTS_VERSION, PretrainedFeatures
from export.gate import gate_failures
from export.onnx_export import (
    batch1_latency_ms,
    export_fp32,
    load_sample,
    model_metadata,
    noise_sample,
    report_path,
    torch_onnx_figures,
    write_metadata,
)
from export.dataset import model_batch
from station.core.embedder import Embedder
from station.core.errors import DataError, ExportGateError
from station.core.preprocess import InputSpec

ARCH = "lite0-positions"


def channel_subset(cut: int, channels: int | None, seed: int = 0) -> list[int] | None:
    """The kept channels of the cut (sorted), or None for all of them."""
    total = CUT_CHANNELS[cut]
    if channels is None or channels >= total:
        return None
    if channels < 1:
        raise DataError(f"channels must be at least 1, not {channels}")
    return sorted(np.random.default_rng(seed).choice(total, channels, replace=False).tolist())


class PositionMap(nn.Module):
    """Grey (n, 1, H, W) in [0, 1] -> (n, rows*cols*C): the backbone's map, positions then channels."""

    def __init__(self, cut: int = 8, channels: int | None = None, seed: int = 0, norm: str = "lite"):
        super().__init__()
        self.features = PretrainedFeatures(cut=cut, head="map", norm=norm)
        self.cut = cut
        self.kept = channel_subset(cut, channels, seed)
        if self.kept is not None:
            self.register_buffer("keep", torch.tensor(self.kept, dtype=torch.long), persistent=False)
        self.channels = CUT_CHANNELS[cut] if self.kept is None else len(self.kept)
        self.eval()

    def grid(self, height: int, width: int) -> tuple[int, int]:
        _, rows, cols = self.features.feature_shape(height, width)
        return rows, cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.features(x)  # (n, C, h, w)
        if self.kept is not None:
            fmap = torch.index_select(fmap, 1, self.keep)
        return fmap.permute(0, 2, 3, 1).reshape(fmap.shape[0], -1)


def position_offset(cut: int) -> int:
    """Where cell 0's block starts, in model-input pixels: -stride/2, i.e. cell c is centred on pixel c * stride.

    Measured on simulated parts with a 5-pixel blob at 40 random places, the centre found by
    scoring.locate_worst against where the blob is: centred on c * stride, a 1.5-stride box held the
    blob 40, 38, 38 and 39 times in 40 (36x26 and 72x52 inputs, strides 8 and 16); centred on the
    middle of the stride block (offset 0) 25, 18, 24 and 31 times. The best shift differs a little
    by input size and axis (the 'SAME' padding's odd pixel, the receptive field clipped at the
    border), by at most half a stride.
    """
    return -(cut // 2)


def position_metadata(model: PositionMap, spec: InputSpec) -> dict[str, str]:
    """model_metadata plus the per-position keys the station reads (station/core/embedder.py)."""
    rows, cols = model.grid(spec.height, spec.width)
    info = {"embedding_dim": rows * cols * model.channels, "arch": f"{ARCH}-s{model.cut}", "members": 1}
    props = model_metadata(info, spec, "fp32")
    props.update(
        {
            "positions": f"{rows}x{cols}",
            "position_channels": str(model.channels),
            "position_stride": str(model.cut),
            "position_offset": str(position_offset(model.cut)),
            "backbone": f"efficientnet-lite0 ({WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}, sha256 {WEIGHTS_SHA256[:16]}), "
            f"frozen, cut at stride {model.cut}"
            + ("" if model.kept is None else f", channels {','.join(map(str, model.kept))}"),
        }
    )
    return props


def export_position_model(
    cut: int,
    input_size: tuple[int, int],
    out: Path,
    data_dir: Path | None = None,
    channels: int | None = None,
    seed: int = 0,
) -> dict:
    """Export the frozen per-position model for (width, height) model inputs to `out` (fp32 ONNX), gated.

    `data_dir` (an image folder) gives the crops the torch-vs-ONNX check runs on (noise without it);
    `channels` keeps a fixed random subset of the cut's channels (None: all, 40 at stride 8, 112 at 16).
    Written to a temporary file beside `out` and moved into place only when the check passes; the
    figures go to <out stem>.export.json either way. Returns the report.
    """
    if cut not in CUTS:
        raise DataError(f"cut {cut} is not one of the strides {sorted(CUTS)}")
    width, height = input_size
    spec = InputSpec(width=int(width), height=int(height), layout="nchw")
    model = PositionMap(cut, channels, seed)
    sample = load_sample(Path(data_dir), spec) if data_dir is not None else noise_sample(spec)
    batch = model_batch(sample.crops, spec)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        path = workdir / "fp32.onnx"
        export_fp32(model, spec, path)
        props = position_metadata(model, spec)
        write_metadata(path, props)
        with torch.no_grad():
            expected = torch.cat([model(torch.from_numpy(batch[i : i + 64])) for i in range(0, len(batch), 64)]).numpy()
        embedder = Embedder(path)  # the station's own loader: metadata, signature and grid checked
        got = embedder.embed(batch)
        gate = {**torch_onnx_figures(expected, got, relative=True), "int8": None}
        (latency,) = batch1_latency_ms([path], batch)
        grid = embedder.info.positions
        report = {
            "quantization": "fp32",
            "metadata": props,
            "positions": {
                "rows": grid.rows,
                "cols": grid.cols,
                "channels": grid.channels,
                "stride": grid.stride,
                "offset": grid.offset,
            },
            "sample": {"data": str(data_dir) if data_dir else "noise (no data folder)", "images": int(len(batch))},
            "gate": gate,
            "size": {"fp32_bytes": path.stat().st_size},
            "latency": {"fp32_batch1_ms": latency, "threads": 1},
        }
        failures = gate_failures(gate)
        report["passed"], report["failures"] = not failures, failures
        report_path(out).write_text(json.dumps(report, indent=2) + "\n")
        if failures:
            raise ExportGateError(
                f"per-position model (stride {cut}, {width}x{height}): export refused, nothing "
                f"written to {out}: " + "; ".join(failures)
            )
        os.replace(path, out)
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
