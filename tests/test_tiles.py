"""tiles: a large part's roi cut into overlapping tiles: geometry, configuration, calibration per part, the daemon."""

from __future__ import annotations

import subprocess
import sys

import cv2
import jsonschema
import numpy as np
import pytest
import yaml

from calibration import workflow
from calibration.thresholds import quantile_threshold
from calibration.tiles import calibrate_tiles, part_maxima
from station.core import reference_set as reference_sets
from station.core.embedder import Embedder
from station.core.errors import ConfigError, DataError
from station.core.imagefolder import LabeledImage, list_images, read_image
from station.core.preprocess import Roi, prepare_crop, to_model_input
from station.core.tiles import TileGeometry
from station.core.verdict import judge
from station.runtime.config.station import parse_config
from station.runtime.inspector import load_inspector
from tests.mqtt_helpers import Recorder
from tests.onnx_models import projection_model
from tests.daemon_helpers import finish, schema, start_station, write_config

BASE = "station: s\ncamera: {source: /tmp}\nmodel: m.onnx\nreference: r/A\n"
ROI = "roi: {x: 10, y: 5, width: 100, height: 50}\n"


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.exit_code == 78
    return str(caught.value)


# -- geometry and configuration ------------------------------------------------------------------


def test_the_grid_covers_the_region_with_the_last_tiles_flush_with_its_edges():
    geometry = TileGeometry(40, 30, 25, 30, 100, 50)
    assert geometry.columns == (0, 25, 50, 60) and geometry.rows == (0, 20)  # 75 + 40 > 100: one more, flush
    tiles = geometry.tiles(10, 5)
    assert [name for name, _ in tiles][:5] == ["tile-r0c0", "tile-r0c1", "tile-r0c2", "tile-r0c3", "tile-r1c0"]
    assert tiles[3][1] == Roi(70, 5, 40, 30) and tiles[-1][1] == Roi(70, 25, 40, 30)
    covered = np.zeros((50, 100), bool)
    for _, roi in geometry.tiles():
        covered[roi.y : roi.y + roi.height, roi.x : roi.x + roi.width] = True
    assert covered.all() and geometry.count == 8
    assert TileGeometry(50, 50, 50, 50, 100, 50).columns == (0, 50)  # exact: no extra tile


def test_tiles_beside_the_roi_expand_into_named_tiles_of_the_roi():
    config = parse_config(BASE + ROI + "tiles: {width: 40, height: 30, stride_x: 25}\n")
    geometry = config.tiles.geometry(config.roi)
    assert (geometry.stride_x, geometry.stride_y) == (25, 15)  # stride_y defaults to half a tile
    assert geometry.rows == (0, 15, 20) and geometry.count == 12
    assert parse_config(BASE + ROI).tiles is None


def test_tile_problems_name_the_line_and_the_key():
    assert problems(BASE + ROI + "tiles:\n  width: 140\n  height: 30\n") == (
        "station.yaml:7: tiles.width: a tile 140 pixels wide does not fit in the roi's width of 100: tiles must be "
        "no larger than the roi"
    )
    found = problems(BASE + ROI + "tiles:\n  width: 40\n  height: 30\n  stride_x: 0\n  stride_y: 31\n").splitlines()
    assert found[0] == "station.yaml:9: tiles.stride_x: Input should be greater than or equal to 1"
    assert found[1].startswith(
        "station.yaml:10: tiles.stride_y: 31 is larger than the tile's height (30): the tiles would leave gaps"
    )
    assert parse_config(BASE + "tiles: {width: 4, height: 4}\n").tiles.strides == (2, 2)  # no roi: the frame's
    rois = "station: s\ncamera: {source: /tmp}\nmodel: m.onnx\nreference: r/A\nrois:\n  - {name: a, x: 0, y: 0, width: 9, height: 9}\n"
    assert problems(rois + "tiles: {width: 4, height: 4}\n") == (
        "station.yaml:7: tiles: tiles cut one roi: into tiles; with rois: (named regions) give no tiles"
    )
    assert "more than 1024: give larger tiles or strides" in problems(
        BASE + "roi: {x: 0, y: 0, width: 4000, height: 4000}\ntiles: {width: 8, height: 8}\n"
    )
    assert "tiles.colour: unknown key" in problems(BASE + ROI + "tiles: {width: 4, height: 4, colour: red}\n")


def test_a_config_error_in_tiles_exits_78_without_a_traceback(tmp_path):
    path = tmp_path / "station.yaml"
    path.write_text(BASE + ROI + "tiles: {width: 400, height: 30}\n")
    done = subprocess.run([sys.executable, "-m", "station", "check", "-c", str(path)], capture_output=True, text=True)
    assert done.returncode == 78, done.stderr
    assert "tiles.width: a tile 400 pixels wide" in done.stderr and "Traceback" not in done.stderr


# -- calibration: one reference for every tile, the threshold on each part's worst tile ----------


def test_the_threshold_holds_the_false_reject_target_per_part_not_per_tile():
    rng = np.random.default_rng(0)
    tiles, dim, target = 12, 6, 0.05
    good = rng.normal(size=(400, tiles, dim))
    calibration = calibrate_tiles(good, target_false_reject=target, metric="mahalanobis")
    fitted = calibration.fits["mahalanobis"]
    assert fitted.good_scores.shape == (400,)  # one out-of-fold score per part: its worst tile
    assert fitted.threshold == quantile_threshold(fitted.good_scores, target)
    fresh = rng.normal(size=(4000, tiles, dim))  # new good parts from the same line
    from station.core.scoring import score

    per_tile = score(fresh.reshape(-1, dim), calibration.model, "mahalanobis")
    rejected = np.mean(part_maxima(per_tile, tiles) > fitted.threshold)
    assert rejected < 2 * target  # ~5 %; a per-tile quantile would reject 1 - 0.95**12 = 46 %
    assert np.mean(per_tile > quantile_threshold(per_tile, target)) == pytest.approx(target, abs=0.01)
    assert np.mean(part_maxima(per_tile, tiles) > quantile_threshold(per_tile, target)) > 0.3


def test_a_defect_in_one_tile_is_found_by_the_part_s_maximum():
    rng = np.random.default_rng(1)
    good = rng.normal(size=(60, 9, 5))
    defect = rng.normal(size=(20, 9, 5))
    defect[np.arange(20), rng.integers(0, 9, 20)] += 8.0  # one tile each, anywhere
    calibration = calibrate_tiles(good, defect, target_false_reject=0.05)
    fitted = calibration.fits[calibration.metric]
    assert fitted.defect_scores.shape == (20,) and fitted.auroc > 0.95 and fitted.escape_rate < 0.2


def test_too_few_good_parts_are_counted_as_parts_not_tiles():
    with pytest.raises(Exception, match="8 good parts are too few to calibrate"):
        calibrate_tiles(np.random.default_rng(2).normal(size=(8, 50, 4)))


# -- the station: a part NG when one tile is; a reference of other tiles refused ----------------


def _mosaic(paths: list) -> np.ndarray:
    """Four 36x26 simulated parts as one 72x52 large part (2x2)."""
    images = [read_image(p) for p in paths]
    return np.vstack([np.hstack(images[:2]), np.hstack(images[2:4])])


@pytest.fixture(scope="module")
def tiled_station(tmp_path_factory, sim_dataset):
    """Large parts of 2x2 simulated parts, a projection model, and a reference set calibrated on their tiles."""
    root = tmp_path_factory.mktemp("tiled")
    goods = list_images(sim_dataset / "good")
    for folder in ("good", "defect", "frames"):
        (root / folder).mkdir()
    for i in range(60):
        cv2.imwrite(str(root / "good" / f"g{i:03d}.png"), _mosaic([goods[(4 * i + k) % len(goods)] for k in range(4)]))
    for i in range(20):  # a small bright flaw (a 6th of the part's width), at a different place each time
        for folder, x, y in (("defect", (7 * i) % 60, (11 * i) % 40), ("frames", (13 * i + 5) % 60, (5 * i + 3) % 40)):
            flawed = _mosaic([goods[(7 * i + k + len(folder)) % len(goods)] for k in range(4)])
            flawed[y : y + 12, x : x + 12] = 255
            cv2.imwrite(str(root / folder / f"d{i:03d}.png"), flawed)
    for i in range(10):
        cv2.imwrite(str(root / "frames" / f"g{i:03d}.png"), cv2.imread(str(root / "good" / f"g{i:03d}.png")))
    model = projection_model(root / "model.onnx", embedding_dim=16)
    geometry = TileGeometry(36, 26, 18, 13, 72, 52)  # 3 x 3 tiles, half overlapping
    workflow.calibrate_folders(
        Embedder(model),
        root / "good",
        [root / "defect"],
        root / "refs" / "A",
        "A",
        metric="mahalanobis",
        target_false_reject=0.05,
        min_good=30,
        tiles=geometry,
    )
    workflow.calibrate_folders(Embedder(model), root / "good", [], root / "refs" / "whole", "whole", min_good=30)
    return root, geometry


def _config(root, reference, tiles="tiles: {width: 36, height: 26, stride_x: 18, stride_y: 13}\n"):
    return parse_config(
        f"station: s\ncamera: {{source: {root / 'frames'}}}\nmodel: {root / 'model.onnx'}\n"
        f"reference: {reference}\nroi: {{x: 0, y: 0, width: 72, height: 52}}\n{tiles}"
    )


def test_the_reference_set_records_its_tiles_and_the_station_refuses_other_tiles(tiled_station):
    root, geometry = tiled_station
    summary = yaml.safe_load((root / "refs" / "A" / "v0001" / "reference.yaml").read_text())
    assert summary["statistics"]["tiles"] == geometry.record() and summary["n_good"] == 60  # parts, not tiles
    assert load_inspector(_config(root, root / "refs" / "A")).regions[4].name == "tile-r1c1"
    with pytest.raises(
        ConfigError,
        match=r"tiles: the reference set .*refs/A \(v0001\) was calibrated on 9 tiles of "
        r"36x26 at stride 18x13 .* but this station cuts 4 tiles of 36x26 at stride 36x26",
    ):
        load_inspector(
            _config(root, root / "refs" / "A", "tiles: {width: 36, height: 26, stride_x: 36, stride_y: 26}\n")
        )
    with pytest.raises(ConfigError, match="was calibrated on whole parts, not tiles, but this station cuts 9 tiles"):
        load_inspector(_config(root, root / "refs" / "whole"))
    with pytest.raises(
        ConfigError, match="reference: .* was calibrated on tiles .* but this station judges whole regions"
    ):
        load_inspector(_config(root, root / "refs" / "A", ""))


def test_a_part_is_ng_when_one_tile_is_and_the_worst_tile_is_named(tiled_station):
    root, geometry = tiled_station
    inspector = load_inspector(_config(root, root / "refs" / "A"))
    references = inspector.reference_set
    frames = [read_image(p) for p in sorted((root / "frames").glob("*.png"))]
    parts = inspector.judge_crops(np.stack([inspector.crop(frame) for frame in frames]))
    spec = inspector.embedder.input_spec
    for frame, part in zip(frames, parts):
        tiles = np.stack([prepare_crop(frame, spec, roi) for _, roi in geometry.tiles()])
        alone = judge(inspector.embedder.embed(to_model_input(tiles, spec)), references)
        assert [t.score for t in part.regions] == pytest.approx([j.score for j in alone], rel=1e-5)
        assert part.verdict == ("NG" if any(j.verdict == "NG" for j in alone) else "OK")
        assert (
            part.score == max(j.score for j in alone)
            and part.worst.roi == geometry.tiles()[int(np.argmax([j.score for j in alone]))][1]
        )
    assert {p.verdict for p in parts} == {"OK", "NG"}


def test_folder_calibration_with_tiles_refuses_photos_of_another_size(tiled_station, tmp_path):
    root, geometry = tiled_station
    odd = tmp_path / "odd.png"
    cv2.imwrite(str(odd), np.zeros((50, 72), np.uint8))
    with pytest.raises(DataError, match="odd.png: a 72x50 photo does not hold the tiles' 72x52 region"):
        workflow.embed_tiled_items(Embedder(root / "model.onnx"), [LabeledImage(odd, "good")], None, geometry)


def test_station_calibrate_tiles_on_simulated_plates_records_them_and_judges_per_part(tmp_path):
    """`station simulate --part plate`: large parts with small defects, through the folder calibration's --tiles."""
    run = [sys.executable, "-m", "station"]
    plates = tmp_path / "plates"
    subprocess.run(
        run + ["simulate", "--part", "plate", "--count", "60", "--seed", "4", "--out", str(plates)],
        check=True,
        capture_output=True,
    )
    model = projection_model(tmp_path / "model.onnx", embedding_dim=16, width=48, height=48)
    defects = [str(p) for p in sorted(plates.iterdir()) if p.name != "good"]
    done = subprocess.run(
        run
        + [
            "calibrate",
            "--model",
            str(model),
            "--good",
            str(plates / "good"),
            "--out",
            str(tmp_path / "refs"),
            "--tiles",
            "96,96,64,48",
            "--min-good",
            "20",
            "--target-false-reject",
            "0.05",
            "--metric",
            "mahalanobis",
        ]
        + [arg for d in defects for arg in ("--defects", d)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    saved = reference_sets.load(tmp_path / "refs")
    assert saved.statistics["tiles"]["count"] == 7 * 3 and saved.statistics["tiles"]["region_width"] == 480
    assert saved.n_good == len(list_images(plates / "good"))
    bad = subprocess.run(
        run
        + [
            "calibrate",
            "--model",
            str(model),
            "--good",
            str(plates / "good"),
            "--out",
            str(tmp_path / "r2"),
            "--tiles",
            "600,96",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 78 and "--tiles 600,96 over the 480x192 photos: a 600x96 tile is larger" in bad.stderr
    assert "Traceback" not in bad.stderr


# -- the daemon over MQTT -----------------------------------------------------------------------


def test_the_daemon_judges_a_tiled_part_in_one_verdict_naming_its_worst_tile(tiled_station, tmp_path, broker):
    root, geometry = tiled_station
    config = write_config(
        tmp_path,
        root,
        broker,
        f"{{source: {root / 'frames'}}}",
        products=f"{{A: {root / 'refs' / 'A'}}}",
        roi="{x: 0, y: 0, width: 72, height: 52}",
        tiles="{width: 36, height: 26, stride_x: 18, stride_y: 13}",
    )
    recorder = Recorder(broker.host, broker.port, "plant/+/verdict")
    code, output = finish(start_station(config))
    assert code == 0, output
    frames = sorted((root / "frames").glob("*.png"))
    recorder.wait_for(lambda: len(recorder.on("/verdict")) >= len(frames), what="a verdict per part")
    verdicts = recorder.json_on("/verdict")
    recorder.close()
    assert len(verdicts) == len(frames)  # one message per part, not per tile
    embedder, references = Embedder(root / "model.onnx"), reference_sets.load(root / "refs" / "A")
    for verdict in verdicts:
        jsonschema.validate(verdict, schema("verdict"))
        frame = read_image(root / "frames" / verdict["source"])
        tiles = np.stack([prepare_crop(frame, embedder.input_spec, roi) for _, roi in geometry.tiles()])
        alone = judge(embedder.embed(to_model_input(tiles, embedder.input_spec)), references)
        worst = int(np.argmax([j.score for j in alone]))
        assert [r["name"] for r in verdict["rois"]] == [name for name, _ in geometry.tiles()]
        assert verdict["verdict"] == ("NG" if any(j.verdict == "NG" for j in alone) else "OK")
        name, roi = geometry.tiles()[worst]
        assert verdict["worst_roi"] == {"name": name, "x": roi.x, "y": roi.y, "width": roi.width, "height": roi.height}
        assert verdict["score"] == pytest.approx(alone[worst].score, rel=1e-5)
        assert verdict["threshold"] == references.threshold
    by_source = {v["source"]: v["verdict"] for v in verdicts}
    # A random projection is a weak embedder: the point is that a flaw in one tile makes its part NG
    flawed = sum(v == "NG" for s, v in by_source.items() if s.startswith("d")) / 20
    assert flawed >= 0.25 and flawed > sum(v == "NG" for s, v in by_source.items() if s.startswith("g")) / 10


def test_camera_calibration_of_a_tiled_station_calibrates_its_tiles_per_part(tiled_station, tmp_path):
    from calibration import live

    root, geometry = tiled_station
    config = parse_config(
        f"station: s\ncamera: {{source: {root / 'good'}}}\nmodel: {root / 'model.onnx'}\n"
        f"reference: {tmp_path / 'refs'}\nstate_dir: {tmp_path / 'state'}\n"
        "roi: {x: 0, y: 0, width: 72, height: 52}\n"
        "tiles: {width: 36, height: 26, stride_x: 18, stride_y: 13}\n"
    )
    result = live.calibrate_from_camera(config, None, count=40, min_good=30, target_false_reject=0.05)
    assert result.saved.n_good == 40 and result.saved.statistics["tiles"] == geometry.record()
    assert result.calibration.fits[result.saved.metric].good_scores.shape == (40,)  # per part
    offline = workflow.calibrate_folders(
        Embedder(root / "model.onnx"), root / "good", [], tmp_path / "folder", "f", min_good=30, tiles=geometry
    )[0]
    assert offline.statistics["tiles"] == result.saved.statistics["tiles"]  # the same record, either path
    assert len(load_inspector(config).regions) == geometry.count  # and the station takes it


def test_the_ng_snapshot_marks_the_worst_tile():
    from station.runtime.integrations.wiring import _box_in_region

    message = {"worst_roi": {"name": "tile-r1c2", "x": 118, "y": 53, "width": 96, "height": 96}}
    assert _box_in_region(message, Roi(10, 5, 500, 400)) == (108, 48, 96, 96)  # in the snapshot's (roi's) pixels
    assert _box_in_region({}, Roi(10, 5, 500, 400)) is None


def test_tiles_without_an_roi_cover_the_reference_s_region_in_frames_of_any_size_holding_it(tiled_station, tmp_path):
    """As photos were fitted (station fit's bundle): each frame is the part, its tiles from the top-left."""
    root, geometry = tiled_station
    config = parse_config(
        f"station: s\ncamera: {{source: {root / 'frames'}}}\nmodel: {root / 'model.onnx'}\n"
        f"reference: {root / 'refs' / 'A'}\ntiles: {{width: 36, height: 26, stride_x: 18, stride_y: 13}}\n"
    )
    inspector = load_inspector(config)
    assert inspector.whole_frame and inspector.roi == Roi(0, 0, 72, 52) and len(inspector.regions) == 9
    frame = read_image(root / "frames" / "d003.png")
    larger = np.pad(frame, ((0, 7), (0, 3)), mode="edge")  # a photo a few pixels larger: the same part
    (part,), (same,) = (
        inspector.judge_crops(inspector.crop(frame)[None]),
        inspector.judge_crops(inspector.crop(larger)[None]),
    )
    assert same.score == part.score and inspector.frame_problem(larger.shape) is None
    assert "does not fit in a 72x50 frame" in inspector.frame_problem((50, 72))
    with pytest.raises(ConfigError, match="was calibrated on whole parts, not tiles"):
        load_inspector(
            parse_config(
                f"station: s\ncamera: {{source: /tmp}}\nmodel: {root / 'model.onnx'}\n"
                f"reference: {root / 'refs' / 'whole'}\ntiles: {{width: 36, height: 26}}\n"
            )
        )
    from calibration import live

    with pytest.raises(ConfigError, match="tiles: without roi: .* set roi:"):
        live.calibrate_from_camera(config, None, count=40, min_good=30)


def test_a_per_position_model_s_tiles_are_calibrated_per_part_too():
    from station.core.preprocess import FeatureGrid

    rng = np.random.default_rng(3)
    grid = FeatureGrid(rows=2, cols=2, channels=3, stride=8)
    good = rng.normal(size=(40, 6, grid.size))
    defect = rng.normal(size=(12, 6, grid.size))
    defect[:, 2, :3] += 9.0  # one position of one tile
    calibration = calibrate_tiles(good, defect, grid=grid, target_false_reject=0.05)
    fitted = calibration.fits["position"]
    assert calibration.metric == "position" and fitted.good_scores.shape == (40,) and fitted.auroc > 0.95
    assert calibration.model.typical.shape == (grid.positions,) and np.all(calibration.model.typical > 0)
