"""`station bench` runs end to end and reports every figure (values are read, never timed here)."""

import json
import subprocess
import sys

from station.tools import bench


def test_bench_reports_stages_raw_models_tuning_and_the_daemon_end_to_end(mosquitto):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "station",
            "bench",
            "--parts",
            "150",
            "--json",
            "--broker",
            f"127.0.0.1:{mosquitto.port}",
            "--integrations",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert set(figures["stages"]) >= {
        "grab/decode",
        "crop+preprocess",
        "embed",
        "metrics (all)",
        "verdict+json",
        "outbox write (64/commit)",
        "mqtt publish (QoS 1, to PUBACK)",
    }
    assert all(0 < stage["p50_us"] <= stage["p99_us"] for stage in figures["stages"].values())
    assert {raw["quantization"] for raw in figures["raw_onnxruntime"].values()} == {"int8-dynamic", "fp32"}
    assert len(figures["session_tuning"]) == 4
    end_to_end = figures["end_to_end"]
    assert end_to_end["parts"] == 150 and end_to_end["verdicts_per_s"] > 0
    assert end_to_end["torch_loaded"] is False and end_to_end["peak_rss_mib"] > 30 and end_to_end["ready_s"] > 0
    assert figures["per_verdict_over_raw"] > 0
    # Raw onnxruntime (session.run alone, batch 1) beside the end-to-end cost, per part and per region.
    first = figures["raw_onnxruntime"][figures["model"]]
    assert figures["raw_per_part_us"] == first["p50_us"] > 0
    assert first["regions"]["n"] == 8 and first["regions"]["per_part_us"] > 0
    assert first["regions"]["per_region_us"] == round(first["regions"]["per_part_us"] / 8, 2)
    table = bench.format_table(figures)
    assert f"raw onnxruntime {first['p50_us']:.1f} µs a part (session.run alone, batch 1)" in table
    assert f"8 regions in one call: {first['regions']['per_part_us']:.1f} µs a part" in table
    assert figures["cost_per_part"] == {"ms_per_part": round(first["p50_us"] / 1000, 4), "tiles": None}
    assert f"cost per part: {figures['cost_per_part']['ms_per_part']:.3f} ms (" in table
    cost = figures["integrations"]  # metrics, snapshot and discovery: off and on, 3 runs each
    assert len(cost["off_verdicts_per_s"]) == len(cost["on_verdicts_per_s"]) == 3
    assert cost["on_median"] > 0 and cost["off_median"] > 0 and "cost_percent" in cost
    latency, regions = figures["latency"], figures["regions"]  # grab -> PUBACK at 100/s; 1 against 8 regions
    assert latency["parts"] == 150 and 0 < latency["p50_ms"] <= latency["p99_ms"]
    assert regions["frames"] == 150 and regions["regions"] == 8 and regions["ratio"] > 0
