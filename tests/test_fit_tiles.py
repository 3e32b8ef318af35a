"""station fit's tiled candidates (fit/tiles.py): the rule, the measured geometry, part-level figures, station.yaml."""

from __future__ import annotations

import math

import pytest

from station.core.imagefolder import scan_dataset
from station.runtime.config.station import parse_config

pytest.importorskip("torch", reason="the train extra is not installed")

from fit import candidates, tiles  # noqa: E402
from station.tools import simulate  # noqa: E402


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plates") / "data"
    simulate.write_plate_dataset(folder, 48, seed=7)
    return folder


def test_only_large_photos_get_tiles():
    assert tiles.wanted((480, 192)) and tiles.wanted((500, 1240))
    assert not tiles.wanted((36, 26)) and not tiles.wanted((200, 200))  # 4.3x the whole-image input's pixels


def test_the_finest_tiles_within_the_measured_cost_become_candidates(plates, tmp_path):
    items = scan_dataset(plates)
    found, notes = tiles.tiled_candidates(items, tmp_path, max_ms_per_part=60.0, say=lambda line: None)
    assert found and not notes
    whole_scale = math.sqrt(480 * 192 / tiles.WHOLE_IMAGE_AREA)
    for candidate in found:
        geometry = candidate.geometry
        assert candidate.region == (480, 192) and geometry.region_width == 480
        assert candidate.tile[0] / tiles.TILE_INPUT < whole_scale  # finer than the whole-image candidate sees
        assert candidate.stride[0] == round(candidate.tile[0] * (1 - candidate.overlap))
        embedder = tiles.tile_model(tmp_path)[1]
        assert tiles.measured_ms(embedder, geometry.count) <= 60.0 * 1.5  # measured, not estimated (noise allowed)
    none, why = tiles.tiled_candidates(items, tmp_path, max_ms_per_part=0.001, say=lambda line: None)
    assert none == [] and len(why) == len(tiles.OVERLAPS) and "fits --max-ms-per-part 0.001" in why[0]


def test_the_tiles_cost_is_the_one_measurement_every_candidate_gets_re_measured_when_busy(tmp_path):
    """fit/cost.py: a part's tiles in one batch, measured again while over the limit, the lowest median kept."""
    from fit import cost

    embedder = tiles.tile_model(tmp_path)[1]
    alone = tiles.measured_ms(embedder, 8)
    real, runs = embedder.session, []

    class Busy:  # the first of three measurements runs beside other work
        def run(self, names, feed):
            runs.append(len(feed[next(iter(feed))]))
            if len(runs) <= cost.COST_WARMUP + cost.COST_RUNS:
                cost.time.sleep(0.02)
            return real.run(names, feed)

    embedder.session = Busy()
    limit = alone * 3 + 1.0
    assert tiles.measured_ms(embedder, 8, limit) <= limit
    assert len(runs) == 2 * (cost.COST_WARMUP + cost.COST_RUNS) and set(runs) == {8}  # 8 tiles, one batch
    runs.clear()
    assert tiles.measured_ms(embedder, 8, 1e-6) > 0 and len(runs) == cost.COST_TRIES * (
        cost.COST_WARMUP + cost.COST_RUNS
    )
    assert candidates.onnx_ms is cost.onnx_ms  # the trained and per-position candidates' measurement too


def test_a_tiled_candidate_is_measured_per_part_and_its_station_yaml_parses(plates, tmp_path):
    items = scan_dataset(plates)
    candidate = tiles.TiledCandidate((96, 96), (72, 72), (480, 192), 0.25)
    options = candidates.SearchOptions(say=lambda line: None, max_ms_per_part=1000.0)  # a busy test machine
    outcome = tiles.measure(candidate, items, tmp_path, options, candidates.Outcome(candidate))
    assert outcome.error is None, outcome.error
    n_good = sum(not i.is_defect for i in items)
    assert outcome.good_scores.shape == (n_good,) and outcome.defect_scores.shape == (len(items) - n_good,)
    assert 0.0 <= outcome.auroc <= 1.0 and outcome.ms_per_part > 0 and outcome.n_good == n_good
    assert outcome.row()["candidate"] == "lite0-tiles/96x96@72x72/21tiles"
    config = parse_config(
        "station: s\ncamera: {source: /tmp}\nmodel: m.onnx\nreference: r\n" + tiles.station_yaml_section(candidate)
    )
    assert (config.tiles.width, config.tiles.height, config.tiles.strides) == (96, 96, (72, 72)) and config.roi is None
    limit = candidates.SearchOptions(say=lambda line: None, max_ms_per_part=1e-6)
    over = tiles.measure(candidate, items, tmp_path, limit, candidates.Outcome(candidate))
    assert "is over --max-ms-per-part" in over.error  # held to the limit like every candidate


def test_station_fit_builds_a_tiled_bundle_the_station_judges_as_it_was_fitted(tmp_path_factory, monkeypatch):
    from fit import pipeline
    from station.core import reference_set as reference_sets
    from station.runtime.config.station import load_config
    from station.runtime.inspector import load_inspector

    data = tmp_path_factory.mktemp("many") / "plates"
    simulate.write_plate_dataset(data, 150, seed=8)  # ~100 good: enough for every threshold slice
    monkeypatch.setattr(pipeline, "candidate_list", lambda native_size: [])  # the tiled candidates alone
    monkeypatch.setattr(tiles, "SCALES", (2.5,))  # 80x80 tiles: a fixed, quick geometry
    out = tmp_path_factory.mktemp("bundle") / "b"
    result = pipeline.run_fit(pipeline.FitOptions(data=data, out=out, max_ms_per_part=1000.0, say=lambda line: None))
    assert result["chosen_candidate"] in ("lite0-tiles/80x80@60x60/24tiles", "lite0-tiles/80x80@40x40/44tiles")
    assert {row["candidate"] for row in result["candidates"]} == {
        "lite0-tiles/80x80@60x60/24tiles",
        "lite0-tiles/80x80@40x40/44tiles",
    }
    assert result["n_good"] + result["n_defect"] == len([p for p in result["split"]["files"].values() if p == "test"])
    saved = reference_sets.load(out / "reference")
    assert saved.statistics["tiles"]["region_width"] == 480 and saved.statistics["tiles"]["width"] == 80
    yaml_text = (out / "station.yaml").read_text()
    (out / "station.yaml").write_text(yaml_text + f"camera: {{source: {data / 'good'}}}\nstate_dir: {out / 'state'}\n")
    inspector = load_inspector(load_config(out / "station.yaml"))
    assert inspector.whole_frame and len(inspector.regions) == saved.statistics["tiles"]["count"]
