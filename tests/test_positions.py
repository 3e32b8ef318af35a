"""Per-position models (issue 27): the map as the embedding, one Gaussian per position, the worst one named.

Real parts: the frozen backbone exported through export/positions.py and run by onnxruntime,
simulated parts from station/core/simulated_line.py with a blob painted at a known place, reference
sets written and read from disk, and one daemon process against the real mosquitto.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
import yaml

from calibration import positions, thresholds, workflow
from export.gate import gate_failures
from station.core import metrics
from station.core import reference_set as reference_sets
from station.core.embedder import Embedder
from station.core.errors import ModelError
from station.core.imagefolder import GOOD
from station.core.preprocess import FeatureGrid, InputSpec, Roi, box_in_frame, prepare_crop, to_model_input
from station.core.scoring import PositionReference, position_scores
from station.core.simulated_line import FRAME_ROI, render_frame, render_part
from station.core.verdict import NG, judge
from tests.onnx_models import embed_frames, projection_model

torch = pytest.importorskip("torch")
from export.positions import PositionMap, export_position_model, position_offset  # noqa: E402

SCHEMAS = Path(__file__).parent.parent / "station" / "runtime" / "mqtt" / "schemas"
SEED = 5
BLOB = (FRAME_ROI.x + 9, FRAME_ROI.y + 8)  # frame pixels, on the part's body


def good_frame(index: int) -> np.ndarray:
    return render_frame(render_part(SEED, index, defect_class=GOOD), SEED)


def with_blob(frame: np.ndarray, centre=BLOB, level: int = 250) -> np.ndarray:
    out = frame.copy()
    cv2.circle(out, centre, 2, level, -1)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A stride-8 per-position model for 36x26 inputs and a folder of good simulated frames."""
    root = tmp_path_factory.mktemp("positions")
    good = root / "good"
    good.mkdir()
    for index in range(160):
        cv2.imwrite(str(good / f"good_{index:04d}.png"), good_frame(index))
    report = export_position_model(8, (36, 26), root / "model.onnx")
    return {"root": root, "good": good, "model": root / "model.onnx", "report": report}


@pytest.fixture(scope="module")
def calibrated(files):
    embedder = Embedder(files["model"])
    saved, calibration = workflow.calibrate_folders(
        embedder, files["good"], [], files["root"] / "refs" / "A", "A", roi=FRAME_ROI
    )
    return embedder, saved, calibration


# -- the model ---------------------------------------------------------------------------------


def test_the_exported_model_describes_its_map_and_matches_torch(files):
    embedder = Embedder(files["model"])
    grid = embedder.info.positions
    assert grid == FeatureGrid(rows=4, cols=5, channels=40, stride=8, offset=-4)
    assert embedder.info.embedding_dim == 4 * 5 * 40
    report = files["report"]
    assert report["passed"] and report["gate"]["torch_vs_fp32_scale"] > 1.0
    # the embedding is the map row-major, positions then channels
    model = PositionMap(8)
    batch = to_model_input(
        np.stack([prepare_crop(good_frame(i), embedder.input_spec, FRAME_ROI) for i in range(3)]), embedder.input_spec
    )
    with torch.no_grad():
        fmap = model.features(torch.from_numpy(batch)).numpy()  # (n, C, h, w)
    got = embedder.embed(batch).reshape(3, 4, 5, 40)
    assert np.allclose(got[:, 2, 3, :], fmap[:, :, 2, 3], atol=1e-3 * np.abs(fmap).max())


def test_a_plain_model_has_no_grid_and_partial_or_inconsistent_metadata_is_refused(tmp_path):
    assert Embedder(projection_model(tmp_path / "plain.onnx")).info.positions is None
    partial = projection_model(tmp_path / "partial.onnx", embedding_dim=40, metadata={"positions": "2x5"})
    with pytest.raises(ModelError, match="incomplete.*lacks position_channels, position_stride"):
        Embedder(partial)
    wrong = projection_model(
        tmp_path / "wrong.onnx",
        embedding_dim=40,
        metadata={"positions": "2x5", "position_channels": "8", "position_stride": "8"},
    )
    with pytest.raises(ModelError, match="= 80 values, but embedding_dim is 40"):
        Embedder(wrong)
    garbled = projection_model(
        tmp_path / "garbled.onnx",
        embedding_dim=40,
        metadata={"positions": "2by5", "position_channels": "4", "position_stride": "8"},
    )
    with pytest.raises(ModelError, match="invalid per-position metadata"):
        Embedder(garbled)
    fine = projection_model(
        tmp_path / "fine.onnx",
        embedding_dim=40,
        metadata={"positions": "2x5", "position_channels": "4", "position_stride": "8"},
    )
    assert Embedder(fine).info.positions == FeatureGrid(2, 5, 4, 8, 0)


def test_a_channel_subset_is_fixed_by_its_seed_and_named_in_the_metadata(tmp_path):
    report = export_position_model(16, (36, 26), tmp_path / "m.onnx", channels=48, seed=3)
    again = PositionMap(16, channels=48, seed=3)
    assert report["positions"]["channels"] == 48 and Embedder(tmp_path / "m.onnx").info.embedding_dim == 2 * 3 * 48
    assert report["metadata"]["backbone"].endswith("channels " + ",".join(map(str, again.kept)))
    assert report["metadata"]["position_offset"] == str(position_offset(16)) == "-8"


def test_the_torch_onnx_limit_scales_with_a_map_output():
    assert gate_failures({"torch_vs_fp32_max_abs_diff": 2.2e-4, "torch_vs_fp32_scale": 40.0, "int8": None}) == []
    assert gate_failures({"torch_vs_fp32_max_abs_diff": 2.2e-4, "int8": None})  # a trunk's: absolute
    refused = gate_failures({"torch_vs_fp32_max_abs_diff": 5e-3, "torch_vs_fp32_scale": 40.0, "int8": None})
    assert refused and "the output's scale 40" in refused[0]


# -- metrics and scoring -----------------------------------------------------------------------


def test_batched_oas_is_oas_at_every_position_and_the_distance_is_mahalanobis():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(40, 6, 5)) * rng.uniform(0.5, 2, size=(6, 5))
    covariances, shrinkage = metrics.oas_covariances(samples)
    for p in range(6):
        one, alpha = metrics.oas_covariance(samples[:, p])
        assert np.allclose(covariances[p], one, atol=1e-12) and shrinkage[p] == pytest.approx(alpha, abs=1e-12)
    precision = metrics.precisions_from_covariances(covariances)
    mean = samples.mean(axis=0)
    parts = rng.normal(size=(7, 6, 5))
    got = metrics.position_mahalanobis(parts, mean, precision)
    for p in range(6):
        assert np.allclose(got[:, p], metrics.mahalanobis(parts[:, p], mean[p], precision[p]), rtol=1e-5)


def test_a_parts_score_is_the_same_bits_alone_and_in_a_batch():
    rng = np.random.default_rng(1)
    grid = FeatureGrid(10, 12, 32, 8)
    maps = rng.normal(size=(200, grid.size))
    model, _ = positions.fit_position_model(maps, grid)
    batch = position_scores(maps[:70], model)
    for i in (0, 33, 69):
        alone = position_scores(maps[i : i + 1], model)
        assert alone.score[0] == batch.score[i] and alone.index[0] == batch.index[i]
        assert np.array_equal(alone.per_position[0], batch.per_position[i])


def test_scoring_one_part_stays_well_under_a_millisecond():
    rng = np.random.default_rng(2)
    for n_positions, channels in ((100, 32), (400, 64)):
        grid = FeatureGrid(n_positions // 20, 20, channels, 8)
        factor = rng.normal(size=(n_positions, channels, channels)).astype(np.float32) / channels
        precision = factor @ factor.transpose(0, 2, 1) + np.eye(channels, dtype=np.float32)
        model = PositionReference(
            np.zeros((n_positions, channels), np.float32), precision, np.zeros(n_positions, np.float32), grid
        )
        part = rng.normal(size=(1, grid.size)).astype(np.float32)
        position_scores(part, model)
        started = time.perf_counter()
        for _ in range(50):
            position_scores(part, model)
        ms = (time.perf_counter() - started) / 50 * 1e3
        assert ms < 2.0, f"{n_positions} x {channels}: {ms:.2f} ms a part"  # 0.3 ms at 400 x 64 when idle


# -- calibration and the reference set ----------------------------------------------------------


def test_calibration_fits_the_position_metric_out_of_fold_and_saves_format_3(files, calibrated):
    embedder, saved, calibration = calibrated
    assert calibration.metric == "position" and set(calibration.fits) == {"position"}
    summary = yaml.safe_load((saved.path / "reference.yaml").read_text())
    assert summary["format"] == "station-reference-set/3" and summary["metric"] == "position"
    assert summary["positions"] == {"rows": 4, "cols": 5, "channels": 40, "stride": 8, "offset": -4}
    with np.load(saved.path / "arrays.npz") as arrays:
        assert arrays["position_mean"].dtype == np.float32 and arrays["position_mean"].shape == (20, 40)
        assert arrays["position_precision"].shape == (20, 40, 40) and arrays["position_typical"].shape == (20,)
    loaded = reference_sets.load(files["root"] / "refs" / "A")
    assert isinstance(loaded.model, PositionReference) and loaded.threshold == pytest.approx(calibration.threshold)
    # out of fold: an in-sample threshold would sit below the good parts' held-out scores
    model, _ = positions.fit_position_model(
        embed_frames(embedder, [good_frame(i) for i in range(160)], FRAME_ROI), embedder.info.positions
    )
    in_sample = position_scores(embed_frames(embedder, [good_frame(i) for i in range(160)], FRAME_ROI), model).score
    assert np.quantile(in_sample, 0.995) < calibration.threshold
    new_good = embed_frames(embedder, [good_frame(i) for i in range(500, 560)], FRAME_ROI)
    assert np.mean(position_scores(new_good, loaded.model).score > loaded.threshold) < 0.1


def test_a_whole_embedding_metric_is_refused_for_a_per_position_model(files):
    embedder = Embedder(files["model"])
    with pytest.raises(thresholds.CalibrationError, match="judged by 'position'"):
        workflow.calibrate_folders(
            embedder, files["good"], [], files["root"] / "refs" / "X", "X", metric="mahalanobis", roi=FRAME_ROI
        )


def test_older_formats_still_load_and_a_set_rolls_back_across_formats(files, calibrated, tmp_path, sim_dataset):
    plain = Embedder(projection_model(tmp_path / "plain.onnx"))
    root = tmp_path / "refs"
    workflow.calibrate_folders(plain, sim_dataset / "good", [], root, "A")  # format 1, v0001
    embedder = calibrated[0]
    workflow.calibrate_folders(embedder, files["good"], [], root, "A", roi=FRAME_ROI)  # format 3, v0002
    assert isinstance(reference_sets.load(root).model, PositionReference)
    assert reference_sets.rollback(root) == 1
    first = reference_sets.load(root)
    assert first.metric != "position" and first.model.embedding_dim == 32
    reference_sets.rollback(root, 2)
    assert reference_sets.load(root).metric == "position"


def _rewrite_arrays(version: Path, **arrays):
    """Replace arrays.npz and make the checksums agree again (a set written by another tool)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (version / "arrays.npz").write_bytes(buffer.getvalue())
    summary = yaml.safe_load((version / "reference.yaml").read_text())
    summary["arrays_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    body = {k: v for k, v in summary.items() if k != "checksum"}
    summary["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    (version / "reference.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))


def test_damaged_format_3_files_are_refused_naming_the_file(files, calibrated, tmp_path):
    import shutil

    root = tmp_path / "refs"
    shutil.copytree(files["root"] / "refs" / "A", root)
    version = root / (root / "CURRENT").read_text().strip()
    with np.load(version / "arrays.npz") as stored:
        arrays = {name: stored[name] for name in stored.files}

    raw = (version / "arrays.npz").read_bytes()
    (version / "arrays.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(reference_sets.ReferenceSetError, match=f"{version / 'arrays.npz'}: checksum mismatch"):
        reference_sets.load(root)

    _rewrite_arrays(version, **{**arrays, "position_precision": arrays["position_precision"].astype(np.float64)})
    with pytest.raises(reference_sets.ReferenceSetError, match="arrays.npz: position_precision is float64.*float32"):
        reference_sets.load(root)
    _rewrite_arrays(version, **{**arrays, "position_mean": arrays["position_mean"][:10]})
    with pytest.raises(reference_sets.ReferenceSetError, match=r"position_mean is float32 \(10, 40\)"):
        reference_sets.load(root)
    broken = dict(arrays)
    broken["position_typical"] = arrays["position_typical"].copy()
    broken["position_typical"][3] = np.nan
    _rewrite_arrays(version, **broken)
    with pytest.raises(reference_sets.ReferenceSetError, match="expected finite"):
        reference_sets.load(root)
    _rewrite_arrays(version, **{k: v for k, v in arrays.items() if k != "position_typical"})
    with pytest.raises(reference_sets.ReferenceSetError, match="arrays.npz: unusable arrays"):
        reference_sets.load(root)

    _rewrite_arrays(version, **arrays)
    assert reference_sets.load(root).metric == "position"
    text = (version / "reference.yaml").read_text()
    (version / "reference.yaml").write_text(text.replace("stride: 8", "stride: 16"))
    with pytest.raises(reference_sets.ReferenceSetError, match="reference.yaml: checksum mismatch"):
        reference_sets.load(root)


# -- the verdict names where --------------------------------------------------------------------


def test_an_ng_part_is_judged_ng_with_a_box_around_its_blob(calibrated):
    embedder, saved, _ = calibrated
    loaded = reference_sets.load(saved.path.parent)
    spec = embedder.input_spec
    held = 0
    rng = np.random.default_rng(3)
    spots = [(FRAME_ROI.x + int(rng.integers(4, 32)), FRAME_ROI.y + int(rng.integers(4, 22))) for _ in range(12)]
    frames = [with_blob(good_frame(1000 + k), spot, level=int(rng.choice([10, 250]))) for k, spot in enumerate(spots)]
    judgements = judge(embed_frames(embedder, frames, FRAME_ROI), loaded, spec, FRAME_ROI)
    for (x, y), judgement, frame in zip(spots, judgements, frames):
        assert judgement.verdict == NG and set(judgement.distances) == {"position"}
        bx, by, bw, bh = judgement.position.in_frame(frame.shape)
        assert FRAME_ROI.x <= bx and bx + bw <= FRAME_ROI.x + FRAME_ROI.width
        held += bx <= x < bx + bw and by <= y < by + bh
    assert held >= 10, f"the box held the blob {held} times in 12"


def test_a_model_box_maps_through_the_roi_and_its_resize():
    spec = InputSpec(36, 26, "nchw")
    assert box_in_frame((0, 0, 36, 26), spec, Roi(100, 50, 72, 52), (240, 320)) == (100, 50, 72, 52)
    assert box_in_frame((8, 4, 16, 12), spec, Roi(100, 50, 72, 52), (240, 320)) == (116, 58, 16, 16)
    assert box_in_frame((8, 4, 16, 12), spec, None, (52, 72)) == (16, 8, 16, 16)
    assert box_in_frame((3, 3, 5, 5), spec, Roi(10, 10, 18, 13), (240, 320)) == (11, 11, 2, 2)  # outwards


def test_regions_place_the_box_in_their_own_roi(calibrated):
    from station.runtime.mqtt.messages import verdict_message
    from station.runtime.regions import Region, judge_regions

    embedder, saved, _ = calibrated
    loaded = reference_sets.load(saved.path.parent)
    left, right = Roi(20, 30, 36, 26), FRAME_ROI
    regions = (Region("left", left, "A", loaded), Region("right", right, "A", loaded))
    frame = with_blob(good_frame(2000))
    frame[left.y : left.y + 26, left.x : left.x + 36] = good_frame(2001)[
        FRAME_ROI.y : FRAME_ROI.y + 26, FRAME_ROI.x : FRAME_ROI.x + 36
    ]
    crops = np.stack([prepare_crop(frame, embedder.input_spec, r) for r in (left, right)])
    (part,) = judge_regions(embedder.embed(to_model_input(crops, embedder.input_spec)), regions, embedder.input_spec)
    assert part.verdict == NG and part.worst.name == "right"
    message = verdict_message(
        station="st1",
        seq=1,
        source="x",
        part_id=None,
        product="A",
        judgement=part,
        threshold=loaded.threshold,
        metric="position",
        model_id="m",
        reference_version=1,
        latency_ms=1.0,
        ts="2026-01-01T00:00:00.000Z",
        frame_shape=frame.shape,
    )
    jsonschema.validate({"schema_version": 1, **message}, json.loads((SCHEMAS / "verdict.schema.json").read_text()))
    box = message["worst_position"]
    assert box["x"] <= BLOB[0] < box["x"] + box["width"] and box["y"] <= BLOB[1] < box["y"] + box["height"]
    rois = {r["name"]: r for r in message["rois"]}
    assert rois["right"]["worst_position"] == box
    assert rois["left"]["worst_position"]["x"] >= left.x and rois["left"]["worst_position"]["x"] < left.x + 36


def test_the_snapshot_marks_the_box_in_red():
    from station.runtime.integrations.snapshot import encode_jpeg, mark_box

    picture = np.full((52, 72), 128, np.uint8)
    marked = mark_box(picture, (20, 10, 12, 12))
    assert marked.shape == (52, 72, 3) and marked.dtype == np.uint8
    red = (marked[..., 2] > 200) & (marked[..., 0] < 60)
    assert red[8:10, 18:34].all() and red[22:24, 18:34].all() and red[8:24, 18:20].all()  # just outside the box
    assert not red[10:22, 20:32].any() and not red[:8].any() and not red[:, 34:].any()  # inside is left to be seen
    decoded = cv2.imdecode(np.frombuffer(encode_jpeg(marked, 200_000), np.uint8), cv2.IMREAD_COLOR).astype(int)
    assert decoded[9, 25, 2] - decoded[9, 25, 1] > 80 and abs(decoded[16, 25, 2] - decoded[16, 25, 1]) < 30
    edge = mark_box(picture, (0, 0, 10, 10))  # at the picture's corner: clipped, not wrapped
    assert (edge[10:12, :12, 2] == 255).all() and (edge[:10, :10] == 128).all() and not (edge[40:, 40:, 2] == 255).any()


# -- end to end --------------------------------------------------------------------------------


def test_the_daemon_names_the_ng_parts_box_and_the_snapshot_marks_it(tmp_path, files, calibrated, broker):
    from tests.daemon_helpers import wait_until
    from tests.mqtt_helpers import Recorder
    from tests.daemon_helpers import finish, start_station

    embedder, saved, _ = calibrated
    candidates = [good_frame(3000 + index) for index in range(12)]
    ok = [
        frame
        for frame, j in zip(
            candidates, judge(embed_frames(embedder, candidates, FRAME_ROI), saved, embedder.input_spec, FRAME_ROI)
        )
        if j.verdict == "OK"
    ]
    parts = tmp_path / "parts"
    parts.mkdir()
    for index, frame in enumerate(ok[:3]):  # the snapshot is then the blob's (the first NG part's)
        cv2.imwrite(str(parts / f"a_good_{index}.png"), frame)
    cv2.imwrite(str(parts / "b_blob.png"), with_blob(good_frame(3100)))
    config = tmp_path / "station.yaml"
    config.write_text(
        f"station: st1\ncamera: {{source: {parts}}}\nmodel: {files['model']}\n"
        f"reference: {files['root'] / 'refs' / 'A'}\n"
        f"roi: {{x: {FRAME_ROI.x}, y: {FRAME_ROI.y}, width: {FRAME_ROI.width}, height: {FRAME_ROI.height}}}\n"
        f"state_dir: {tmp_path / 'state'}\nmqtt: {{host: 127.0.0.1, port: {broker.port}, topic_prefix: plant}}\n"
        "snapshot: {ng: true}\n"
    )
    recorder = Recorder(broker.host, broker.port, "plant/#")
    code, output = finish(start_station(config))
    assert code == 0, output
    recorder.wait_for(lambda: len(recorder.on("/verdict")) >= 4, what="four verdicts")
    verdicts = {v["source"]: v for v in recorder.json_on("/verdict")}
    verdict_schema = json.loads((SCHEMAS / "verdict.schema.json").read_text())
    for verdict in verdicts.values():
        jsonschema.validate(verdict, verdict_schema)
        assert verdict["metric"] == "position" and "worst_position" in verdict
    # the daemon judges as calibration's own code does
    names = sorted(verdicts)
    expected = judge(
        embed_frames(embedder, [cv2.imread(str(parts / n), cv2.IMREAD_UNCHANGED) for n in names], FRAME_ROI),
        reference_sets.load(files["root"] / "refs" / "A"),
        embedder.input_spec,
        FRAME_ROI,
    )
    assert [verdicts[n]["verdict"] for n in names] == [j.verdict for j in expected]
    assert [verdicts[n]["score"] for n in names] == pytest.approx([j.score for j in expected], rel=1e-6)
    ng = verdicts["b_blob.png"]
    assert ng["verdict"] == "NG" and ng["distances"] == {"position": ng["score"]}
    box = ng["worst_position"]
    assert box["x"] <= BLOB[0] < box["x"] + box["width"] and box["y"] <= BLOB[1] < box["y"] + box["height"]
    wait_until(lambda: any(m.payload for m in recorder.on("/snapshot")), 30, "the NG snapshot")
    jpeg = next(m for m in recorder.on("/snapshot") if m.payload).payload
    picture = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape[:2] == (FRAME_ROI.height, FRAME_ROI.width)
    red = picture[..., 2].astype(int) - picture[..., 1] > 80
    ys, xs = np.nonzero(red)
    left, top = box["x"] - FRAME_ROI.x, box["y"] - FRAME_ROI.y
    assert len(xs) and xs.min() >= left - 3 and xs.max() <= left + box["width"] + 2
    assert ys.min() >= top - 3 and ys.max() <= top + box["height"] + 2
    recorder.close()
