"""The runtime side's subcommands (run, check, bench, demo, simulate, web-user): handlers `station/cli/__init__.py`
dispatches to. Heavy modules are imported inside them, so `station --help` stays fast."""

from __future__ import annotations

import logging
import os
import sys
import threading

from station.core.errors import ConfigError, StationError

log = logging.getLogger("station")


def simulate(args) -> int:
    from station.core.simulated_line import FRAME_HEIGHT, FRAME_ROI, FRAME_WIDTH
    from station.tools import simulate as simulated

    if args.count < 1:
        raise StationError("--count must be at least 1")
    if args.part == "plate" and (args.video or args.contact_sheet or args.pins != 3):
        raise StationError(
            "--part plate writes photos only: --video, --contact-sheet and --pins draw the terminal line"
        )
    if args.part == "plate":
        counts = simulated.write_plate_dataset(args.out, args.count, args.seed)
    else:
        counts = simulated.write_dataset(args.out, args.count, args.seed, pins=args.pins)
    summary = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
    print(f"wrote {args.count} parts to {args.out}: {summary}")
    if args.video:
        truth = args.video.with_suffix(".csv")
        if args.dwell is not None:
            simulated.write_dwell_video(args.video, truth, args.count, args.seed, args.dwell, pins=args.pins)
        else:
            simulated.write_video(args.video, truth, args.count, args.seed, pins=args.pins)
        print(
            f"wrote {args.video} ({FRAME_WIDTH}x{FRAME_HEIGHT}, part in ROI x={FRAME_ROI.x} y={FRAME_ROI.y} "
            f"{FRAME_ROI.width}x{FRAME_ROI.height}) and ground truth {truth}"
        )
    if args.contact_sheet:
        simulated.write_contact_sheet(args.contact_sheet, args.seed, pins=args.pins)
        print(f"wrote {args.contact_sheet} (six enlarged parts of each class)")
    return 0


def check(args) -> int:
    from station.tools.check import check_station
    from station.runtime.config.station import load_config
    from station.core.errors import ConfigError

    result = check_station(load_config(args.config))
    for line in result.summary:
        print(f"ok: {line}")
    if result.problems:
        raise ConfigError(f"{args.config}: {len(result.problems)} problem(s):\n  " + "\n  ".join(result.problems))
    print(f"{args.config}: ready to run")
    return 0


def run(args) -> int:
    from station.runtime.daemon import Daemon

    try:
        code = Daemon(args.config).run()
    except StationError:
        raise
    except Exception:  # a bug in the station: the traceback is for its developers; systemd restarts on exit 1
        log.critical("station run crashed (a bug in the station): exit 1", exc_info=True)
        code = 1
    lingering = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    if lingering:
        # E.g. a camera reader still blocked in OpenCV's read of a stream: interpreter shutdown would
        # unwind it through OpenCV's catch-all and abort ("FATAL: exception not rethrown", SIGABRT)
        # after a clean stop. The daemon has closed and flushed everything; leave without finalization.
        log.info("threads still inside native code at exit (%s): exiting without waiting", ", ".join(lingering))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def bench(args) -> int:
    from station.tools import bench, bench_models

    chosen, regions = None, bench.bench_latency.REGIONS
    if args.config:  # the station's own model: the form it runs here first, its other forms timed raw
        from station.runtime.config.station import load_config

        if args.model or args.reference:
            raise ConfigError("give -c/--config or --model/--reference, not both")
        args.model, args.reference, chosen, regions = bench_models.station_models(load_config(args.config))
    if not args.model:  # the bundled demo models: int8 as the station's, its fp32 twin timed raw
        from station.tools.demo import DEMO_MODEL, DEMO_MODEL_FP32

        args.model = [DEMO_MODEL] + ([DEMO_MODEL_FP32] if DEMO_MODEL_FP32.exists() else [])
    progress = lambda text: print(text, file=sys.stderr)
    figures = bench.run_bench(
        args.model, args.reference, args.parts, args.broker, progress, args.integrations, regions, chosen
    )
    print(bench.to_json(figures) if args.json else bench.format_table(figures))
    return 0


def demo(args) -> int:
    from station.tools.demo import run_demo

    return run_demo(args.frames, args.broker, args.seed, args.fps)


def web_user(args) -> int:
    """A users-file line for the station's page; the password from stdin (piped) or asked twice (a terminal)."""
    import getpass

    from station.core.errors import ConfigError
    from station.runtime.web.users import add_user, user_line

    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    line = user_line(args.name, args.role, password)
    if args.file is None:
        print(line)
    else:
        add_user(args.file, line)
        print(f"{args.file}: {args.name} ({args.role}) written", file=sys.stderr)
    return 0
