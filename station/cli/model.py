"""The model-side subcommands (calibrate, evaluate, train, fit, export): handlers `station/cli/__init__.py`
dispatches to. Heavy modules are imported inside them, so `station --help` stays fast."""

from __future__ import annotations

import sys
from pathlib import Path

from station.core.errors import ConfigError, StationError


def _load_embedder(model_path: Path, threads: int = 1):
    from station.core.embedder import Embedder

    return Embedder(model_path, threads=threads)


def _calibration_limits(args) -> dict:
    """--target-false-reject and --min-good, calibration's defaults where not given."""
    from calibration.thresholds import DEFAULT_TARGET_FALSE_REJECT, MIN_GOOD_PARTS_CALIBRATE

    return {
        "target_false_reject": DEFAULT_TARGET_FALSE_REJECT
        if args.target_false_reject is None
        else args.target_false_reject,
        "min_good": MIN_GOOD_PARTS_CALIBRATE if args.min_good is None else args.min_good,
    }


def calibrate(args) -> int:
    from calibration import workflow
    from station.core import reference_set
    from station.core.errors import ConfigError

    if args.config is not None:
        folder_mode = [
            flag
            for flag, value in (
                ("--model", args.model),
                ("--good", args.good),
                ("--defects", args.defects),
                ("--out", args.out),
                ("--tiles", args.tiles),
            )
            if value
        ]
        if folder_mode:
            raise ConfigError(
                f"-c/--config calibrates from the configured camera; {', '.join(folder_mode)} "
                "belong to the folder mode (--model, --good, --out): use one or the other"
            )
        return _calibrate_camera(args)
    if args.count is not None or args.min_change is not None or args.roi is not None:
        raise ConfigError("--count and --min-change need -c/--config (calibration from the camera), as does --roi")
    if args.out is None:
        raise ConfigError("calibrate needs --out (folder mode) or -c/--config (camera mode)")
    if args.rollback is not None:
        version = reference_set.rollback(args.out, args.rollback or None)
        print(f"{args.out}: v{version:04d} is current again")
        return 0
    if args.model is None or args.good is None:
        raise StationError("calibrate needs --model and --good (or --rollback)")
    product = args.product or args.out.name
    embedder = _load_embedder(args.model)
    saved, calibration = workflow.calibrate_folders(
        embedder,
        args.good,
        args.defects,
        args.out,
        product,
        metric=args.metric,
        progress=sys.stderr.isatty(),
        **_calibration_limits(args),
        tiles=_tiles_option(args.tiles, args.good, args.defects) if args.tiles else None,
    )
    _print_calibration(saved, calibration, calibration.warnings)
    return 0


def _tiles_option(text: str, good: Path, defects: list[Path]):
    """--tiles W,H[,SX,SY] over the region every photo holds from its top-left corner (each photo is its part)."""
    from calibration.workflow import common_size
    from station.core.errors import DataError
    from station.core.imagefolder import list_images
    from station.core.tiles import TileGeometry

    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 4):
        raise ConfigError(f"--tiles {text!r}: give WIDTH,HEIGHT or WIDTH,HEIGHT,STRIDE_X,STRIDE_Y in pixels")
    width, height = values[:2]
    stride_x, stride_y = values[2:] or (-(-width // 2), -(-height // 2))
    photos = list_images(good)
    if not photos:
        raise DataError(f"{good}: no images of good parts")
    region_width, region_height = common_size(photos + [p for folder in defects for p in list_images(folder)])
    try:
        return TileGeometry(width, height, stride_x, stride_y, region_width, region_height)
    except DataError as exc:
        raise ConfigError(f"--tiles {text} over the {region_width}x{region_height} photos: {exc}") from None


def _calibrate_camera(args) -> int:
    from calibration import live
    from calibration.thresholds import DEFAULT_CAMERA_COUNT
    from station.core import reference_set
    from station.runtime.config.station import load_config
    from station.runtime.config.credentials import camera_credentials

    config = load_config(args.config)
    if args.rollback is not None:  # every form's reference set of the product, as calibration made them together
        for form in config.model_paths:
            product, root = live.product_reference(config.for_form(form), args.product)
            version = reference_set.rollback(root, args.rollback or None)
            print(f"{root}: product {product}{f' ({form})' if form else ''}, v{version:04d} is current again")
        return 0
    result = live.calibrate_from_camera(
        config,
        args.product,
        count=DEFAULT_CAMERA_COUNT if args.count is None else args.count,
        min_change=live.DEFAULT_MIN_CHANGE if args.min_change is None else args.min_change,
        metric=args.metric,
        progress=sys.stderr.isatty(),
        credentials=camera_credentials(config.camera),
        region=args.roi,
        **_calibration_limits(args),
    )
    grabbed = result.grabbed
    print(f"{len(grabbed)} distinct parts from {grabbed.frames_seen} frames ({grabbed.skipped} unchanged skipped)")
    for index, (form, (saved, calibration)) in enumerate(result.forms.items()):
        if form:
            print(f"model form {form}:")
        _print_calibration(saved, calibration, result.warnings if index == 0 else [])
    return 0


def _print_calibration(saved, calibration, warnings) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"{saved.path}: product {saved.product}, {saved.n_good} good parts, metric {saved.metric}, "
        f"threshold {saved.threshold:.6g}"
    )
    for name, metric_fit in calibration.fits.items():
        line = f"  {name:12s} threshold {metric_fit.threshold:10.5g}  false-reject (out of fold) {metric_fit.false_reject_rate:.3%}"
        if metric_fit.auroc is not None:
            line += f"  AUROC {metric_fit.auroc:.4f}  escape rate {metric_fit.escape_rate:.3%}"
        print(line + ("   <- chosen" if name == saved.metric else ""))


def evaluate(args) -> int:
    import json

    from calibration import workflow
    from station.core import reference_set

    if args.report:  # before anything is embedded: a folder that cannot be written is said at once
        _writable_folder(args.report, "--report")
    embedder = _load_embedder(args.model)
    evaluation, embedded = workflow.evaluate_folder(
        embedder, reference_set.load(args.reference), args.data, progress=sys.stderr.isatty() and not args.json
    )
    figures = evaluation.figures()
    if args.report:
        for name, content in workflow.evaluation_report(evaluation, embedded).items():
            _write(args.report / name, content, "--report")
    if args.json:
        print(json.dumps(figures))
        return 0
    print(
        f"{figures['n_good']} good, {figures['n_defect']} defective parts; metric {figures['metric']}, "
        f"threshold {figures['threshold']:.6g}"
    )
    for key in ("auroc", "accuracy", "false_reject_rate", "escape_rate"):
        value = figures[key]
        print(f"  {key:18s} {'n/a' if value is None else f'{value:.4f}'}")
    print("  confusion          " + ", ".join(f"{k} {v}" for k, v in figures["confusion"].items()))
    print(
        "  AUROC per metric   "
        + ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in figures["per_metric_auroc"].items())
    )
    if args.report:
        print(f"  report             {args.report}/ (histogram.png, roc.png, worst_parts.png)")
    return 0


def _writable_folder(folder: Path, flag: str):
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{flag} {folder}: cannot make that folder ({exc.strerror or exc}); give one you can write"
        ) from exc


def _writable_file(path: Path, flag: str):
    """The file a command writes after minutes of work: said now if it cannot be written, not after."""
    import tempfile

    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name in it")
    _writable_folder(path.parent, flag)
    try:
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as exc:
        raise ConfigError(
            f"{flag} {path}: cannot write in {path.parent} ({exc.strerror or exc}); give a folder you can write"
        ) from exc


def _write(path: Path, content: bytes, flag: str):
    try:
        path.write_bytes(content)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot write {path} ({exc.strerror or exc}); give a folder you can write") from exc


def _require_torch(command: str):
    """train/export need the engineering extra; the line PC never has torch."""
    from station.core.errors import MissingExtraError

    try:
        import torch  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(f"`station {command}` needs torch and onnx: pip install '.[train]'") from exc


def train(args) -> int:
    _require_torch("train")
    _writable_file(args.out, "--out")
    from export import train

    config = train.TrainConfig(
        arch=args.arch or train.DEFAULT_ARCH,
        loss=args.loss or train.DEFAULT_LOSS,
        epochs=args.epochs,
        seed=args.seed if args.seed is not None else train.DEFAULT_SEED,
        embedding_dim=args.embedding_dim or train.DEFAULT_EMBEDDING_DIM,
        allow_flips=args.allow_flips,
        input_size=args.input_size,
        members=args.members if args.members is not None else train.default_members(args.arch or train.DEFAULT_ARCH),
    )
    print(
        f"training {config.arch} trunk{'s' if config.members > 1 else ''} (x{config.members}), {config.loss} loss, {config.epochs} epochs, seed {config.seed}, "
        f"{config.embedding_dim}-d embedding on {args.data}"
    )
    result = train.train(args.data, args.out, config, progress=sys.stderr.isatty())
    print(
        f"{result.n_train} training / {result.n_val} validation images, {result.parameters} parameters, "
        f"{result.train_seconds:.1f} s"
    )
    print(f"validation pair accuracy {result.val_pair_accuracy:.4f} (distance threshold {result.pair_threshold:.4f})")
    print(f"wrote {result.checkpoint}")
    return 0


def fit(args) -> int:
    _require_torch("fit")
    from fit.pipeline import FitOptions, run_fit

    given = {
        "seed": args.seed,
        "budget_minutes": args.budget,
        "epochs": args.epochs,
        "max_candidates": args.max_candidates,
        "defect_rate": args.defect_rate,
        "escape_cost": args.escape_cost,
        "target_false_reject": args.target_false_reject,
        "product": args.product,
        "members": args.members,
        "max_ms_per_part": args.max_ms_per_part,
    }
    run_fit(
        FitOptions(
            data=args.data,
            out=args.out,
            progress=sys.stderr.isatty(),
            **{key: value for key, value in given.items() if value is not None},
        )
    )
    return 0


def export(args) -> int:
    _require_torch("export")
    _writable_file(args.out, "--out")
    from export import onnx_export

    options = onnx_export.ExportOptions(
        fp32=args.fp32,
        int8=args.int8 or onnx_export.DEFAULT_INT8,
        calib_data=args.calib_data,
        reduce_range=onnx_export.DEFAULT_REDUCE_RANGE if args.reduce_range is None else args.reduce_range,
    )
    checkpoint = args.checkpoint
    if checkpoint.suffix == ".keras":  # the source study's Keras 3 model, imported as the mlp trunk
        import tempfile

        from export.keras_import import keras_checkpoint

        imported = Path(tempfile.mkdtemp(prefix="station-keras-")) / "trunk.pt"
        checkpoint = keras_checkpoint(args.checkpoint, imported, args.calib_data)
        print(f"imported {args.checkpoint} as an mlp trunk (Dense 936-512-256-128)")
    report = onnx_export.export_model(checkpoint, args.out, options)
    for line in onnx_export.summary_lines(report):
        print(line)
    print(f"wrote {args.out} and {onnx_export.report_path(args.out)}")
    return 0
