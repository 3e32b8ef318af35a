import textwrap

import pytest

from station.cli import main
from tests.onnx_models import projection_model


@pytest.fixture(scope="module")
def station_files(tmp_path_factory, sim_dataset):
    root = tmp_path_factory.mktemp("station")
    model = projection_model(root / "model.onnx", embedding_dim=32)
    assert (
        main(
            ["calibrate", "--model", str(model), "--good", str(sim_dataset / "good"), "--out", str(root / "refs" / "A")]
        )
        == 0
    )
    return root


def write_config(folder, body):
    path = folder / "station.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_a_ready_station_checks_ok(station_files, tmp_path, capsys):
    config = write_config(
        tmp_path,
        f"""
        station: line1-st1
        camera: {{source: "sim://?seed=1"}}
        model: {station_files / "model.onnx"}
        products: {{A: {station_files / "refs" / "A"}}}
        product: A
        state_dir: {tmp_path / "state"}
    """,
    )
    assert main(["check", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "product A:" in out and "v0001" in out and "ready to run" in out
    assert "judging: 1 region(s) a part with " in out and " ms a part on this machine" in out


def test_check_times_judging_every_region_of_a_part(station_files, tmp_path, capsys):
    config = write_config(
        tmp_path,
        f"""
        station: line1-st1
        camera: {{source: "sim://?seed=1"}}
        model: {station_files / "model.onnx"}
        reference: {station_files / "refs" / "A"}
        state_dir: {tmp_path / "state"}
        rois:
          - {{name: left, x: 0, y: 0, width: 36, height: 26}}
          - {{name: right, x: 100, y: 0, width: 36, height: 26}}
          - {{name: lower, x: 0, y: 100, width: 36, height: 26}}
    """,
    )
    assert main(["check", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "judging: 3 region(s) a part with " in out and "parts/s before publishing" in out


def test_every_problem_is_reported_at_once_with_exit_78(station_files, tmp_path, capsys):
    other_model = projection_model(tmp_path / "other.onnx", seed=5, embedding_dim=32)
    config = write_config(
        tmp_path,
        f"""
        station: line1-st1
        camera: {{source: "sim://"}}
        model: {other_model}
        products: {{A: {station_files / "refs" / "A"}, B: {tmp_path / "missing"}}}
        product: A
        state_dir: {tmp_path / "state"}
        mqtt: {{username: st1, password_file: {tmp_path / "nope.txt"}}}
    """,
    )
    assert main(["check", "-c", str(config)]) == 78
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    config.write_text(config.read_text().replace('source: "sim://"', f"source: {tmp_path / 'no-video.avi'}"))
    assert main(["check", "-c", str(config)]) == 78
    err = capsys.readouterr().err
    assert "4 problem(s)" in err and "camera.source: " in err and "no-video.avi does not exist" in err
    assert "product A:" in err and "recalibrate" in err
    assert "product B:" in err and "not a reference set" in err
    assert "mqtt.password_file" in err


def test_a_config_error_names_the_line_and_key(tmp_path, capsys):
    config = write_config(
        tmp_path,
        """
        station: line1-st1
        camera:
          source: 0
          fsp: 5
        model: m.onnx
        reference: refs/A
    """,
    )
    assert main(["check", "-c", str(config)]) == 78
    err = capsys.readouterr().err
    assert "station.yaml:5: camera.fsp: unknown key (did you mean fps?)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "prefix, expected",
    [
        ('"plant\\0"', "mqtt.topic_prefix: contains a NUL character (U+0000), which MQTT forbids"),
        (f"{'p' * 65_600}", "mqtt.topic_prefix: is 65,600 bytes in UTF-8; MQTT allows at most 65,535"),
        (f"{'p' * 65_511}", "mqtt.topic_prefix: makes the topic"),
    ],
)
def test_check_and_run_refuse_a_prefix_the_broker_would_refuse(station_files, tmp_path, capsys, prefix, expected):
    config = write_config(
        tmp_path,
        f"""
        station: line1-st1
        camera: {{source: "sim://"}}
        model: {station_files / "model.onnx"}
        reference: {station_files / "refs" / "A"}
        state_dir: {tmp_path / "state"}
        mqtt:
          port: 1
          topic_prefix: {prefix}
    """,
    )
    for command in ("check", "run"):
        assert main([command, "-c", str(config)]) == 78
        err = capsys.readouterr().err
        assert "station.yaml:9: " + expected in err and "Traceback" not in err, err
    assert not (tmp_path / "state").exists()  # run stopped at the configuration, before the state folder
