"""`station bench`: what the station costs per verdict, stage by stage, and end to end.

Figures, not pass/fail: speed and memory goals are checked by reading these,
never by timed tests. Every figure comes from the same code the daemon runs.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from station.core.errors import StationError
from station.tools import bench_latency
from station.tools.bench_models import TILES_MARK, cost_line, cost_per_part
from station.tools.loopback import Mosquitto
from station.core.verdict import judge
from station.runtime.mqtt.messages import encode, utc_timestamp, verdict_message

STAGE_RUNS = 2000


def _percentiles(samples_ns) -> dict:
    micros = np.asarray(samples_ns, dtype=np.float64) / 1000.0
    return {"p50_us": round(float(np.percentile(micros, 50)), 2), "p99_us": round(float(np.percentile(micros, 99)), 2)}


def time_calls(function, arguments: list, warmup: int = 50) -> dict:
    """p50/p99 of function(argument) over the arguments, in microseconds."""
    for argument in arguments[:warmup]:
        function(argument)
    samples = []
    clock = time.perf_counter_ns
    for argument in arguments:
        start = clock()
        function(argument)
        samples.append(clock() - start)
    return _percentiles(samples)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "system": platform.platform(),
    }


# -- stages ------------------------------------------------------------------


def stage_figures(model: Path, reference: Path, parts: Path, broker: tuple[str, int]) -> dict:
    """Each stage of the daemon's path at batch 1, on real files."""
    from station.core import reference_set
    from station.core.embedder import Embedder
    from station.core.imagefolder import list_images, read_image
    from station.runtime.mqtt.outbox import Outbox
    from station.core.preprocess import prepare_crop, to_model_input
    from station.core.scoring import distances

    embedder = Embedder(model)
    references = reference_set.load(reference)
    spec = embedder.input_spec
    paths = list_images(parts)[:STAGE_RUNS]
    images = [read_image(p) for p in paths]
    inputs = [to_model_input(prepare_crop(image, spec)[None], spec) for image in images]
    embeddings = [embedder.embed(x) for x in inputs]
    judgements = [judge(e, references)[0] for e in embeddings]
    ts = utc_timestamp(time.time())  # as the daemon does: once per batch
    stages = {
        "grab/decode": time_calls(read_image, paths),
        "crop+preprocess": time_calls(lambda image: to_model_input(prepare_crop(image, spec)[None], spec), images),
        "embed": time_calls(embedder.embed, inputs),
        "metrics (all)": time_calls(lambda e: distances(e, references.model), embeddings),
        "verdict+json": time_calls(lambda j: encode(_message(j, references, ts)), judgements),
    }
    with tempfile.TemporaryDirectory() as folder:
        outbox = Outbox(Path(folder) / "outbox.sqlite3")
        payloads = [encode(_message(j, references, ts)) for j in judgements]
        stages["outbox write (1/commit)"] = time_calls(lambda p: _store(outbox, [p]), payloads[:500], warmup=10)
        batches = [payloads[i : i + 64] for i in range(0, len(payloads) - 63, 64)]
        per_batch = time_calls(lambda b: _store(outbox, b), batches, warmup=2)
        stages["outbox write (64/commit)"] = {k: round(v / 64, 2) for k, v in per_batch.items()}
        outbox.close()
    stages["mqtt publish (QoS 1, to PUBACK)"] = publish_round_trips(broker, payloads[:1000])
    return stages


def _message(judgement, references, ts: str) -> dict:
    return verdict_message(
        station="bench",
        seq=1,
        source="part_000001.png",
        part_id=None,
        product=references.product,
        judgement=judgement,
        threshold=references.threshold,
        metric=references.metric,
        model_id="0" * 12,
        reference_version=references.version,
        latency_ms=0.1,
        ts=ts,
    )


def _store(outbox, payloads):
    with outbox.transaction() as tx:
        for payload in payloads:
            tx.next_seq()
            tx.put("bench/verdict", payload, 1)


def publish_round_trips(broker: tuple[str, int], payloads: list[bytes]) -> dict:
    """One QoS 1 publish at a time, each timed until its PUBACK."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}")
    client.connect(*broker)
    client.loop_start()
    try:

        def publish(payload):
            client.publish("bench/verdict", payload, qos=1).wait_for_publish(5)

        return time_calls(publish, payloads, warmup=20)
    finally:
        client.loop_stop()
        client.disconnect()


def raw_onnxruntime(model: Path, runs: int = STAGE_RUNS, regions: int = bench_latency.REGIONS) -> dict:
    """The model alone: a bare session.run at batch 1, same session options as the station; and a part of
    `regions` regions, judged as the daemon does (every region's crop in one call), per part and per region."""
    from station.core.embedder import INPUT_NAME, Embedder, build_session

    embedder = Embedder(model)
    session = build_session(model)
    x = np.random.default_rng(0).random((regions,) + embedder.input_spec.sample_shape, dtype=np.float32)
    feed = {INPUT_NAME: x[:1]}
    figures = time_calls(lambda _: session.run(None, feed), list(range(runs)), warmup=200)
    # A dynamic int8 model exported before batch_independent runs a part per call: the Embedder knows.
    wide = time_calls(lambda _: embedder.embed(x), list(range(max(runs // regions, 50))), warmup=20)
    figures.update(
        quantization=embedder.info.quantization,
        arch=embedder.info.arch,
        size_bytes=model.stat().st_size,
        regions={"n": regions, "per_part_us": wide["p50_us"], "per_region_us": round(wide["p50_us"] / regions, 2)},
    )
    return figures


def session_tuning(model: Path, runs: int = STAGE_RUNS) -> dict:
    """Batch-1 latency of the station's session for intra-op threads x spinning."""
    from station.core.embedder import INPUT_NAME, Embedder, build_session

    spec = Embedder(model).input_spec
    feed = {INPUT_NAME: np.random.default_rng(1).random((1,) + spec.sample_shape, dtype=np.float32)}
    figures = {}
    for threads in (1, 2):
        for spinning in (False, True):
            session = build_session(model, threads, spinning)
            figures[f"threads={threads} spinning={'on' if spinning else 'off'}"] = time_calls(
                lambda _, session=session: session.run(None, feed), list(range(runs)), warmup=200
            )
    return figures


# -- end to end --------------------------------------------------------------


def end_to_end(
    model: Path, reference: Path, parts: Path, broker: tuple[str, int], workdir: Path, integrations: bool = False
) -> dict:
    """The real daemon over a folder of parts to the broker at QoS 1 with the durable outbox;
    with `integrations`, Prometheus /metrics, the NG snapshot and Home Assistant discovery on."""
    n_parts = sum(1 for _ in parts.rglob("*.png"))
    model, reference = Path(model).resolve(), Path(reference).resolve()  # the config lives elsewhere
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "station.yaml"
    config.write_text(
        f"station: bench\ncamera: {{source: {parts}}}\nmodel: {model}\nreference: {reference}\n"
        f"state_dir: {workdir / 'state'}\nmqtt: {{host: {broker[0]}, port: {broker[1]}, qos: 1}}\n"
        + (
            f"prometheus: {{port: {_free_port()}}}\nhomeassistant: {{discovery: true}}\n"
            if integrations
            else "snapshot: {ng: false}\n"
        )
    )
    notify_path = workdir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "station", "run", "-c", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ready = _wait_ready(notify, process)
    torch_loaded = _maps_mention(process.pid, "torch")
    peak_kib = 0
    while process.poll() is None:
        # VmHWM, not wait4's ru_maxrss: that also counts the pages this (large)
        # bench process lent the child between fork and exec.
        peak_kib = max(peak_kib, _peak_rss_kib(process.pid))
        time.sleep(0.05)
    finished = time.monotonic()
    notify.close()
    if process.returncode != 0:
        raise StationError(f"the daemon failed: {process.stderr.read().decode()[-2000:]}")
    return {
        "parts": n_parts,
        "verdicts_per_s": round(n_parts / (finished - ready), 1),
        "seconds": round(finished - ready, 3),
        "ready_s": round(ready - started, 3),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "torch_loaded": torch_loaded,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def integration_cost(
    model: Path, reference: Path, parts: Path, broker: tuple[str, int], workdir: Path, runs: int = 3
) -> dict:
    """verdicts/s end to end with metrics, snapshot and discovery off and on, alternating; medians."""
    figures = {"off": [], "on": []}
    for run in range(runs):
        for label in ("off", "on"):
            e2e = end_to_end(model, reference, parts, broker, workdir / f"{label}-{run}", integrations=label == "on")
            figures[label].append(e2e["verdicts_per_s"])
    off, on = (float(np.median(figures[label])) for label in ("off", "on"))
    return {
        "runs": runs,
        "off_verdicts_per_s": figures["off"],
        "on_verdicts_per_s": figures["on"],
        "off_median": off,
        "on_median": on,
        "cost_percent": round(100.0 * (off - on) / off, 1),
    }


def _wait_ready(notify: socket.socket, process, timeout: float = 30.0) -> float:
    notify.settimeout(0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                return time.monotonic()
        except socket.timeout:
            if process.poll() is not None:
                raise StationError(
                    f"the daemon exited before READY: {process.stderr.read().decode()[-2000:]}"
                ) from None
    process.kill()
    raise StationError(f"the daemon did not say READY within {timeout} s")


def _peak_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _maps_mention(pid: int, word: str) -> bool:
    try:
        return word in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# -- the whole bench ---------------------------------------------------------


def run_bench(
    models: list[Path],
    reference: Path | None,
    n_parts: int,
    broker: tuple[str, int] | None,
    progress=print,
    integrations: bool = False,
    regions: int = bench_latency.REGIONS,
    chosen: str | None = None,
) -> dict:
    from calibration import workflow
    from station.core.embedder import Embedder
    from station.tools.simulate import write_dataset

    with tempfile.TemporaryDirectory(prefix="station-bench-") as folder:
        workdir = Path(folder)
        parts = workdir / "parts"
        progress(f"writing {n_parts} simulated parts ...")
        write_dataset(parts, n_parts, seed=2024)
        if reference is None:
            progress("calibrating a reference set on the simulated good parts ...")
            reference = workdir / "refs" / "bench"
            workflow.calibrate_folders(Embedder(models[0]), parts / "good", [], reference, "bench")
        local = None
        if broker is None:
            # Without it mosquitto's Nagle holds a PUBACK until the station's next packet (+10 ms at 100/s).
            local = Mosquitto(workdir, bench_latency.BROKER_CONFIG).start()
            broker = (local.host, local.port)
        try:
            progress("timing stages ...")
            stages = stage_figures(models[0], reference, parts, broker)
            progress("timing raw onnxruntime ...")
            raw = {str(m): raw_onnxruntime(m, regions=regions) for m in models}
            tuning = session_tuning(models[0])
            progress(f"running the daemon over {n_parts} parts ...")
            e2e = end_to_end(models[0], reference, parts, broker, workdir / "e2e")
            if integrations:
                progress("metrics, snapshot and discovery off and on, 3 runs each ...")
                cost = integration_cost(models[0], reference, parts, broker, workdir / "integrations")
            progress(
                f"latency at {bench_latency.LATENCY_RATE:.0f} parts/s paced; 1 against {bench_latency.REGIONS} regions ..."
            )
            paced = bench_latency.run(models[0], reference, parts, broker, workdir, min(n_parts, 5000))
        finally:
            if local:
                local.stop()
    raw_p50 = raw[str(models[0])]["p50_us"]
    per_verdict_us = 1e6 / e2e["verdicts_per_s"]
    tiled = next((line[len(TILES_MARK) :] for line in (chosen or "").splitlines() if line.startswith(TILES_MARK)), None)
    return {
        "machine": machine(),
        "model": str(models[0]),
        **({"model_form": chosen} if chosen else {}),
        "raw_per_part_us": raw_p50,  # session.run alone, batch 1: beside the end-to-end per-verdict cost
        # The station's model's cost per part: batch 1, or a tiled part's tiles in one batch (per tile beside it).
        "cost_per_part": cost_per_part(raw[str(models[0])], tiled),
        "stages": stages,
        "raw_onnxruntime": raw,
        "session_tuning": tuning,
        "stage_sum_p50_us": round(sum(s["p50_us"] for k, s in stages.items() if "64/commit" not in k), 2),
        "end_to_end": e2e,
        "per_verdict_us": round(per_verdict_us, 2),
        "per_verdict_over_raw": round(per_verdict_us / raw_p50, 2),
        **({"integrations": cost} if integrations else {}),
        **paced,  # latency (grab -> PUBACK) and regions (station/tools/bench_latency.py)
    }


def format_table(figures: dict) -> str:
    lines = [
        f"machine: {figures['machine']['cpu']}, {figures['machine']['cores']} cores, "
        f"onnxruntime {figures['machine']['onnxruntime']}",
        *([figures["model_form"]] if figures.get("model_form") else []),
        "",
        f"{'stage (batch 1)':34s} {'p50 µs':>10s} {'p99 µs':>10s}",
    ]
    for name, stage in figures["stages"].items():
        lines.append(f"{name:34s} {stage['p50_us']:10.1f} {stage['p99_us']:10.1f}")
    first = next(iter(figures["raw_onnxruntime"].values()))
    lines += [
        "",
        f"{'raw onnxruntime, batch 1':34s} {'p50 µs':>10s} {'p99 µs':>10s} {'size':>10s} "
        f"{'part of ' + str(first['regions']['n']) + ' regions':>18s} {'a region':>9s}",
    ]
    for raw in figures["raw_onnxruntime"].values():
        label = f"{raw['arch']} {raw['quantization']}"
        lines.append(
            f"{label:34s} {raw['p50_us']:10.1f} {raw['p99_us']:10.1f} {raw['size_bytes'] / 1024:8.0f} KiB "
            f"{raw['regions']['per_part_us']:15.1f} µs {raw['regions']['per_region_us']:6.1f} µs"
        )
    lines += ["", cost_line(figures)]
    lines += ["", f"{'session (first model), batch 1':34s} {'p50 µs':>10s} {'p99 µs':>10s}"]
    for name, tuned in figures["session_tuning"].items():
        lines.append(f"{name:34s} {tuned['p50_us']:10.1f} {tuned['p99_us']:10.1f}")
    e2e = figures["end_to_end"]
    lines += [
        "",
        f"end to end: {e2e['parts']} parts, {e2e['verdicts_per_s']:.0f} verdicts/s "
        f"(daemon, folder source, mosquitto QoS 1, durable outbox)",
        f"per-verdict cost {figures['per_verdict_us']:.1f} µs end to end, raw onnxruntime {figures['raw_per_part_us']:.1f} µs "
        f"a part (session.run alone, batch 1): {figures['per_verdict_over_raw']:.1f}x"
        + (
            " (bench's simulated parts, each one crop, not tiled: a tiled part's cost is the line above)"
            if figures.get("cost_per_part", {}).get("tiles")
            else ""
        ),
        f"peak RSS {e2e['peak_rss_mib']:.1f} MiB, READY after {e2e['ready_s']:.2f} s, torch loaded: {e2e['torch_loaded']}",
    ]
    if "integrations" in figures:
        cost = figures["integrations"]
        lines.append(
            f"metrics+snapshot+discovery: {cost['on_median']:.0f} verdicts/s on, {cost['off_median']:.0f} off "
            f"(median of {cost['runs']} each): {cost['cost_percent']:+.1f} % cost"
        )
    if "latency" in figures:
        lines += bench_latency.format_lines(figures)
        regions = first["regions"]
        lines.append(
            f"  raw onnxruntime, {regions['n']} regions in one call: {regions['per_part_us']:.1f} µs a part, "
            f"{regions['per_region_us']:.1f} µs a region"
        )
    return "\n".join(lines)


def to_json(figures: dict) -> str:
    return json.dumps(figures, indent=2)
