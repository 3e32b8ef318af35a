"""rois: several named regions per part: configuration, one embedder call, batch independence, the daemon."""

from __future__ import annotations

import cv2
import jsonschema
import numpy as np
import pytest

from calibration import workflow
from station.core import reference_set as reference_sets
from station.core.embedder import Embedder
from station.core.errors import ConfigError
from station.core.imagefolder import list_images, read_image
from station.core.preprocess import Roi, prepare_crop, to_model_input
from station.core.verdict import judge
from station.runtime.config.station import parse_config
from station.runtime.inspector import Inspector
from station.runtime.regions import Region
from tests.mqtt_helpers import Recorder
from tests.daemon_helpers import finish, schema, start_station, write_config

BASE = "station: s\ncamera: {source: /tmp}\nmodel: m.onnx\n"
PRODUCTS = "products: {A: r/A, B: r/B}\nproduct: A\n"


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return str(caught.value)


def test_rois_are_parsed_with_each_region_s_product():
    config = parse_config(
        BASE + PRODUCTS + "rois:\n  - {name: left, x: 0, y: 0, width: 36, height: 26}\n"
        "  - {name: right, x: 36, y: 0, width: 36, height: 26, product: B}\n"
    )
    assert [(r.name, r.product, r.to_roi()) for r in config.rois] == [
        ("left", None, Roi(0, 0, 36, 26)),
        ("right", "B", Roi(36, 0, 36, 26)),
    ]
    assert config.roi is None and parse_config(BASE + "reference: r/A\n").rois is None


def test_region_problems_name_the_line_and_key():
    text = (
        BASE + PRODUCTS + "rois:\n  - {name: left, x: 0, y: 0, width: 36, height: 26}\n"
        "  - name: left\n    x: -1\n    y: 0\n    width: 36\n    height: 26\n    product: C\n"
        "  - {name: third, x: 0, y: 0, width: 36, height: 26, colour: red}\n"
    )
    found = problems(text).splitlines()
    assert "station.yaml:8: rois.1.name: another region is already named 'left': region names must be unique" in found
    assert any(
        line.startswith("station.yaml:9: rois.1.x: Input should be greater than or equal to 0") for line in found
    )
    assert "station.yaml:13: rois.1.product: must be one of the products (A, B), got 'C'" in found
    assert "station.yaml:14: rois.2.colour: unknown key" in found


def test_roi_and_rois_exclude_each_other_and_a_region_product_needs_products():
    both = (
        BASE
        + "reference: r/A\nroi: {x: 0, y: 0, width: 4, height: 4}\nrois:\n  - {name: a, x: 0, y: 0, width: 4, height: 4}\n"
    )
    assert problems(both) == "station.yaml:6: rois: give roi (one region) or rois (named regions), not both"
    single = BASE + "reference: r/A\nrois:\n  - {name: a, x: 0, y: 0, width: 4, height: 4, product: B}\n"
    assert "station.yaml:6: rois.0.product: a region's product needs products:" in problems(single)
    assert (
        problems(BASE + "reference: r/A\nrois: []\n") == "station.yaml:5: rois: name at least one region (or use roi:)"
    )


# -- batch independence with the station's int8 model ------------------------------------------


@pytest.fixture(scope="module")
def per_row_model(tmp_path_factory, sim_dataset):
    """A small mlp trunk quantized dynamic int8 twice: with per-part scales (what `station export` writes)
    and as the former Scan over parts (one part per loop), with a reference set for the first."""
    pytest.importorskip("torch", reason="the train extra is not installed")
    import onnx

    from export import onnx_export
    from tests.onnx_models import scan_per_part
    from export.train import TrainConfig, train

    folder = tmp_path_factory.mktemp("per_row")
    checkpoint = train(sim_dataset, folder / "t.pt", TrainConfig(arch="mlp", epochs=1, members=1), progress=False)
    fp32 = folder / "fp32.onnx"
    onnx_export.export_model(checkpoint.checkpoint, fp32, onnx_export.ExportOptions(fp32=True, calib_data=sim_dataset))
    model, scan = folder / "model.onnx", folder / "scan.onnx"
    onnx_export.quantize(fp32, model, "dynamic", None, onnx_export.DEFAULT_REDUCE_RANGE)  # per-part scales
    onnx_export._run_quantizer(folder / "prepared.onnx", scan, "dynamic", None, onnx_export.DEFAULT_REDUCE_RANGE)
    scan_per_part(scan)
    props = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props} | {"quantization": "int8-dynamic"}
    for path in (model, scan):
        onnx_export.write_metadata(path, props)
    workflow.calibrate_folders(Embedder(model), sim_dataset / "good", [], folder / "refs" / "A", "A")
    return model, folder / "refs" / "A", Embedder(scan)


def test_per_part_scales_give_the_scan_model_s_embeddings_alone_and_in_any_batch(per_row_model, sim_dataset):
    model, _, scan_embedder = per_row_model
    embedder = Embedder(model)
    assert embedder.info.quantization == "int8-dynamic" and not embedder._per_part  # one session call per batch
    images = [read_image(p) for p in list_images(sim_dataset)[:64]]
    batch = to_model_input(np.stack([prepare_crop(i, embedder.input_spec) for i in images]), embedder.input_spec)
    bright = np.full_like(batch[:1], 3.0)  # a neighbour that would widen a whole-tensor int8 range
    whole = embedder.session.run(None, {"input": np.concatenate([batch, bright])})[0][:-1]
    alone = np.concatenate([embedder.session.run(None, {"input": batch[i : i + 1]})[0] for i in range(len(batch))])
    np.testing.assert_array_equal(whole, alone)
    np.testing.assert_array_equal(alone, scan_embedder.embed(batch))  # the accuracy of the per-part model, bit for bit


def test_a_region_scores_the_same_alone_and_among_eight(per_row_model, sim_dataset):
    model, reference, _ = per_row_model
    alone_inspector = Inspector.load(model, reference, "A", None)
    refs = alone_inspector.reference_set
    regions = tuple(Region(f"r{i}", Roi(36 * i, 0, 36, 26), "A", refs) for i in range(8))
    eight = Inspector(alone_inspector.embedder, refs, "A", Roi(0, 0, 288, 26), regions)
    paths = list_images(sim_dataset)
    frames = [np.hstack([read_image(paths[(f * 8 + i) % len(paths)]) for i in range(8)]) for f in range(6)]
    parts = eight.judge_crops(np.stack([eight.crop(frame) for frame in frames]))
    for frame, part in zip(frames, parts):
        assert part.verdict == ("NG" if any(r.verdict == "NG" for r in part.regions) else "OK")
        for i, region in enumerate(part.regions):
            crop = prepare_crop(frame, alone_inspector.embedder.input_spec, Roi(36 * i, 0, 36, 26))
            (single,) = alone_inspector.judge_crops(crop[None])
            assert region.name == f"r{i}" and region.score == single.score
            np.testing.assert_equal(region.distances, single.distances)  # bit for bit (NaN where undefined)


# -- the daemon over MQTT: two regions, two reference sets ---------------------------------------


def test_the_daemon_judges_two_regions_against_two_reference_sets(tmp_path, station_files, sim_dataset, broker):
    frames = tmp_path / "frames"
    frames.mkdir()
    paths = list_images(sim_dataset)
    for i in range(40):  # left: a part of the station's product A; right: another part, judged as product B
        cv2.imwrite(str(frames / f"frame_{i:03d}.png"), np.hstack([read_image(paths[i]), read_image(paths[-1 - i])]))
    rois = (
        "\n  - {name: left, x: 0, y: 0, width: 36, height: 26}"
        "\n  - {name: right, x: 36, y: 0, width: 36, height: 26, product: B}"
    )
    config = write_config(tmp_path, station_files, broker, f"{{source: {frames}}}", rois=rois)
    recorder = Recorder(broker.host, broker.port, "plant/+/verdict")
    code, output = finish(start_station(config))
    assert code == 0, output
    recorder.wait_for(lambda: len(recorder.on("/verdict")) >= 40, what="40 verdicts")
    verdicts = recorder.json_on("/verdict")
    recorder.close()
    assert len(verdicts) == 40  # one message per part, not per region
    embedder = Embedder(station_files / "model.onnx")
    refs = {p: reference_sets.load(station_files / "refs" / p) for p in "AB"}
    for verdict in sorted(verdicts, key=lambda v: v["source"]):
        jsonschema.validate(verdict, schema("verdict"))
        left, right = verdict["rois"]
        assert (left["name"], left["product"], left["metric"]) == ("left", "A", "mahalanobis")
        assert (right["name"], right["product"], right["metric"]) == ("right", "B", "minkowski")
        assert verdict["verdict"] == ("NG" if "NG" in (left["verdict"], right["verdict"]) else "OK")
        frame = read_image(frames / verdict["source"])
        for region, roi in ((left, Roi(0, 0, 36, 26)), (right, Roi(36, 0, 36, 26))):
            crop = prepare_crop(frame, embedder.input_spec, roi)
            (expected,) = judge(
                embedder.embed(to_model_input(crop[None], embedder.input_spec)), refs[region["product"]]
            )
            assert region["verdict"] == expected.verdict and region["score"] == pytest.approx(expected.score, rel=1e-5)
    assert {v["verdict"] for v in verdicts} == {"OK", "NG"}


# -- station bench: latency to PUBACK at a paced rate, and 1 against 8 regions ------------------


def test_bench_measures_grab_to_puback_latency_and_region_throughput(per_row_model, sim_dataset, mosquitto, tmp_path):
    from station.tools import bench_latency

    model, reference, _ = per_row_model
    broker = (mosquitto.host, mosquitto.port)
    latency = bench_latency.paced_latency(model, reference, sim_dataset, broker, tmp_path, rate=100.0, count=80)
    assert latency["parts"] == 80  # every verdict's PUBACK was seen, each timed from its frame's grab
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"] < 5000
    regions = bench_latency.region_throughput(model, reference, sim_dataset, broker, tmp_path, count=120)
    assert regions["frames"] == 120 and regions["regions"] == 8
    assert regions["one_region_parts_per_s"] > 0 and regions["many_regions_parts_per_s"] > 0
    assert regions["ratio"] == pytest.approx(
        regions["many_regions_parts_per_s"] / regions["one_region_parts_per_s"], abs=2e-3
    )
    lines = bench_latency.format_lines({"latency": latency, "regions": regions})
    assert "grabbed -> PUBACK" in lines[0] and "8 regions" in lines[1]


def test_station_check_names_a_region_outside_the_frames(tmp_path, station_files, sim_dataset, broker):
    from station.runtime.config.station import load_config
    from station.tools.check import check_station

    rois = (
        "\n  - {name: left, x: 0, y: 0, width: 36, height: 26}"
        "\n  - {name: far, x: 30, y: 0, width: 36, height: 26, product: B}"
    )
    result = check_station(
        load_config(write_config(tmp_path, station_files, broker, f"{{source: {sim_dataset}}}", rois=rois))
    )
    assert result.problems == ["roi: region far: ROI x=30 y=0 36x26 does not fit in a 36x26 frame"]
    assert any(line.startswith("product B:") for line in result.summary)


def test_the_daemon_refuses_to_start_when_a_region_does_not_fit(tmp_path, station_files, sim_dataset, broker):
    rois = "\n  - {name: left, x: 0, y: 0, width: 36, height: 26}\n  - {name: far, x: 30, y: 0, width: 36, height: 26}"
    code, output = finish(
        start_station(write_config(tmp_path, station_files, broker, f"{{source: {sim_dataset}}}", rois=rois))
    )
    assert code == 78, output
    assert "roi: region far: ROI x=30 y=0 36x26 does not fit in a 36x26 frame" in output
