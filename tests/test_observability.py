"""Prometheus /metrics and the NG snapshot, read from a real daemon process against a real mosquitto."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_helpers import Output, start_station, wait_until, write_config
from tests.mqtt_helpers import Recorder

MAX_INFLIGHT = 20  # mqtt.max_inflight's default: PUBACKs outstanding at once


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} from GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name, **labels) -> float:
    return next(v for found, v in samples[name] if all(found.get(k) == w for k, w in labels.items()))


def max_seq(recorder) -> int:
    return max((v["seq"] for v in recorder.json_on("/verdict")), default=0)


def test_metrics_count_the_verdicts_the_broker_acknowledged(tmp_path, station_files, broker, sim_dataset):
    port = free_port()
    config = write_config(
        tmp_path,
        station_files,
        broker,
        f"{{source: {sim_dataset}, loop: true, fps: 50}}",
        prometheus=f"{{host: 127.0.0.1, port: {port}}}",
    )
    recorder = Recorder(broker.host, broker.port, "plant/st1/verdict")
    process = start_station(config)
    output = Output(process)
    try:
        wait_until(lambda: max_seq(recorder) > 40, 60, "verdicts")
        for _ in range(3):
            received_before = max_seq(recorder)  # verdicts arrive in seq order; each was PUBACKed or in flight
            samples = scrape(port)
            counted = sum(v for _, v in samples["station_verdicts_total"])
            assert counted >= received_before - MAX_INFLIGHT, (counted, received_before)
            # Everything the broker acknowledged reaches the subscriber (it may lag behind the scrape).
            wait_until(
                lambda counted=counted: max_seq(recorder) >= counted, 30, f"verdict seq {counted} at the subscriber"
            )
            time.sleep(0.3)
        assert {labels["verdict"] for labels, _ in samples["station_verdicts_total"]} <= {"OK", "NG"}
        assert {labels["product"] for labels, _ in samples["station_verdicts_total"]} == {"A"}
        assert 0 < value(samples, "station_verdict_latency_seconds_count") <= counted + 1
        assert value(samples, "station_frames_total") >= value(samples, "station_parts_total") >= counted
        assert value(samples, "station_broker_connected") == 1
        assert value(samples, "station_camera_state", state="ok") == 1
        assert value(samples, "station_reference_version", product="A") >= 1
        assert value(samples, "station_errors_total", kind="mqtt_refused") == 0
        depth = value(samples, "station_outbox_depth")
        # Verdicts waiting for their PUBACK: a whole number (NaN: the outbox could not be read) and, on a loopback
        # broker that keeps up, fewer than those already acknowledged (not a count since start).
        assert depth == int(depth) and 0 <= depth < counted, (depth, counted)
        assert value(samples, "station_uptime_seconds") > 0
        assert abs(value(samples, "station_start_time_seconds") - time.time()) < 300
        # The Grafana dashboard in docs/ reads only what is served.
        dashboard = (Path(__file__).parent.parent / "docs" / "grafana-station.json").read_text()
        wanted = set(re.findall(r"\bstation_[a-z_]+", dashboard)) - {"station_uptime_seconds, instance"}
        assert wanted and wanted <= set(samples), f"the dashboard reads metrics not served: {wanted - set(samples)}"
    finally:
        process.terminate()
        code = output.finish(30)
        recorder.close()
    assert code == 0, output.text


def test_a_second_station_on_the_same_port_is_told_which_key_to_change(tmp_path, station_files, broker, sim_dataset):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path, station_files, broker, f"{{source: {sim_dataset}}}", prometheus=f"{{port: {port}}}"
        )
        process = start_station(config)
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 78, out
    assert f"prometheus: cannot serve /metrics on 127.0.0.1:{port}" in out and "Traceback" not in out


def test_the_latest_ng_part_is_a_retained_jpeg_of_the_region_cleared_at_changeover(tmp_path, station_files, broker):
    roi = {"x": 100, "y": 80, "width": 120, "height": 80}  # larger than the model's input: judged scaled down
    config = write_config(
        tmp_path,
        station_files,
        broker,
        '{source: "sim://?seed=3", fps: 40}',
        roi=json.dumps(roi),
        keep_crops="{ng: true}",
    )
    recorder = Recorder(broker.host, broker.port, "plant/st1/#")
    process = start_station(config)
    output = Output(process)
    started = time.monotonic()
    try:
        wait_until(lambda: any(m.payload for m in recorder.on("/snapshot")), 60, "an NG snapshot")
        snapshot = next(m for m in recorder.on("/snapshot") if m.payload)
        assert len(snapshot.payload) <= 200_000
        picture = cv2.imdecode(np.frombuffer(snapshot.payload, np.uint8), cv2.IMREAD_UNCHANGED)
        assert picture is not None and picture.shape[:2] == (roi["height"], roi["width"])  # native resolution
        # The snapshot goes out live, the verdict through the outbox: either may arrive first.
        wait_until(lambda: any(v["verdict"] == "NG" for v in recorder.json_on("/verdict")), 10, "the NG verdict")

        # Retained: a subscriber that comes later gets the latest picture at once.
        late = Recorder(broker.host, broker.port, "plant/st1/snapshot")
        wait_until(lambda: late.on("/snapshot"), 10, "the retained snapshot")
        assert late.on("/snapshot")[0].retain and late.on("/snapshot")[0].payload
        late.close()

        recorder.publish("plant/st1/command", json.dumps({"id": "c1", "cmd": "product", "product": "B"}))
        wait_until(lambda: any(not m.payload for m in recorder.on("/snapshot")), 30, "the snapshot cleared")
        elapsed = time.monotonic() - started
        pictures = [m for m in recorder.on("/snapshot") if m.payload]
        assert len(pictures) <= elapsed / 1.0 + 2, f"{len(pictures)} snapshots in {elapsed:.1f} s: more than 1/s"
    finally:
        process.terminate()
        code = output.finish(30)
        recorder.close()
    assert code == 0, output.text
    kept = sorted((tmp_path / "state" / "crops" / "NG").glob("*.png"))
    assert kept
    crop = cv2.imread(str(kept[0]), cv2.IMREAD_UNCHANGED)
    assert crop.shape[:2] == (roi["height"], roi["width"])  # kept at the camera's resolution too


def test_a_large_region_is_fitted_into_the_snapshot_bound():
    from station.runtime.integrations.snapshot import encode_jpeg

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2048, 2448, 3), dtype=np.uint8)  # a 5 MP colour region: worst case for JPEG
    jpeg = encode_jpeg(noise, 200_000)
    assert len(jpeg) <= 200_000
    picture = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    assert picture.ndim == 3 and picture.shape[1] / picture.shape[0] == pytest.approx(2448 / 2048, rel=0.02)
    small = rng.integers(0, 65536, (26, 36), dtype=np.uint16)  # 16-bit grey at native size stays native
    assert cv2.imdecode(np.frombuffer(encode_jpeg(small, 200_000), np.uint8), cv2.IMREAD_UNCHANGED).shape == (26, 36)
