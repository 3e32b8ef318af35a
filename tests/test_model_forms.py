"""A model in two forms (fp32 and int8), each with its reference sets: configuration, the choice at start,
`station check`, camera calibration, `station bench -c` and the daemon's state, reload and changeover.

Real files throughout: a projection model and its static int8 (QDQ) twin quantized by onnxruntime,
reference sets calibrated on simulated parts. Which form is faster is the machine's business: the tests
check that the choice follows the times measured (and the pin), never a time.
"""

from __future__ import annotations

import json
import shutil
import signal
import textwrap

import jsonschema
import pytest

from calibration import live, workflow
from station.cli import main
from station.core import reference_set
from station.core.embedder import Embedder
from station.core.errors import ConfigError, ModelError
from station.runtime.config.station import load_config, parse_config
from station.runtime.inspector import load_inspector
from station.runtime.model_forms import choose, form_of
from station.tools import bench, bench_models
from tests.onnx_models import int8_twin, projection_model
from tests.daemon_helpers import finish, schema, start_station
from tests.mqtt_helpers import Recorder


@pytest.fixture(scope="module")
def files(tmp_path_factory, sim_dataset):
    """model.onnx (fp32) and model.int8.onnx, and products A and B calibrated for each form."""
    root = tmp_path_factory.mktemp("forms")
    fp32 = projection_model(root / "model.onnx", embedding_dim=32)
    int8 = int8_twin(fp32, root / "model.int8.onnx")
    for form, path in (("fp32", fp32), ("int8", int8)):
        embedder = Embedder(path)
        for product in ("A", "B"):
            workflow.calibrate_folders(embedder, sim_dataset / "good", [], root / f"refs.{form}" / product, product)
    return root


def station_yaml(folder, files, camera='{source: "sim://?seed=5", fps: 50}', extra="", broker_port=1883):
    path = folder / "station.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        station: st1
        camera: {camera}
        model: {{fp32: {files / "model.onnx"}, int8: {files / "model.int8.onnx"}}}
        products:
          A: {{fp32: {files / "refs.fp32" / "A"}, int8: {files / "refs.int8" / "A"}}}
          B: {{fp32: {files / "refs.fp32" / "B"}, int8: {files / "refs.int8" / "B"}}}
        product: A
        state_dir: {folder / "state"}
        mqtt: {{host: 127.0.0.1, port: {broker_port}, topic_prefix: plant}}
        stats_interval: 0.5
        """)
        + extra
    )
    return path


def test_a_pin_or_a_reference_the_forms_lack_is_refused_naming_the_line_and_key(files, tmp_path):
    text = station_yaml(tmp_path, files).read_text()
    lines = text.splitlines()
    with pytest.raises(ConfigError) as caught:
        parse_config(text.replace(f"int8: {files / 'model.int8.onnx'}", "") + "model_form: int8\n")
    assert f"station.yaml:{len(lines) + 1}: model_form: pins int8, but model: has only fp32" in str(caught.value)
    with pytest.raises(ConfigError) as caught:  # product B without its int8 reference set
        parse_config(text.replace(f", int8: {files / 'refs.int8' / 'B'}", ""))
    line = next(i for i, text_line in enumerate(lines, 1) if text_line.strip().startswith("B:"))
    assert f"station.yaml:{line}: products.B: needs {{fp32: PATH, int8: PATH}}" in str(caught.value)
    with pytest.raises(ConfigError, match=r"station.yaml:3: model: a model form is one of fp32, int8, got 'int4'"):
        parse_config(text.replace("int8: ", "int4: ", 1))
    with pytest.raises(ConfigError, match=r"model_form: pins fp32, but model: is a single file"):
        parse_config("station: s\ncamera: {source: 0}\nmodel: m.onnx\nreference: r\nmodel_form: fp32\n")
    single = parse_config("station: s\ncamera: {source: 0}\nmodel: m.onnx\nreference: r\n")
    assert single.model_paths == {None: single.model} and single.for_form(None) is single  # as always


def test_the_station_runs_the_form_it_measured_faster_or_the_pinned_one(files, tmp_path):
    config = load_config(station_yaml(tmp_path, files))
    auto = choose(config)
    assert set(auto.per_part_us) == {"fp32", "int8"} and all(us > 0 for us in auto.per_part_us.values())
    assert auto.form == min(auto.per_part_us, key=auto.per_part_us.get) and not auto.pinned
    assert form_of(auto.embedder.info.quantization) == auto.form
    for form, quantization in (("int8", "int8-static"), ("fp32", "fp32")):
        pinned = choose(config.model_copy(update={"model_form": form}))
        assert pinned.form == form and list(pinned.per_part_us) == [form] and pinned.pinned
        assert pinned.embedder.info.quantization == quantization and "pinned by model_form" in pinned.line()
        inspector = load_inspector(config.model_copy(update={"model_form": form}), "B")
        # The chosen form judges with its own reference set: bound to its model, not the other form's.
        assert inspector.reference_set.model_sha256 == inspector.embedder.info.sha256
        assert inspector.reference_set.path.parent.parent == files / f"refs.{form}"
        described = inspector.describe()
        assert described["product"] == "B" and described["model_form"] == form
        assert list(described["model_forms_us"]) == [form]


def test_swapped_or_mismatched_form_files_are_refused_naming_the_file(files, tmp_path):
    swapped = (
        station_yaml(tmp_path, files).read_text().replace("model.onnx", "X").replace("model.int8.onnx", "model.onnx")
    )
    config = parse_config(swapped.replace("X", "model.int8.onnx"))
    with pytest.raises(
        ModelError,
        match=r"model.int8.onnx \(model.fp32\) is a int8-static model, not the fp32 form: give it as model.int8",
    ):
        choose(config)
    other = projection_model(tmp_path / "wide.onnx", width=40)  # another input: not a form of the same model
    int8_twin(other, tmp_path / "wide.int8.onnx")
    config = parse_config(
        station_yaml(tmp_path, files)
        .read_text()
        .replace(str(files / "model.int8.onnx"), str(tmp_path / "wide.int8.onnx"))
    )
    with pytest.raises(ModelError, match="the model's forms take different inputs"):
        choose(config)


def test_check_reports_every_form_and_the_chosen_forms_cost_and_a_broken_int8_set(files, tmp_path, capsys):
    config = station_yaml(tmp_path, files)
    assert main(["check", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "model.fp32 " in out and "model.int8 " in out and "int8-static" in out
    for product in ("A", "B"):
        assert f"product {product} (fp32): " in out and f"product {product} (int8): " in out
    assert "model form " in out and "(auto: the faster on this CPU): " in out and " us a part" in out
    assert "fp32 " in out.split("model form ", 1)[1] and "int8 " in out.split("model form ", 1)[1]
    assert " ms a part on this machine" in out
    copied = tmp_path / "copied"
    shutil.copytree(files, copied)
    arrays = copied / "refs.int8" / "B" / "v0001" / "arrays.npz"
    arrays.write_bytes(arrays.read_bytes()[:-40])
    broken = station_yaml(tmp_path, copied)
    assert main(["check", "-c", str(broken)]) == 78
    err = capsys.readouterr().err
    assert "product B (int8): " in err and "checksum" in err and "Traceback" not in err


def test_camera_calibration_builds_a_reference_set_for_each_form_from_the_same_parts(files, tmp_path, sim_dataset):
    copied = tmp_path / "copied"
    shutil.copytree(files, copied)
    config = load_config(station_yaml(tmp_path, copied, camera=f"{{source: {sim_dataset / 'good'}}}"))
    result = live.calibrate_from_camera(config, "B", count=40)
    assert set(result.forms) == {"fp32", "int8"}
    for form in result.forms:
        loaded = reference_set.load(copied / f"refs.{form}" / "B")
        assert loaded.version == 2 and loaded.n_good == len(result.grabbed) == 40 and loaded.product == "B"
        assert (
            loaded.model_sha256
            == Embedder(copied / ("model.onnx" if form == "fp32" else "model.int8.onnx")).info.sha256
        )
    assert reference_set.load(copied / "refs.fp32" / "A").version == 1  # the other product untouched
    thresholds = {form: saved.threshold for form, (saved, _) in result.forms.items()}
    assert thresholds["fp32"] != thresholds["int8"]  # each form's own threshold


def test_bench_of_a_station_puts_the_form_it_runs_first(files, tmp_path):
    config = load_config(station_yaml(tmp_path, files, extra="model_form: int8\n"))
    models, reference, why, regions = bench_models.station_models(config)
    assert models == [files / "model.int8.onnx", files / "model.onnx"] and reference == files / "refs.int8" / "A"
    assert "model form int8 (pinned by model_form)" in why and regions == bench.bench_latency.REGIONS
    raw = bench.raw_onnxruntime(models[0], runs=60, regions=3)
    assert raw["quantization"] == "int8-static" and raw["regions"]["n"] == 3
    assert raw["regions"]["per_region_us"] == pytest.approx(raw["regions"]["per_part_us"] / 3, abs=0.01)


def test_the_daemon_says_its_form_in_the_state_and_keeps_it_through_changeover_and_a_refused_reload(
    files, tmp_path, broker
):
    copied = tmp_path / "copied"
    shutil.copytree(files, copied)
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = station_yaml(tmp_path, copied, broker_port=broker.port)
    process = start_station(config)
    try:
        recorder.wait_for(lambda: recorder.on("/verdict"), what="first verdict")
        state = recorder.json_on("/state")[-1]
        jsonschema.validate(state, schema("state"))
        timings = state["model_forms_us"]
        assert set(timings) == {"fp32", "int8"} and state["model_form"] == min(timings, key=timings.get)
        expected = Embedder(copied / ("model.onnx" if state["model_form"] == "fp32" else "model.int8.onnx"))
        assert state["model"] == expected.info.short_id
        recorder.publish("plant/st1/command", json.dumps({"id": "c1", "cmd": "product", "product": "B"}))
        recorder.wait_for(lambda: recorder.json_on("/state")[-1]["product"] == "B", what="changeover to B")
        assert recorder.json_on("/state")[-1]["model_form"] in ("fp32", "int8")
        # Pin int8 and break its reference set of B: the reload is refused, B keeps being judged.
        config.write_text(config.read_text() + "model_form: int8\n")
        arrays = copied / "refs.int8" / "B" / "v0001" / "arrays.npz"
        arrays.write_bytes(arrays.read_bytes()[:-40])
        recorder.publish("plant/st1/command", json.dumps({"id": "r1", "cmd": "reload"}))
        recorder.wait_for(lambda: any(a["id"] == "r1" for a in recorder.json_on("/command/result")), what="r1")
        answer = next(a for a in recorder.json_on("/command/result") if a["id"] == "r1")
        assert answer["ok"] is False and "checksum mismatch" in answer["error"]
        before = len(recorder.on("/verdict"))
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > before + 10, what="still judging")
        assert recorder.json_on("/verdict")[-1]["product"] == "B"
        # Mended, the reload runs the pinned form, said in the state with its time.
        shutil.copyfile(files / "refs.int8" / "B" / "v0001" / "arrays.npz", arrays)
        process.send_signal(signal.SIGHUP)
        recorder.wait_for(
            lambda: recorder.json_on("/state")[-1].get("model_forms_us", {}).keys() == {"int8"},
            what="reloaded pinned to int8",
        )
        state = recorder.json_on("/state")[-1]
        jsonschema.validate(state, schema("state"))
        assert state["model_form"] == "int8" and state["model"] == Embedder(copied / "model.int8.onnx").info.short_id
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, timeout=15)
        recorder.close()
    assert code == 0, output
    assert "model form " in output and "(auto: the faster on this CPU)" in output and "(pinned by model_form)" in output
    assert "refused" in output and "Traceback" not in output
