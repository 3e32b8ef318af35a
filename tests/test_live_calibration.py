"""`station calibrate -c station.yaml`: distinct parts from the configured camera into a reference set."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from calibration import live
from station.core import reference_set
from station.core import simulated_line as simulate
from station.runtime.sources import open_source
from station.cli import main
from station.runtime.config.station import load_config
from station.core.embedder import Embedder
from station.core.errors import ConfigError
from station.core.imagefolder import GOOD
from station.core.preprocess import InputSpec, prepare_crop
from tests.onnx_models import projection_model

ROI = simulate.FRAME_ROI
NOISE_SIGMA = 3.0  # the simulated sensor's, per capture


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return projection_model(tmp_path_factory.mktemp("model") / "projection.onnx", embedding_dim=32)


def write_config(folder: Path, model: Path, source: str, products=("A", "B"), product="A") -> Path:
    config = {
        "station": "line1",
        "camera": {"source": source},
        "roi": {"x": ROI.x, "y": ROI.y, "width": ROI.width, "height": ROI.height},
        "model": str(model),
        "state_dir": str(folder / "state"),
    }
    if products is None:
        config["reference"] = "refs/single"
    else:
        config["products"] = {name: f"refs/{name}" for name in products}
        config["product"] = product
    path = folder / "station.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def good_frames(seed: int, n: int) -> list[np.ndarray]:
    """Full frames of the first n good parts of the simulated line."""
    frames, index = [], 0
    while len(frames) < n:
        if simulate.part_class(seed, index) == GOOD:
            frames.append(simulate.render_frame(simulate.render_part(seed, index), seed))
        index += 1
    return frames


def recapture(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same scene seen again: against the first capture, the difference carries
    the noise of two independent captures (sigma 3 * sqrt(2))."""
    noisy = frame.astype(np.float64) + rng.normal(0, NOISE_SIGMA * np.sqrt(2), frame.shape[:2])[..., None]
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def test_threshold_sits_between_sensor_noise_and_different_parts():
    spec = InputSpec()
    rng = np.random.default_rng(1)
    frames = [simulate.render_frame(simulate.render_part(4, i), 4) for i in range(150)]
    crops = [prepare_crop(f, spec, ROI) for f in frames]
    noise_only = [
        live.mean_abs_difference(c, prepare_crop(recapture(f, rng), spec, ROI)) for f, c in zip(frames, crops)
    ]
    consecutive = [live.mean_abs_difference(a, b) for a, b in zip(crops, crops[1:])]
    assert max(noise_only) < live.DEFAULT_MIN_CHANGE < min(consecutive)
    # Same scene, fresh noise: about 3 * sqrt(2) * sqrt(2 / pi) = 3.39 grey levels.
    assert np.mean(noise_only) == pytest.approx(NOISE_SIGMA * np.sqrt(2) * np.sqrt(2 / np.pi), rel=0.05)


def test_calibrates_the_asked_count_from_a_simulated_camera(tmp_path, model, capsys):
    config = write_config(tmp_path, model, "sim://?seed=5&count=200")
    assert main(["calibrate", "-c", str(config), "--product", "B", "--count", "40", "--min-good", "30"]) == 0
    out = capsys.readouterr()
    assert "40 distinct parts from 40 frames (0 unchanged skipped)" in out.out
    assert "rule of three" in out.err  # 40 parts cannot support the default 0.5 % target: said, with the number
    saved = reference_set.load(tmp_path / "refs" / "B")
    assert (saved.product, saved.n_good, saved.version) == ("B", 40, 1)
    assert saved.model_sha256 == Embedder(model).info.sha256
    assert saved.statistics["source"] == {
        "camera": "sim://?seed=5&count=200",
        "frames_seen": 40,
        "skipped_unchanged": 0,
        "min_change": live.DEFAULT_MIN_CHANGE,
    }
    assert not (tmp_path / "refs" / "A").exists()  # only the product asked for
    # The default product is the configured one, and each run adds a version.
    assert main(["calibrate", "-c", str(config), "--count", "30"]) == 0
    assert reference_set.load(tmp_path / "refs" / "A").n_good == 30
    assert main(["calibrate", "-c", str(config), "--count", "35", "--product", "B"]) == 0
    assert reference_set.load(tmp_path / "refs" / "B").version == 2
    assert main(["calibrate", "-c", str(config), "--product", "B", "--rollback"]) == 0
    assert reference_set.load(tmp_path / "refs" / "B").n_good == 40


def test_unchanged_frames_are_skipped(tmp_path, model, capsys):
    """Each part three times in a row (once byte-identical, once with fresh sensor noise):
    only the distinct parts go into the reference set."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "frames"
    folder.mkdir()
    distinct = good_frames(6, 34)
    for k, frame in enumerate(distinct):
        for copy, image in enumerate((frame, frame, recapture(frame, rng))):
            cv2.imwrite(str(folder / f"frame_{k:03d}_{copy}.png"), image)
    config = write_config(tmp_path, model, str(folder))

    grabbed = live.grab_distinct_crops(open_source(str(folder)), ROI, InputSpec(), count=1000)
    assert (len(grabbed), grabbed.frames_seen, grabbed.skipped) == (34, 102, 68)
    assert grabbed.sources == [f"frame_{k:03d}_0.png" for k in range(34)]

    assert main(["calibrate", "-c", str(config), "--count", "100", "--min-good", "30"]) == 0
    out = capsys.readouterr()
    assert "34 distinct parts from 102 frames (68 unchanged skipped)" in out.out
    assert "ended after 34 of the 100 parts" in out.err
    saved = reference_set.load(tmp_path / "refs" / "A")
    assert saved.n_good == 34
    # With no skipping threshold every frame would count as a part.
    assert len(live.grab_distinct_crops(open_source(str(folder)), ROI, InputSpec(), 1000, min_change=0.0)) == 102


def test_refuses_to_finish_under_the_minimum(tmp_path, model, capsys):
    config = write_config(tmp_path, model, "sim://?seed=7&count=25")
    assert main(["calibrate", "-c", str(config), "--count", "40"]) == 65
    err = capsys.readouterr().err
    assert "ended after 25 distinct parts" in err and "at least 30" in err and "nothing was saved" in err
    assert reference_set.versions(tmp_path / "refs" / "A") == []
    # --count under --min-good is refused before the camera opens.
    assert main(["calibrate", "-c", str(config), "--count", "20"]) == 78
    assert "--count 20 is below the minimum of 30" in capsys.readouterr().err


def test_refuses_a_product_the_config_does_not_list(tmp_path, model, capsys):
    config = write_config(tmp_path, model, "sim://?seed=1&count=50")
    with pytest.raises(ConfigError, match=r"'C' is not in the configuration's products: A, B"):
        live.calibrate_from_camera(load_config(config), "C", count=40)
    assert main(["calibrate", "-c", str(config), "--product", "C", "--count", "40"]) == 78
    assert "'C' is not in the configuration's products" in capsys.readouterr().err
    assert not (tmp_path / "refs").exists()

    single = tmp_path / "single"
    single.mkdir()
    config = write_config(single, model, "sim://?seed=1&count=50", products=None)
    with pytest.raises(ConfigError, match="single reference"):
        live.calibrate_from_camera(load_config(config), "A", count=40)
    # A single reference not calibrated yet is named by its folder, as `station check` reports it.
    result = live.calibrate_from_camera(load_config(config), None, count=30)
    assert (result.saved.product, result.saved.path.parent) == ("single", single / "refs" / "single")


def test_a_single_reference_keeps_the_product_its_set_names(tmp_path, model):
    """A `station fit` bundle's reference/ holds product P: the station's verdicts say P, so recalibrating it from
    the camera (and `station check`) must call it P too, not 'reference'."""
    config = write_config(tmp_path, model, "sim://?seed=1&count=50", products=None)
    first = live.calibrate_from_camera(load_config(config), None, count=30)
    saved = reference_set.load(first.saved.path.parent)
    reference_set.save(tmp_path / "refs" / "single", replace(saved, product="P"))
    loaded = load_config(config)
    assert loaded.product_references == {"P": tmp_path / "refs" / "single"}
    assert loaded.reference_for() == (None, tmp_path / "refs" / "single")  # the runtime reads P from the set
    assert live.calibrate_from_camera(loaded, None, count=30).saved.product == "P"


def test_camera_and_folder_modes_do_not_mix(tmp_path, model, capsys):
    config = write_config(tmp_path, model, "sim://?seed=1&count=50")
    assert main(["calibrate", "-c", str(config), "--model", str(model), "--count", "30"]) == 78
    assert "--model belong to the folder mode" in capsys.readouterr().err
    assert (
        main(
            ["calibrate", "--model", str(model), "--good", str(tmp_path), "--out", str(tmp_path / "r"), "--count", "30"]
        )
        == 78
    )
    assert "--count and --min-change need -c/--config" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(model), "--good", str(tmp_path)]) == 78
    assert "needs --out (folder mode) or -c/--config" in capsys.readouterr().err


def test_a_named_region_calibrates_its_own_product(tmp_path, model, capsys):
    """rois: `--roi NAME` grabs that region's crops into the reference set of the product it is judged against."""
    config = write_config(tmp_path, model, "sim://?seed=5&count=200")
    text = config.read_text().replace(
        f"roi:\n  height: {ROI.height}\n  width: {ROI.width}\n  x: {ROI.x}\n  y: {ROI.y}\n", ""
    )
    rois = (
        f"rois:\n  - {{name: body, x: {ROI.x}, y: {ROI.y}, width: {ROI.width}, height: {ROI.height}}}\n"
        f"  - {{name: shifted, x: {ROI.x + 4}, y: {ROI.y}, width: {ROI.width}, height: {ROI.height}, product: B}}\n"
    )
    config.write_text(text + rois)
    assert main(["calibrate", "-c", str(config), "--roi", "shifted", "--count", "30"]) == 0
    saved = reference_set.load(tmp_path / "refs" / "B")
    assert (saved.product, saved.n_good, saved.statistics["source"]["region"]) == ("B", 30, "shifted")
    assert not (tmp_path / "refs" / "A").exists()
    assert main(["calibrate", "-c", str(config), "--count", "30"]) == 78
    assert "name the one to calibrate with --roi NAME" in capsys.readouterr().err
    assert main(["calibrate", "-c", str(config), "--roi", "lid", "--count", "30"]) == 78
    assert "'lid' is not a region of the configuration: its regions are body, shifted" in capsys.readouterr().err
    assert main(["calibrate", "-c", str(config), "--roi", "shifted", "--product", "A", "--count", "30"]) == 78
    assert "judged against product 'B', not 'A'" in capsys.readouterr().err
    assert main(["calibrate", "-c", str(config), "--roi", "body", "--count", "30"]) == 0  # the station's product
    assert reference_set.load(tmp_path / "refs" / "A").statistics["source"]["region"] == "body"
