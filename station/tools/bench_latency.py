"""`station bench`, continued: latency from frame grabbed to the broker's PUBACK at a paced line rate,
and what several regions per part cost (1 region against 8, same frames).

Both run the real daemon (`station run`) as a process against the broker. For the latency the
daemon runs under a small tracer (RUNNER): it notes each frame's grab time (time.monotonic() when
the source delivered it, the clock the daemon's own latency_ms starts from), the outbox id each
verdict gets, and the moment the broker's PUBACK for that id arrives, through the publisher's
own hooks (on_queued, Delivery.on_delivered). Nothing else in the daemon changes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from station.core.errors import StationError

LATENCY_RATE = 100.0  # parts per second, paced by the source (camera.fps)
LATENCY_PARTS = 1500
REGIONS = 8
# The broker side of TCP_NODELAY (the station sets its own): mosquitto's Nagle held each PUBACK until
# the station's next packet, one part later at 100/s (p99 grab -> PUBACK 12.7 -> 4.6 ms measured).
BROKER_CONFIG = "set_tcp_nodelay true\n"

RUNNER = """
import json, sys, time
from station.runtime import daemon, frame_feed
from station.runtime.mqtt import publisher
from station.runtime.mqtt.messages import is_verdict
grabbed, queued, samples = {}, {}, []

class TracedFeed(frame_feed.FrameFeed):
    def get_batch(self, max_frames, timeout):
        frames = super().get_batch(max_frames, timeout)
        for frame in frames:
            grabbed[frame.source] = frame.grabbed_at
        return frames

class TracedPublisher(publisher.Publisher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_queued, self.delivery.on_delivered = self._queued, self._delivered

    def _queued(self, ids, messages):
        for outbox_id, message in zip(ids, messages):
            if is_verdict(message):
                queued[outbox_id] = grabbed.pop(message["source"], None)

    def _delivered(self, outbox_id):
        at = queued.pop(outbox_id, None)
        if at is not None:
            samples.append(time.monotonic() - at)

daemon.FrameFeed, daemon.Publisher = TracedFeed, TracedPublisher
from station.cli import main
code = main(["run", "-c", sys.argv[1]])
with open(sys.argv[2], "w") as out:
    json.dump(samples, out)
sys.exit(code)
"""


def _run_daemon(config_text: str, workdir: Path, traced: bool = False) -> tuple[float, Path | None]:
    """Run `station run` on a config until it exits; (seconds from READY to exit, latency samples file)."""
    from station.tools.bench import _wait_ready

    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "station.yaml"
    config.write_text(config_text + f"state_dir: {workdir / 'state'}\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify.sock"))
    samples = workdir / "latency.json" if traced else None
    command = (
        [sys.executable, "-c", RUNNER, str(config), str(samples)]
        if traced
        else [sys.executable, "-m", "station", "run", "-c", str(config)]
    )
    process = subprocess.Popen(
        command,
        env=dict(os.environ, NOTIFY_SOCKET=str(workdir / "notify.sock")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ready = _wait_ready(notify, process)
        process.wait()
    finally:
        notify.close()
    finished = time.monotonic()
    if process.returncode != 0:
        raise StationError(f"the daemon failed: {process.stderr.read().decode()[-2000:]}")
    return finished - ready, samples


def _base_config(model: Path, reference: Path, source: Path, broker: tuple[str, int], fps: float = 0.0) -> str:
    return (
        f"station: bench\ncamera: {{source: {source}, fps: {fps}}}\nmodel: {Path(model).resolve()}\n"
        f"reference: {Path(reference).resolve()}\nmqtt: {{host: {broker[0]}, port: {broker[1]}, qos: 1}}\n"
        "keep_crops: {ng: false}\n"
    )


def paced_latency(
    model: Path,
    reference: Path,
    parts: Path,
    broker: tuple[str, int],
    workdir: Path,
    rate: float = LATENCY_RATE,
    count: int = LATENCY_PARTS,
) -> dict:
    """p50/p99 from frame grabbed to PUBACK, the daemon fed `rate` parts a second (one region)."""
    folder = workdir / "paced"
    folder.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(sorted(parts.rglob("*.png"))[:count]):
        os.symlink(path, folder / f"part_{index:06d}.png")
    _, samples_file = _run_daemon(_base_config(model, reference, folder, broker, fps=rate), workdir / "latency", True)
    samples = np.asarray(json.loads(samples_file.read_text())) * 1000.0
    if len(samples) == 0:
        raise StationError("no verdict was acknowledged during the latency run")
    return {
        "rate_per_s": rate,
        "parts": int(len(samples)),
        "p50_ms": round(float(np.percentile(samples, 50)), 3),
        "p99_ms": round(float(np.percentile(samples, 99)), 3),
        "max_ms": round(float(samples.max()), 3),
    }


def wide_frames(parts: Path, folder: Path, count: int, regions: int = REGIONS) -> tuple[int, int]:
    """`count` frames of `regions` simulated parts side by side; returns one part's (width, height)."""
    import cv2

    from station.core.imagefolder import read_image

    paths = sorted(parts.rglob("*.png"))
    folder.mkdir(parents=True, exist_ok=True)
    height, width = read_image(paths[0]).shape[:2]
    for index in range(count):
        row = [read_image(paths[(index * regions + i) % len(paths)]) for i in range(regions)]
        cv2.imwrite(str(folder / f"frame_{index:06d}.png"), np.hstack(row))
    return width, height


def region_throughput(
    model: Path,
    reference: Path,
    parts: Path,
    broker: tuple[str, int],
    workdir: Path,
    count: int,
    regions: int = REGIONS,
) -> dict:
    """Parts per second end to end, the same frames judged with 1 region and with `regions` regions."""
    frames = workdir / "wide"
    width, height = wide_frames(parts, frames, count, regions)
    base = _base_config(model, reference, frames, broker)
    one = base + f"roi: {{x: 0, y: 0, width: {width}, height: {height}}}\n"
    many = (
        base
        + "rois:\n"
        + "".join(
            f"  - {{name: r{i}, x: {i * width}, y: 0, width: {width}, height: {height}}}\n" for i in range(regions)
        )
    )
    one_s, _ = _run_daemon(one, workdir / "regions-1")
    many_s, _ = _run_daemon(many, workdir / f"regions-{regions}")
    one_rate, many_rate = count / one_s, count / many_s
    return {
        "frames": count,
        "regions": regions,
        "one_region_parts_per_s": round(one_rate, 1),
        "many_regions_parts_per_s": round(many_rate, 1),
        "ratio": round(many_rate / one_rate, 3),
        "many_regions_per_s": round(many_rate * regions, 1),
    }


def format_lines(figures: dict) -> list[str]:
    latency, regions = figures["latency"], figures["regions"]
    return [
        f"latency, frame grabbed -> PUBACK, {latency['rate_per_s']:.0f} parts/s paced, {latency['parts']} parts: "
        f"p50 {latency['p50_ms']:.2f} ms, p99 {latency['p99_ms']:.2f} ms (max {latency['max_ms']:.2f})",
        f"regions: {regions['frames']} frames, 1 region {regions['one_region_parts_per_s']:.0f} parts/s, "
        f"{regions['regions']} regions {regions['many_regions_parts_per_s']:.0f} parts/s "
        f"(x{regions['ratio']:.2f}; {regions['many_regions_per_s']:.0f} regions/s)",
    ]


def run(model: Path, reference: Path, parts: Path, broker: tuple[str, int], workdir: Path, frames: int) -> dict:
    """Both measurements, for `station bench`."""
    return {
        "latency": paced_latency(model, reference, parts, broker, workdir),
        "regions": region_throughput(model, reference, parts, broker, workdir, frames),
    }
