"""The `station` command: parses arguments and dispatches, nothing else.

Heavy modules are imported inside the handlers, so `station --help` stays
fast and the runtime never loads torch unless `train` or `export` runs.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from station import __version__
from station.errors import StationError


def _simulate(args) -> int:
    from station import simulate

    if args.count < 1:
        raise StationError("--count must be at least 1")
    counts = simulate.write_dataset(args.out, args.count, args.seed, pins=args.pins)
    summary = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
    print(f"wrote {args.count} parts to {args.out}: {summary}")
    if args.video:
        truth = args.video.with_suffix(".csv")
        simulate.write_video(args.video, truth, args.count, args.seed, pins=args.pins)
        print(f"wrote {args.video} ({simulate.FRAME_WIDTH}x{simulate.FRAME_HEIGHT}, part in ROI "
              f"x={simulate.FRAME_ROI.x} y={simulate.FRAME_ROI.y} {simulate.FRAME_ROI.width}x"
              f"{simulate.FRAME_ROI.height}) and ground truth {truth}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="station",
        description="Visual inspection station: camera -> roi -> embed -> score -> verdict -> MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"station {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = commands.add_parser("simulate", help="write a simulated inspection line (image folder, optional video)")
    sim.add_argument("--out", type=Path, required=True, help="dataset folder to write (good/ + one folder per defect)")
    sim.add_argument("--count", type=int, default=1000, help="number of parts (default 1000)")
    sim.add_argument("--seed", type=int, default=0, help="same seed, byte-identical output")
    sim.add_argument("--pins", type=int, choices=(2, 3), default=3, help="pins of the simulated product")
    sim.add_argument("--video", type=Path, help="also write an MJPG video of full frames (+ ground truth .csv)")
    sim.set_defaults(handler=_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except StationError as exc:
        print(f"station {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
