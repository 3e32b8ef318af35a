"""A tiled bundle's cost on the line side: `station check` and `station bench` on a real tiled bundle from
`station fit` report the model's cost per part (every tile in one batch) and per tile."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the train extra is not installed")

from station.cli import main  # noqa: E402
from station.tools import simulate  # noqa: E402


@pytest.fixture(scope="module")
def tiled_bundle(tmp_path_factory):
    from fit import pipeline, tiles

    data = tmp_path_factory.mktemp("plates") / "plates"
    simulate.write_plate_dataset(data, 150, seed=8)  # ~100 good: enough for every threshold slice
    out = tmp_path_factory.mktemp("bundle") / "b"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "candidate_list", lambda native_size: [])  # the tiled candidates alone
        patch.setattr(tiles, "SCALES", (2.5,))  # 80x80 tiles: a fixed, quick geometry
        result = pipeline.run_fit(
            pipeline.FitOptions(data=data, out=out, max_ms_per_part=1000.0, say=lambda line: None)
        )
    assert result["chosen_candidate"].startswith("lite0-tiles/80x80@")
    yaml_text = (out / "station.yaml").read_text()
    assert "tiles: {" in yaml_text
    (out / "station.yaml").write_text(yaml_text + f"camera: {{source: {data / 'good'}}}\nstate_dir: {out / 'state'}\n")
    count = int(result["chosen_candidate"].rsplit("/", 1)[1].removesuffix("tiles"))
    return out / "station.yaml", count


def test_check_reports_a_tiled_parts_cost_per_part_and_per_tile(tiled_bundle, capsys):
    config, count = tiled_bundle
    assert main(["check", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"judging: {count} tiles of 80x80 at stride " in out and "every tile of a part in one batch" in out
    assert " ms a part, " in out and " ms a tile " in out and "ready to run" in out


def test_bench_reports_a_tiled_parts_cost_per_part_and_per_tile(tiled_bundle, mosquitto):
    config, count = tiled_bundle
    command = [
        sys.executable,
        "-m",
        "station",
        "bench",
        "-c",
        str(config),
        "--parts",
        "150",
        "--broker",
        f"127.0.0.1:{mosquitto.port}",
    ]
    done = subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    cost = figures["cost_per_part"]
    assert cost["tiles"] == count and cost["ms_per_part"] > 0 and f"{count} tiles of 80x80" in cost["geometry"]
    assert cost["ms_per_tile"] == pytest.approx(cost["ms_per_part"] / count, abs=1e-3)
    raw = figures["raw_onnxruntime"][figures["model"]]
    assert raw["regions"]["n"] == count  # the part timed is the station's: its tiles in one batch
    from station.tools.bench import format_table

    table = format_table(figures)
    assert f"cost per part: {cost['ms_per_part']:.3f} ms = {count} tiles x {cost['ms_per_tile']:.4f} ms a tile" in table
