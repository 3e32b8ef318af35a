import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from station.runtime.config.station import StationConfig, load_config, parse_config
from station.core.errors import ConfigError

VALID = """\
station: line1-st1
camera:
  source: 0
  loop: false
  fps: 0
roi: {x: 140, y: 107, width: 36, height: 26}
model: model.onnx
reference: refs/A
trigger: continuous
state_dir: /var/lib/station/line1-st1
mqtt:
  host: 127.0.0.1
  port: 1883
  topic_prefix: inspection
  qos: 1
  username: station
  password_credential: mqtt-password
  tls: {ca: tls/ca.pem, cert: tls/st1.pem, key: tls/st1.key}
  keepalive: 30
stats_interval: 10
outbox: {max_messages: 100000}
keep_crops: {ng: true, ok_sample_rate: 0.0, max_mb: 200}
runtime: {threads: 1}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "station.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    return str(error.value).splitlines()


def test_the_documented_example_parses_into_frozen_typed_models(tmp_path):
    config = load_config(write(tmp_path, VALID), env={})
    assert config.station == "line1-st1"
    assert config.camera.source == 0 and config.camera.fps == 0.0
    assert config.roi.to_roi().width == 36
    assert config.mqtt.port == 1883 and config.mqtt.qos == 1
    # Relative paths resolve against the config file's folder, absolute ones stay.
    assert config.model == tmp_path / "model.onnx"
    assert config.reference_for()[1] == tmp_path / "refs" / "A"
    assert config.mqtt.tls.key == tmp_path / "tls" / "st1.key"
    assert config.state_dir == Path("/var/lib/station/line1-st1")
    with pytest.raises(ValidationError, match="frozen"):
        config.mqtt.port = 1
    assert StationConfig.model_config["extra"] == "forbid"


def test_parsing_never_touches_the_model_or_reference_files(tmp_path):
    config = load_config(write(tmp_path, VALID), env={})
    assert not config.model.exists() and not config.reference_for()[1].exists()


def test_minimal_config_takes_defaults_and_state_dir_from_systemd(tmp_path):
    text = "station: st9\ncamera: {source: 'sim://?seed=3&count=5'}\nmodel: m.onnx\nreference: r\n"
    config = load_config(write(tmp_path, text), env={"STATE_DIRECTORY": "/var/lib/station-st9:/other"})
    assert config.state_dir == Path("/var/lib/station-st9")
    assert config.trigger == "continuous" and config.roi is None
    assert config.outbox.max_messages == 100_000 and config.mqtt.topic_prefix == "inspection"
    assert load_config(write(tmp_path, text), env={}).state_dir == Path("/var/lib/station/st9")


def test_products_select_the_reference(tmp_path):
    text = VALID.replace("reference: refs/A", "products: {A: refs/A, B: /srv/refs/B}\nproduct: B")
    assert load_config(write(tmp_path, text), env={}).reference_for()[1] == Path("/srv/refs/B")


def test_wrong_type_names_line_and_key_path(tmp_path):
    lines = problems(tmp_path, VALID.replace("port: 1883", "port: abc"))
    assert len(lines) == 1
    assert lines[0].startswith(f"{tmp_path / 'station.yaml'}:13: mqtt.port: Input should be a valid integer")


def test_unknown_key_names_line_and_key_path_and_suggests(tmp_path):
    lines = problems(tmp_path, VALID.replace("  keepalive: 30", "  keepalive: 30\n  keep_alive: 5"))
    assert lines == [f"{tmp_path / 'station.yaml'}:20: mqtt.keep_alive: unknown key (did you mean keepalive?)"]


def test_every_problem_is_listed_in_file_order(tmp_path):
    text = VALID.replace("fps: 0", "fps: -1").replace("qos: 1", "qos: 3").replace("threads: 1", "threads: x")
    lines = problems(tmp_path, text)
    assert [line.split(": ")[1] for line in lines] == ["camera.fps", "mqtt.qos", "runtime.threads"]
    assert [int(line.split(":")[1]) for line in lines] == [5, 15, 23]


def test_missing_key_is_named(tmp_path):
    lines = problems(tmp_path, VALID.replace("model: model.onnx\n", ""))
    assert any(": model: Field required" in line for line in lines)


def test_invalid_yaml_gives_the_line(tmp_path):
    lines = problems(tmp_path, VALID.replace("  port: 1883", "  port: [1883"))
    assert len(lines) == 1 and "invalid YAML" in lines[0]
    assert lines[0].startswith(f"{tmp_path / 'station.yaml'}:")
    assert int(lines[0].split(":")[1]) in (13, 14)


def test_not_a_mapping_and_empty_file(tmp_path):
    assert "mapping" in problems(tmp_path, "- a\n- b\n")[0]
    assert "empty" in problems(tmp_path, "# nothing\n")[0]


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("key", ["password", "token"])
def test_secret_in_yaml_is_refused_with_where_it_belongs(tmp_path, key):
    lines = problems(tmp_path, VALID.replace("  username: station", f"  username: station\n  {key}: hunter2"))
    assert len(lines) == 1, lines
    assert ":17: mqtt." + key in lines[0]
    assert "password_file" in lines[0] and "password_credential" in lines[0]
    assert "hunter2" not in lines[0]


@pytest.mark.parametrize(
    "where, text, advice",
    [
        (
            "camera",
            VALID.replace("  fps: 0\n", "  fps: 0\n  password: hunter2\n"),
            ": use camera.credentials_file or camera.credentials_credential (a systemd credential)",
        ),
        ("opcua", VALID + "opcua: {users_file: users, password: hunter2}\n", ": use opcua.users_file"),
        (
            "web",
            VALID + "web: {password: hunter2}\n",
            ": use web.users_file or web.users_credential (a systemd credential)",
        ),
        ("keep_crops", VALID.replace("keep_crops: {", "keep_crops: {password: hunter2, "), " (no key here takes one)"),
        ("mqtt.tls", VALID.replace("tls: {", "tls: {password: hunter2, "), " (no key here takes one)"),
    ],
)
def test_a_secret_is_told_a_key_its_section_has(tmp_path, where, text, advice):
    lines = problems(tmp_path, text)
    assert any(f"{where}.password: never put a secret in the configuration file{advice}" in line for line in lines), (
        lines
    )
    assert not any("hunter2" in line for line in lines)


def test_every_secret_home_is_a_key_of_its_section():
    from station.runtime.config.station import SECRET_HOMES, StationConfig

    for (section,), keys in SECRET_HOMES.items():
        model = StationConfig.model_fields[section].annotation
        model = next(arg for arg in getattr(model, "__args__", (model,)) if arg is not type(None))
        assert {key for key in keys if key} <= set(model.model_fields), section


def test_every_section_that_takes_a_secret_is_given_its_keys():
    """A section with a key for a secret's file or systemd credential is in SECRET_HOMES, so `password:` there is
    told that key, not "no key here takes one"."""
    from station.runtime.config.station import SECRET_HOMES, StationConfig

    for section, field in StationConfig.model_fields.items():
        model = next(
            (
                arg
                for arg in getattr(field.annotation, "__args__", (field.annotation,))
                if isinstance(arg, type) and hasattr(arg, "model_fields")
            ),
            None,
        )
        if model is None:
            continue
        secret_keys = {
            key
            for key in model.model_fields
            if key.endswith("_credential") or key in ("password_file", "credentials_file", "users_file")
        }
        if secret_keys:
            assert (section,) in SECRET_HOMES, section
            assert secret_keys == {key for key in SECRET_HOMES[(section,)] if key}, section


@pytest.mark.parametrize("name", ["../A", "a/b", "..", "x..y", "a\\\\b"])
def test_unsafe_product_names_are_refused(tmp_path, name):
    as_product = VALID.replace("reference: refs/A", f'products: {{"{name}": refs/A}}\nproduct: "{name}"')
    lines = problems(tmp_path, as_product)
    assert any("not a safe product name" in line and ":8: products" in line for line in lines), lines
    assert any("not a safe product name" in line and ":9: product" in line for line in lines), lines


@pytest.mark.parametrize(
    "change, expected",
    [
        (("reference: refs/A", "products: {A: a}\nproduct: C"), "product must be one of the products (A)"),
        (("reference: refs/A\n", ""), "give reference: PATH, or products"),
        (("station: line1-st1", "station: line 1/st1"), "station: String should match pattern"),
        (("topic_prefix: inspection", "topic_prefix: plant/#"), "mqtt.topic_prefix"),
        (("source: 0", "source: ftp://cam"), "unsupported URL scheme"),
        (("source: 0", "source: sim://?seed=x"), "seed and count must be integers"),
        (("source: 0", "source: true"), "camera.source: must be a device index"),
        (("password_credential: mqtt-password", "password_credential: ../etc/shadow"), "mqtt.password_credential"),
        (("cert: tls/st1.pem, ", ""), "cert and key go together"),
    ],
)
def test_semantic_errors_are_explained(tmp_path, change, expected):
    lines = problems(tmp_path, VALID.replace(*change))
    assert any(expected in line for line in lines), lines


def test_camera_sources_are_normalised(tmp_path):
    def source(value):
        return load_config(write(tmp_path, VALID.replace("source: 0", f"source: {value}")), env={}).camera.source

    assert source("rtsp://10.0.0.5/stream") == "rtsp://10.0.0.5/stream"
    assert source("/dev/video2") == "/dev/video2"
    assert source("clips/line.avi") == str(tmp_path / "clips" / "line.avi")
    assert source("sim://?seed=4&count=10") == "sim://?seed=4&count=10"


KEYS = [
    "station",
    "camera",
    "source",
    "model",
    "reference",
    "mqtt",
    "port",
    "products",
    "product",
    "tls",
    "password",
    "roi",
    "x",
    "fps",
    "loop",
    "outbox",
    "trigger",
    "qos",
    "state_dir",
]
SCALARS = [
    "0",
    "-1",
    "1883",
    "abc",
    "null",
    "true",
    "[1, 2]",
    "{a: 1}",
    "'..'",
    "sim://?count=0",
    "2024-13-45",
    "&a [*a]",
    "*b",
    "!!python/object:os.system x",
    "{",
    "'",
    "\t",
    "1e400",
]


@st.composite
def config_texts(draw):
    lines = draw(
        st.lists(st.tuples(st.integers(0, 3), st.sampled_from(KEYS), st.sampled_from(SCALARS + [""])), max_size=12)
    )
    text = "".join(f"{'  ' * depth}{key}: {value}\n" for depth, key, value in lines)
    if draw(st.booleans()):
        text = VALID + text
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(config_texts(), st.text(max_size=200)))
def test_fuzzed_config_text_raises_only_config_error(tmp_path, text):
    try:
        config = parse_config(text, name="fuzz.yaml", base=tmp_path, env={})
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml")
    else:
        assert isinstance(config, StationConfig)


def test_fuzz_corpus_includes_hostile_yaml(tmp_path):
    # Cases hypothesis might not draw: exploding aliases, a recursive alias, a bad timestamp.
    bombs = textwrap.dedent("""\
        a: &a [x, x, x, x, x, x, x, x]
        b: &b [*a, *a, *a, *a, *a, *a, *a, *a]
        c: &c [*b, *b, *b, *b, *b, *b, *b, *b]
        d: [*c, *c, *c, *c, *c, *c, *c, *c]
        """)
    for text in (bombs, "station: &s [*s]\n", "station: 2024-13-45\n", "? [a]\n: b\n"):
        with pytest.raises(ConfigError):
            parse_config(text, env={})


# Values the broker or paho would refuse on every reconnect are configuration errors, named by line and key.
COMMAND_RESULT = len("/line1-st1/command/result")  # the longest topic under the prefix


@pytest.mark.parametrize(
    "change, expected",
    [
        (("topic_prefix: inspection", 'topic_prefix: "plant\\0x"'), ":14: mqtt.topic_prefix: contains a NUL character"),
        (
            ("topic_prefix: inspection", f"topic_prefix: {'p' * (65_536 - COMMAND_RESULT)}"),
            ":14: mqtt.topic_prefix: makes the topic ppp",
        ),
        (
            ("topic_prefix: inspection", "topic_prefix: plant/+/x"),
            ":14: mqtt.topic_prefix: must not contain the MQTT wildcards",
        ),
        (("topic_prefix: inspection", "topic_prefix: $SYS/x"), ":14: mqtt.topic_prefix: must not start with $"),
        (
            ("topic_prefix: inspection", 'topic_prefix: "plant\\x7f"'),
            "mqtt.topic_prefix: contains the control character U+007F",
        ),
        (
            ("topic_prefix: inspection", 'topic_prefix: "plant\\uffff"'),
            "mqtt.topic_prefix: contains the Unicode non-character",
        ),
        (("topic_prefix: inspection", 'topic_prefix: "plant\\ud800"'), "mqtt.topic_prefix: contains a lone surrogate"),
        (("topic_prefix: inspection", f"topic_prefix: {'/'.join('a' * 199)}"), "has 202 levels; mosquitto drops"),
        (
            ("topic_prefix: inspection", "topic_prefix: a//b"),
            "mqtt.topic_prefix: must be levels joined by single slashes",
        ),
        (("username: station", 'username: "sta\\0tion"'), ":16: mqtt.username: contains a NUL character"),
        (("username: station", f"username: {'u' * 65_536}"), ":16: mqtt.username: is 65,536 bytes in UTF-8"),
        (("host: 127.0.0.1", 'host: "127.0.0.1\\0"'), ":12: mqtt.host: must be a host name or address: contains a NUL"),
        (
            ("runtime: {threads: 1}", 'runtime: {threads: 1}\nhomeassistant: {prefix: "ha\\0"}'),
            ":24: homeassistant.prefix: contains a NUL character",
        ),
        (
            ("runtime: {threads: 1}", f"runtime: {{threads: 1}}\nhomeassistant: {{prefix: {'/'.join('h' * 198)}}}"),
            ":24: homeassistant.prefix: makes the topic h/h/h",
        ),
    ],
)
def test_what_the_broker_would_refuse_is_a_config_error(tmp_path, change, expected):
    lines = problems(tmp_path, VALID.replace(*change))
    assert any(expected in line for line in lines), lines


def test_a_prefix_of_exactly_the_topic_limit_is_taken_and_one_byte_more_is_not(tmp_path):
    at_limit = "é" * ((65_535 - COMMAND_RESULT) // 2) + "p" * ((65_535 - COMMAND_RESULT) % 2)  # bytes, not characters
    assert len(f"{at_limit}/line1-st1/command/result".encode()) == 65_535
    assert (
        load_config(
            write(tmp_path, VALID.replace("topic_prefix: inspection", f"topic_prefix: {at_limit}")), env={}
        ).mqtt.topic_prefix
        == at_limit
    )
    lines = problems(tmp_path, VALID.replace("topic_prefix: inspection", f"topic_prefix: {at_limit}p"))
    assert any(
        "mqtt.topic_prefix: makes the topic" in line and "65,536 bytes in UTF-8; MQTT allows at most 65,535" in line
        for line in lines
    ), lines
    deepest = "/".join("a" * 198)  # 198 + station, command, result: mosquitto's 201 levels
    assert load_config(write(tmp_path, VALID.replace("topic_prefix: inspection", f"topic_prefix: {deepest}")), env={})


def test_the_discovery_objects_are_the_ones_topics_checks():
    from station.runtime.integrations.homeassistant import sensor_configs
    from station.core.topics import DISCOVERY_OBJECTS, Topics

    assert tuple(sensor_configs("st1", Topics.for_station("p", "st1"))) == DISCOVERY_OBJECTS
