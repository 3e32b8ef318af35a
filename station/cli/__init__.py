"""The `station` command: parses arguments and dispatches, nothing else.

Heavy modules are imported inside the handlers, so `station --help` stays
fast and the runtime never loads torch unless `train` or `export` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from station.core.version import __version__
from station.cli.arguments import completion_script, host_port, positive, seed, verbose_everywhere, width_by_height
from station.core.errors import StationError
from station.runtime.logs import configure_logging
from station.runtime.web.users import ROLES
from station.cli import model, runtime


def build_parser() -> argparse.ArgumentParser:
    from station.core.scoring import POSITION_SCORES, SCORES

    parser = argparse.ArgumentParser(
        prog="station",
        description="Visual inspection station: camera -> roi -> embed -> score -> verdict -> MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"station {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = commands.add_parser("simulate", help="write a simulated inspection line (image folder, optional video)")
    sim.add_argument("--out", type=Path, required=True, help="dataset folder to write (good/ + one folder per defect)")
    sim.add_argument("--count", type=int, default=1000, help="number of parts (default 1000)")
    sim.add_argument("--seed", type=seed, default=0, help="same seed, byte-identical output")
    sim.add_argument("--pins", type=int, choices=(2, 3), default=3, help="pins of the simulated product")
    sim.add_argument(
        "--part",
        choices=("terminal", "plate"),
        default="terminal",
        help="terminal: small 36x26 parts (default); plate: 480x192 photos of a large machined part "
        "with small defects (hairline cracks, pits), for native resolution and tiles",
    )
    sim.add_argument("--video", type=Path, help="also write an MJPG video of full frames (+ ground truth .csv)")
    sim.add_argument(
        "--dwell",
        type=int,
        metavar="FRAMES",
        help="video of a stop-and-go belt: parts slide in, stand FRAMES frames, slide out (trigger: presence); "
        "0: a belt that never stops (presence.judge_on: centred)",
    )
    sim.add_argument(
        "--contact-sheet",
        type=Path,
        metavar="PNG",
        help="also write a picture of six enlarged parts per class (docs/simulated_parts.png)",
    )
    sim.set_defaults(handler=runtime.simulate)
    cal = commands.add_parser(
        "calibrate",
        help="build a product's reference set from known-good parts",
        description="Folder mode: --model, --good [--defects] --out. Camera mode: -c station.yaml "
        "[--product NAME] [--count N]: grabs N distinct parts from the configured camera and "
        "adds a version to that product's reference set.",
    )
    cal.add_argument(
        "-c", "--config", type=Path, help="station.yaml: calibrate from its camera, ROI and model (camera mode)"
    )
    cal.add_argument(
        "--count",
        type=int,
        help="camera mode: distinct parts to grab (default: DEFAULT_CAMERA_COUNT in "
        "calibration/thresholds.py, the fewest that support the default false-reject target)",
    )
    cal.add_argument(
        "--min-change",
        type=float,
        help="camera mode: mean absolute grey-level change that makes a frame a new part (default 5.0)",
    )
    cal.add_argument(
        "--roi", metavar="NAME", help="camera mode: the named region (rois:) to calibrate, for its product"
    )
    cal.add_argument(
        "--tiles",
        metavar="W,H[,SX,SY]",
        help="folder mode: a tiled station's tiles (station.yaml tiles:): each photo, the part's region, "
        "cut into W x H tiles every SX, SY pixels (default half a tile), the threshold per part",
    )
    cal.add_argument("--model", type=Path, help="the station's ONNX model")
    cal.add_argument("--good", type=Path, help="folder of known-good parts (read recursively)")
    cal.add_argument(
        "--defects",
        type=Path,
        action="append",
        default=[],
        help="folder of defective parts (repeatable; subfolders name classes)",
    )
    cal.add_argument("--out", type=Path, help="folder mode: reference set folder (a new version is added)")
    cal.add_argument(
        "--metric",
        choices=("auto", *SCORES, *POSITION_SCORES),
        default="auto",
        help="score used for verdicts; auto = best AUROC on --defects (default auto; a per-position model: position)",
    )
    cal.add_argument(
        "--product", help="product name (default: the --out folder's name; camera mode: the config's product)"
    )
    # The defaults are calibration's (named in calibration/thresholds.py): read by the handler, not here, as
    # `station run` parses these arguments too and must not load calibration.
    cal.add_argument(
        "--target-false-reject",
        type=float,
        help="good parts allowed to be rejected (default: DEFAULT_TARGET_FALSE_REJECT in calibration/thresholds.py)",
    )
    cal.add_argument(
        "--min-good",
        type=int,
        help="refuse with fewer good parts (default: MIN_GOOD_PARTS_CALIBRATE in calibration/thresholds.py)",
    )
    cal.add_argument(
        "--rollback",
        type=int,
        nargs="?",
        const=0,
        default=None,
        metavar="VERSION",
        help="make an earlier version current (default: the one before)",
    )
    cal.set_defaults(handler=model.calibrate)

    ev = commands.add_parser("evaluate", help="quality figures of a model and reference set on labelled parts")
    ev.add_argument("--model", type=Path, required=True)
    ev.add_argument("--reference", type=Path, required=True, help="reference set folder")
    ev.add_argument("--data", type=Path, required=True, help="image folder: good/ + one folder per defect class")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--report", type=Path, help="folder for histogram, ROC and contact-sheet PNGs")
    ev.set_defaults(handler=model.evaluate)

    tr = commands.add_parser("train", help="train a Siamese trunk on an image folder (needs the train extra)")
    tr.add_argument("--data", type=Path, required=True, help="image folder: good/ + one folder per defect class")
    tr.add_argument("--out", type=Path, required=True, help="checkpoint to write (trunk.pt)")
    tr.add_argument(
        "--arch",
        choices=("mlp", "cnn", "lite0"),
        help="trunk: mlp (reference), cnn (default: export/train.py), or lite0 (EfficientNet-Lite0's "
        "ImageNet features, frozen, under a trained head; one member by default)",
    )
    tr.add_argument(
        "--loss",
        choices=("center", "contrastive", "triplet"),
        help="Siamese loss: center (to the mean good embedding), contrastive (pairs), triplet (default: center)",
    )
    tr.add_argument("--epochs", type=int, help="training epochs (default: DEFAULT_EPOCHS in export/train.py)")
    tr.add_argument("--seed", type=seed, help="same seed and data, same weights (default 0)")
    tr.add_argument("--embedding-dim", type=positive, help="embedding size of each trunk (default 128)")
    tr.add_argument(
        "--members", type=int, help="trunks trained from consecutive seeds, exported as one model (default 3; lite0: 1)"
    )
    tr.add_argument(
        "--allow-flips", action="store_true", help="augment with mirrored crops (only if the part is symmetric)"
    )
    tr.add_argument(
        "--input-size",
        type=width_by_height,
        metavar="WxH",
        help="model input in pixels (default 36x26); the station resizes the ROI to it",
    )
    tr.set_defaults(handler=model.train)

    ex = commands.add_parser("export", help="export a trained trunk to a self-describing ONNX model (int8 by default)")
    ex.add_argument("checkpoint", type=Path, help="checkpoint written by `station train`, or a Keras 3 model.keras")
    ex.add_argument(
        "--out", type=Path, required=True, help="ONNX model to write (report: <name>.export.json beside it)"
    )
    ex.add_argument("--fp32", action="store_true", help="keep the float model (no int8 quantization)")
    ex.add_argument(
        "--int8",
        choices=("dynamic", "static"),
        help="int8 quantization (default: DEFAULT_INT8 in export/onnx_export.py)",
    )
    ex.add_argument(
        "--calib-data", type=Path, help="image folder for calibration and the gate (default: the training data)"
    )
    ex.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        help="7-bit int8 weights (default off: the unsigned 8-bit weights used do not saturate)",
    )
    ex.set_defaults(handler=model.export)
    chk = commands.add_parser("check", help="validate a station configuration, its model and reference sets")
    chk.add_argument("-c", "--config", type=Path, required=True, help="station.yaml")
    chk.set_defaults(handler=runtime.check)
    run = commands.add_parser("run", help="run the station: camera -> verdicts over MQTT (the systemd service)")
    run.add_argument("-c", "--config", type=Path, required=True, help="station.yaml")
    run.set_defaults(handler=runtime.run)
    wu = commands.add_parser(
        "web-user", help="a user line for the station's page (web.users_file); password from stdin"
    )
    wu.add_argument("name")
    wu.add_argument("role", choices=ROLES)
    wu.add_argument("--file", type=Path, help="put the line in this users file (replacing the user's old one)")
    wu.set_defaults(handler=runtime.web_user)
    fi = commands.add_parser(
        "fit",
        help="image folder -> bundle: checked data, honest split, trained, exported, calibrated, tested",
        description="Checks the data, splits it train/calibration/test (stratified, near-duplicates kept together), "
        "trains candidate trunks within --budget, chooses on the calibration part, exports (int8, "
        "falling back to static int8 then fp32), calibrates, and reports figures of the test part only.",
    )
    fi.add_argument(
        "--data", type=Path, required=True, help="image folder: good/ + one folder per defect class (optional)"
    )
    fi.add_argument(
        "--out",
        type=Path,
        required=True,
        help="bundle folder to write (model, reference, report, station.yaml, fit.json)",
    )
    fi.add_argument("--seed", type=seed, help="seed of the split (recorded in fit.json; default 0)")
    fi.add_argument(
        "--budget",
        type=float,
        metavar="MINUTES",
        help="minutes for the whole station fit, final models included (default 13)",
    )
    fi.add_argument("--epochs", type=int, help="epochs of every candidate (default: station train's per architecture)")
    fi.add_argument(
        "--max-candidates", type=positive, help="train at most this many candidates (default: as the budget allows)"
    )
    fi.add_argument(
        "--max-ms-per-part",
        type=float,
        metavar="MS",
        help="no candidate whose model costs more per part, measured here with onnxruntime (default 10)",
    )
    fi.add_argument(
        "--members", type=int, help="trunks of the final model, from consecutive seeds (default 3; lite0: 1)"
    )
    fi.add_argument("--defect-rate", type=float, help="share of defective parts on the line (default 0.05)")
    fi.add_argument("--escape-cost", type=float, help="cost of one escape in false rejects (default 20)")
    fi.add_argument(
        "--target-false-reject",
        type=float,
        help="without defects: good parts allowed to be rejected "
        "(default: DEFAULT_TARGET_FALSE_REJECT in calibration/thresholds.py)",
    )
    fi.add_argument("--product", help="product name of the reference set (default: the --out folder's name)")
    fi.set_defaults(handler=model.fit)

    be = commands.add_parser("bench", help="measure per-stage cost, raw onnxruntime, end-to-end verdicts/s, RSS")
    be.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        help="ONNX model; the first is the station's, others are timed raw (default: the bundled demo int8 and fp32)",
    )
    be.add_argument(
        "--reference", type=Path, help="reference set for the first model (default: calibrated on simulated parts)"
    )
    be.add_argument(
        "-c",
        "--config",
        type=Path,
        help="station.yaml: bench its model (the form it would run here first, "
        "others raw) and its product's reference set",
    )
    be.add_argument("--parts", type=int, default=10_000, help="simulated parts for the end-to-end run (default 10000)")
    be.add_argument("--broker", type=host_port, help="HOST:PORT of a broker (default: a mosquitto started on loopback)")
    be.add_argument(
        "--integrations", action="store_true", help="also 3 end-to-end runs each with metrics+snapshot+discovery on/off"
    )
    be.add_argument("--json", action="store_true")
    be.set_defaults(handler=runtime.bench)
    de = commands.add_parser("demo", help="the station on its embedded default: broker, simulated line, dashboard")
    de.add_argument(
        "--frames",
        type=int,
        help="stop after this many verdicts; parts already being judged are still shown (default: run until Ctrl-C)",
    )
    de.add_argument(
        "--broker", type=host_port, help="HOST:PORT of an MQTT broker (default: an embedded one on loopback)"
    )
    de.add_argument("--seed", type=seed, default=0, help="seed of the simulated line")
    de.add_argument("--fps", type=float, default=10.0, help="parts per second on the simulated line (default 10)")
    de.set_defaults(handler=runtime.demo)
    co = commands.add_parser("completion", help="print a shell completion script: source <(station completion bash)")
    co.add_argument("shell", choices=("bash", "zsh", "tcsh"))
    co.set_defaults(handler=lambda args: print(completion_script(build_parser(), args.shell)) or 0)
    verbose_everywhere(parser, commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # numpy's BLAS threads spin on a busy 2-core line PC and slow the station's
    # small matrix products tenfold; must be set before numpy is first imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.handler(args)
    except StationError as exc:
        print(f"station {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
