"""`station export`: checkpoint -> self-describing ONNX (int8 by default), gated.

    torch trunk --torch.onnx.export--> fp32.onnx --quant_pre_process-->
    --quantize_dynamic + per-part scales | quantize_static (QDQ)--> int8.onnx --metadata--> gate --> --out

Everything is built in a temporary folder beside --out and moved into place
only after the gate passes, so a drifting model never reaches a station.
The figures go to <model>.export.json beside the model, pass or fail.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime import quantization as q
from onnxruntime.quantization.shape_inference import quant_pre_process

from station.core.version import __version__
from station.core.embedder import INPUT_NAME, OUTPUT_NAME, Embedder, build_session
from station.core.errors import DataError, ExportGateError
from station.core.imagefolder import scan_dataset
from station.core.preprocess import InputSpec
from export.dataset import CropSet, load_crops, model_batch
from export.gate import (  # noqa: F401  (limits re-exported: callers read them here)
    BAND_CONFIDENCE,
    MAX_AUROC_LOSS,
    MAX_TORCH_ONNX_DIFF,
    MIN_MEAN_COSINE,
    MIN_RANK_CORRELATION,
    MIN_VERDICT_AGREEMENT,
    REFERENCE_P,
    REFERENCE_QUANTILE,
    gate_failures,
    int8_figures,
)
from export.per_row import per_row_dynamic
from export.trunk import PRETRAINED_ARCHS, fold_batchnorm, load_checkpoint

OPSET = 17  # fixed: the version onnxruntime.quantization handles for these ops
INT8_MODES = ("dynamic", "static")
# Measured on the tile-trained trunks (README, "Model side"; 2-core AVX2 CPU,
# batch 1): dynamic passes the gate for mlp and cnn and is as fast as static
# or faster; static QDQ is smaller for the cnn (30 % against 43 %) but slower
# than float there (quantize/dequantize around tiny convs).
DEFAULT_INT8 = "dynamic"
STATIC_OP_TYPES = ["Conv", "Gemm", "MatMul", "Relu", "MaxPool"]
STATIC_ACTIVATION_TYPE = q.QuantType.QUInt8  # onnxruntime's fast x86 path
# Per-channel weight scales: one outlier channel no longer flattens the rest.
PER_CHANNEL = True
# Unsigned 8-bit weights. onnxruntime's u8 x s8 kernels on x86 CPUs without
# VNNI (AVX2 only, like the test machine and many line PCs) add pairs of
# products in int16 and saturate: full-range s8 weights took the mlp's cosine
# to 0.37, 7-bit s8 (reduce_range) still flipped 0.6 % of the verdicts of a
# simulated-line mlp (gate: 99.5 %). u8 x u8 kernels widen to int16 before
# multiplying and do not saturate: full 8 bits, 99.7 % there, mean cosine
# 0.99999 on tiles, for ~7 % of the int8 speed (42 against 39 us).
WEIGHT_TYPE = q.QuantType.QUInt8
# 7-bit weights: only needed with signed weights on CPUs without VNNI.
DEFAULT_REDUCE_RANGE = False
# Sample sizes and timing.
MAX_GATE_IMAGES = 1000
MAX_CALIB_IMAGES = 300
CALIB_BATCH = 32
LATENCY_WARMUP = 20
LATENCY_RUNS = 500


@dataclass(frozen=True)
class ExportOptions:
    fp32: bool = False
    int8: str = DEFAULT_INT8
    calib_data: Path | None = None
    reduce_range: bool = DEFAULT_REDUCE_RANGE


def report_path(model_path: Path) -> Path:
    """model.onnx -> model.export.json"""
    return model_path.with_name(model_path.stem + ".export.json")


def lasting_path(path, report_dir: Path) -> str | None:
    """A path the report may name: None for a temporary one (under the system's temp folder, or a
    hidden working folder such as `station fit`'s .fit-*, gone once the command ends); relative to
    the report's folder when inside it, so a moved bundle stays right."""
    if not path:
        return None
    path, report_dir = Path(path).absolute(), Path(report_dir).absolute()
    temporary = Path(tempfile.gettempdir()).absolute()
    if path.is_relative_to(temporary) or any(part.startswith(".") for part in path.parts if part not in (".", "..")):
        return None
    return str(path.relative_to(report_dir)) if path.is_relative_to(report_dir) else str(path)


# ---- sample crops ------------------------------------------------------------------------


def sample_data_dir(info: dict, options: ExportOptions) -> Path | None:
    """--calib-data, else the checkpoint's training data if it still exists."""
    if options.calib_data is not None:
        return Path(options.calib_data)
    stored = Path(info.get("data_path", ""))
    return stored if info.get("data_path") and stored.is_dir() else None


def load_sample(data_dir: Path, spec: InputSpec) -> CropSet:
    """Up to MAX_GATE_IMAGES crops, spread over the sorted list (deterministic)."""
    items = scan_dataset(data_dir)
    if len(items) > MAX_GATE_IMAGES:
        keep = np.random.default_rng(0).choice(len(items), MAX_GATE_IMAGES, replace=False)
        items = [items[i] for i in sorted(keep)]
    return load_crops(items, spec)


def noise_sample(spec: InputSpec, count: int = 64) -> CropSet:
    """Without data, an fp32 export is still compared with torch on noise crops."""
    crops = np.random.default_rng(0).integers(0, 256, (count, spec.height, spec.width), dtype=np.uint8)
    return CropSet(crops, np.array(["unknown"] * count), [])


# ---- build -------------------------------------------------------------------------------


def export_fp32(model: torch.nn.Module, spec: InputSpec, path: Path):
    """torch -> ONNX with a dynamic batch axis, input "input", output "embedding".

    BatchNorm is folded first; the gate then compares the unfolded torch
    trunk with this graph, so the fold is checked on every export.
    """
    dummy = torch.zeros((1,) + spec.sample_shape, dtype=torch.float32)
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated but gives a
        # plain, fixed-opset graph the quantizers handle; torch is pinned.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fold_batchnorm(model),
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )


class _GoodCropReader(q.CalibrationDataReader):
    """Feeds good crops to quantize_static's MinMax calibration."""

    def __init__(self, batch: np.ndarray):
        self._batches = iter([batch[i : i + CALIB_BATCH] for i in range(0, len(batch), CALIB_BATCH)])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize(fp32_path: Path, int8_path: Path, mode: str, calib_batch: np.ndarray | None, reduce_range: bool):
    prepared = fp32_path.with_name("prepared.onnx")
    # onnxruntime's quantizers log every tensor at INFO on the root logger, and static QDQ of a conv
    # backbone one "bias exceeds int32" WARNING per folded conv (tens on a lite0, on `station fit`'s
    # screen): the gate measures what the quantization did, and says it.
    logging.disable(logging.WARNING)
    try:
        # Shape inference and graph fusions first, as onnxruntime recommends.
        quant_pre_process(str(fp32_path), str(prepared))
        _run_quantizer(prepared, int8_path, mode, calib_batch, reduce_range)
        if mode == "dynamic":  # one activation scale per part: batch-independent, batched (export/per_row.py)
            per_row_dynamic(int8_path)
    finally:
        logging.disable(logging.NOTSET)


def _run_quantizer(prepared: Path, int8_path: Path, mode: str, calib_batch, reduce_range: bool):
    if mode == "dynamic":
        # Only the matrix products: dynamic ConvInteger ran 6x slower than
        # float Conv here, and the linear layers hold most of the weights.
        q.quantize_dynamic(
            str(prepared),
            str(int8_path),
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=PER_CHANNEL,
            weight_type=WEIGHT_TYPE,
            reduce_range=reduce_range,
        )
    else:
        q.quantize_static(
            str(prepared),
            str(int8_path),
            _GoodCropReader(calib_batch),
            quant_format=q.QuantFormat.QDQ,
            # The layers with weights and what passes between them; the
            # standardization and unit-length nodes stay float (onnxruntime
            # 1.31's QDQ quantizer also fails on a weightless LayerNormalization).
            op_types_to_quantize=STATIC_OP_TYPES,
            per_channel=PER_CHANNEL,
            activation_type=STATIC_ACTIVATION_TYPE,
            weight_type=WEIGHT_TYPE,
            reduce_range=reduce_range,
            calibrate_method=q.CalibrationMethod.MinMax,
            # The embedding itself stays float: good parts differ from each other
            # by less than one int8 step of the whole embedding range.
            extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]},
        )


def write_metadata(path: Path, props: dict[str, str]):
    """Set metadata_props in place; done LAST, quantizers do not keep them."""
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.save(model, str(path))


def model_metadata(info: dict, spec: InputSpec, quantization: str) -> dict[str, str]:
    return {
        "input_width": str(spec.width),
        "input_height": str(spec.height),
        "input_layout": spec.layout,
        "pixel_scale": repr(float(spec.pixel_scale)),
        "embedding_dim": str(info["embedding_dim"]),
        "arch": info["arch"],
        "members": str(info.get("members", 1)),  # trunks of an ensemble (export/trunk.py: Ensemble)
        "quantization": quantization,
        # fp32 and static int8 are by nature; dynamic int8 through per_row_dynamic.
        "batch_independent": "true",
        "data_fingerprint": info.get("data_fingerprint", ""),
        "trained_on": ",".join(info.get("trained_on", [])),  # image digests; calibration sets them aside
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "station_version": __version__,
        "backbone": (
            backbone_description(fine_tuned=info["arch"] == "lite0ft")
            if info["arch"] in PRETRAINED_ARCHS
            else "none (trained from scratch)"
        ),
    }


def backbone_description(fine_tuned: bool = False) -> str:
    """Where a pretrained trunk's weights came from: the pinned package and the file's digest."""
    from export.backbone import WEIGHTS_LICENCE, WEIGHTS_PACKAGE, WEIGHTS_SHA256, WEIGHTS_VERSION

    how = "the stage from stride 8 to 16 fine-tuned on these parts" if fine_tuned else "frozen"
    return (
        f"efficientnet-lite0 ({WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}, sha256 {WEIGHTS_SHA256[:16]}, "
        f"{WEIGHTS_LICENCE}), ImageNet weights, {how}"
    )


# ---- gate --------------------------------------------------------------------------------


def run_onnx(path: Path, batch: np.ndarray) -> np.ndarray:
    """Embeddings exactly as the station computes them (the Embedder's batching rules)."""
    return Embedder(path).embed(batch)


def torch_onnx_figures(expected: np.ndarray, got: np.ndarray, relative: bool = False) -> dict:
    """How far the fp32 graph is from torch, for the gate (export/gate.py: gate_failures).

    A trunk's embedding has values of order 1 (unit length), and the gate's limit, 1e-4, is absolute.
    A map output (a per-position model, export/positions.py) is the raw feature map, with values up
    to ~40: float32 rounding grows with the values it rounds (an ulp at 32 is 3.8e-6, and a deep
    convolution stack with BatchNorm folded into it, summed in another order by onnxruntime's
    kernels, differs from torch by a few ulps of the largest activations: 2.2e-4 measured on the
    tiles at 224x224, stride 8, that is 5e-6 of the map's scale). An absolute 1e-4 would refuse a
    correct graph for the size of its numbers, so with `relative` the limit is scaled by the output's
    largest magnitude (at least 1: an output of order 1 keeps the absolute limit).
    """
    diff = float(np.max(np.abs(np.asarray(expected, np.float64) - got))) if len(got) else 0.0
    figures = {"torch_vs_fp32_max_abs_diff": diff}
    if relative:
        figures["torch_vs_fp32_scale"] = max(1.0, float(np.max(np.abs(expected))) if len(got) else 1.0)
    return figures


def batch1_latency_ms(paths: list[Path], sample: np.ndarray) -> list[float]:
    """Median batch-1 latency of each model, one thread, as the station runs it.

    The models take turns run by run, so a busy machine slows all of them
    alike and the ratio stays fair.
    """
    sessions = [build_session(path) for path in paths]
    feed = {INPUT_NAME: sample[:1]}
    for session in sessions:
        for _ in range(LATENCY_WARMUP):
            session.run([OUTPUT_NAME], feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(LATENCY_RUNS):
        for session, runs in zip(sessions, times):
            start = time.perf_counter()
            session.run([OUTPUT_NAME], feed)
            runs.append(time.perf_counter() - start)
    return [statistics.median(runs) * 1e3 for runs in times]


# ---- the command -------------------------------------------------------------------------


def export_model(checkpoint: Path, out: Path, options: ExportOptions = ExportOptions()) -> dict:
    """Export, quantize, describe, gate, move into place; returns the report."""
    model, info = load_checkpoint(checkpoint)
    if options.int8 not in INT8_MODES:
        raise DataError(f"unknown int8 mode {options.int8!r}: choose one of {', '.join(INT8_MODES)}")
    spec = InputSpec(**info["input_spec"])
    data_dir = sample_data_dir(info, options)
    if data_dir is None and not options.fp32:
        raise DataError(
            f"int8 calibration needs good crops: the checkpoint's data folder {info.get('data_path')!r} "
            "no longer exists; pass --calib-data DIR (an image folder with good/), or --fp32"
        )
    sample = load_sample(data_dir, spec) if data_dir is not None else noise_sample(spec)
    batch = model_batch(sample.crops, spec)
    is_good = sample.classes == "good"
    quantization = "fp32" if options.fp32 else f"int8-{options.int8}"

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fp32_path = workdir / "fp32.onnx"
        export_fp32(model, spec, fp32_path)
        final_path = fp32_path
        if not options.fp32:
            final_path = workdir / "int8.onnx"
            calib = batch[is_good][:MAX_CALIB_IMAGES]
            quantize(fp32_path, final_path, options.int8, calib, options.reduce_range)
            write_metadata(fp32_path, model_metadata(info, spec, "fp32"))
        write_metadata(final_path, model_metadata(info, spec, quantization))
        report = measure(model, fp32_path, final_path, batch, is_good, options, info, data_dir, quantization)
        report["checkpoint"]["data_path"] = lasting_path(info.get("data_path"), out.parent)
        report["sample"]["data"] = lasting_path(data_dir, out.parent) if data_dir else "noise (no data folder)"
        failures = gate_failures(report["gate"])
        report["passed"] = not failures
        report["failures"] = failures
        report_file = report_path(out)
        report_file.write_text(json.dumps(report, indent=2) + "\n")
        if failures:
            raise ExportGateError(
                f"{checkpoint}: export refused, nothing written to {out}: "
                + "; ".join(failures)
                + f" (figures in {report_file}; try the other --int8 mode, or --fp32)"
            )
        os.replace(final_path, out)
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(model, fp32_path, final_path, batch, is_good, options, info, data_dir, quantization) -> dict:
    with torch.no_grad():
        torch_emb = model(torch.from_numpy(batch)).numpy()
    fp32_emb = run_onnx(fp32_path, batch)
    # Through the station's own loader: proves metadata and signature before shipping.
    final_emb = Embedder(final_path).embed(batch)
    gate = {
        **torch_onnx_figures(torch_emb, fp32_emb),
        "int8": None if options.fp32 else int8_figures(fp32_emb, final_emb, is_good),
    }
    fp32_size = fp32_path.stat().st_size
    sizes = {"fp32_bytes": fp32_size}
    latency = {"runs": LATENCY_RUNS, "threads": 1}
    if options.fp32:
        (latency["fp32_batch1_ms"],) = batch1_latency_ms([fp32_path], batch)
    else:
        int8_size = final_path.stat().st_size
        fp32_ms, int8_ms = batch1_latency_ms([fp32_path, final_path], batch)
        sizes.update(int8_bytes=int8_size, int8_to_fp32=int8_size / fp32_size)
        latency.update(fp32_batch1_ms=fp32_ms, int8_batch1_ms=int8_ms, speedup=fp32_ms / int8_ms)
    return {
        "quantization": quantization,
        "reduce_range": options.reduce_range,
        "metadata": dict(Embedder(final_path).session.get_modelmeta().custom_metadata_map),
        "checkpoint": {k: v for k, v in info.items() if not isinstance(v, dict)},
        "sample": {
            "data": str(data_dir) if data_dir else "noise (no data folder)",
            "images": int(len(batch)),
            "good": int(is_good.sum()),
            "defect": int((~is_good).sum()),
            "calibration_good_crops": 0
            if options.fp32 or options.int8 == "dynamic"
            else int(min(is_good.sum(), MAX_CALIB_IMAGES)),
        },
        "gate": gate,
        "limits": {
            "max_torch_vs_fp32_abs_diff": MAX_TORCH_ONNX_DIFF,
            "min_mean_cosine": MIN_MEAN_COSINE,
            "min_verdict_agreement": MIN_VERDICT_AGREEMENT,
            "verdicts_counted": f"outside the float model's {BAND_CONFIDENCE:.0%} band around the threshold",
            "min_rank_correlation": MIN_RANK_CORRELATION,
            "max_auroc_loss": MAX_AUROC_LOSS,
            "reference": f"minkowski p={REFERENCE_P} to mean good embedding, threshold q{REFERENCE_QUANTILE}",
        },
        "size": sizes,
        "latency": latency,
    }


def summary_lines(report: dict) -> list[str]:
    gate, size, latency = report["gate"], report["size"], report["latency"]
    lines = [
        f"quantization {report['quantization']}, sample {report['sample']['images']} crops "
        f"({report['sample']['good']} good) from {report['sample']['data'] or 'a temporary folder'}",
        f"torch vs fp32 ONNX max |diff| {gate['torch_vs_fp32_max_abs_diff']:.2e}",
    ]
    if gate["int8"] is not None:
        int8 = gate["int8"]
        lines += [
            f"int8 vs fp32 cosine mean {int8['cosine_mean']:.6f} min {int8['cosine_min']:.6f}, "
            f"verdict agreement {int8['verdict_agreement']:.2%} of {int8['resolved_parts']} parts clear of the "
            f"threshold ({int8['verdicts_changed_in_band']} flips beside it), Spearman {int8['rank_correlation']:.4f}",
            f"size fp32 {size['fp32_bytes'] / 1024:.0f} KiB, int8 {size['int8_bytes'] / 1024:.0f} KiB "
            f"({size['int8_to_fp32']:.0%})",
            f"batch-1 latency fp32 {latency['fp32_batch1_ms']:.3f} ms, int8 {latency['int8_batch1_ms']:.3f} ms "
            f"(x{latency['speedup']:.2f})",
        ]
    else:
        lines.append(f"size {size['fp32_bytes'] / 1024:.0f} KiB, batch-1 latency {latency['fp32_batch1_ms']:.3f} ms")
    return lines
