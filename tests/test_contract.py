"""The MQTT contract: schemas, code and the README's payload examples agree.

The daemon tests validate every message a real station publishes against
these schemas; this file checks the schemas against the code's own names and
the README's examples against the schemas, so none of the three drifts alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from station.core.preprocess import FeatureGrid
from station.core.scoring import ALL_SCORES, POSITION_SCORES, PositionReference, ReferenceModel, distances
from station.core.verdict import NG, OK
from station.runtime.commands import parse_command, CommandError
from station.runtime.mqtt.messages import SCHEMA_VERSION, encode
from station.runtime.sources.base import STATES

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "station" / "runtime" / "mqtt" / "schemas"
PUBLISHED = ("verdict", "no_verdict", "state", "stats", "command_result")  # JSON the station sends
README_BLOCK = re.compile(r"^```json (\w+)\n(.*?)^```", re.M | re.S)


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


@pytest.mark.parametrize("name", PUBLISHED)
def test_every_published_message_requires_the_schema_version(name):
    loaded = schema(name)
    assert loaded["properties"]["schema_version"] == {**loaded["properties"]["schema_version"], "const": SCHEMA_VERSION}
    assert loaded["required"][0] == "schema_version"


def test_encode_puts_the_schema_version_first():
    assert json.loads(encode({"station": "st1"})) == {"schema_version": SCHEMA_VERSION, "station": "st1"}
    assert encode({"a": 1}).startswith(b'{"schema_version":')


def test_the_verdict_schema_names_what_the_code_produces():
    verdict = schema("verdict")["properties"]
    assert verdict["verdict"]["enum"] == [OK, NG]
    assert set(verdict["metric"]["enum"]) == set(ALL_SCORES + POSITION_SCORES)
    rng = np.random.default_rng(0)
    model = ReferenceModel(
        reference=np.ones(4) / 2,
        precision=np.eye(4),
        soart3_mean=np.zeros(3),
        soart3_precision=np.eye(3),
        kissme=np.eye(4),
    )  # every distance, learned one too
    grid = FeatureGrid(rows=1, cols=2, channels=2, stride=8)
    positions = PositionReference(
        mean=np.zeros((2, 2), np.float32),
        precision=np.tile(np.eye(2, dtype=np.float32), (2, 1, 1)),
        typical=np.zeros(2, np.float32),
        grid=grid,
    )  # a per-position model's verdicts: position only
    described = verdict["distances"]["properties"]
    required = [alternative["required"] for alternative in verdict["distances"]["anyOf"]]
    for produced in (
        set(distances(rng.normal(size=(2, 4)), model)),
        set(distances(rng.normal(size=(2, 4)), positions)),
    ):
        assert produced <= set(described), f"distances not in the schema: {produced - set(described)}"
        assert any(set(names) <= produced for names in required)


def test_the_schemas_name_the_camera_states_the_sources_have():
    """sources/base.py owns the states; /metrics labels one gauge per state from the same tuple."""
    assert schema("state")["properties"]["camera"]["enum"] == list(STATES)
    assert schema("stats")["properties"]["camera_state"]["enum"] == list(STATES)


def test_commands_speak_this_schema_version_or_none():
    assert parse_command(b'{"id": "1", "cmd": "pause"}').cmd == "pause"
    assert (
        parse_command(json.dumps({"schema_version": SCHEMA_VERSION, "id": "2", "cmd": "resume"}).encode()).cmd
        == "resume"
    )
    with pytest.raises(CommandError, match="schema_version 99"):
        parse_command(b'{"schema_version": 99, "id": "3", "cmd": "pause"}')


def test_the_readme_payload_examples_follow_the_schemas():
    blocks = README_BLOCK.findall((ROOT / "README.md").read_text())
    assert {name for name, _ in blocks} >= {*PUBLISHED, "command"}, "README lacks an example of some message"
    for name, text in blocks:
        example = json.loads(text)
        jsonschema.validate(example, schema(name))
        if name in PUBLISHED:
            assert next(iter(example)) == "schema_version", f"README {name} example: schema_version first"


def test_the_broker_acl_names_every_topic_the_station_uses():
    """docs/security.md's acl_file grants each topic of Topics (write, command read) and nothing wider
    under the station's prefix; the README names every one of them."""
    from dataclasses import fields

    from station.core.topics import Topics

    acl = re.search(r"^```text acl\n(.*?)^```", (ROOT / "docs" / "security.md").read_text(), re.M | re.S).group(1)
    entries = {tuple(line.split()[1:]) for line in acl.splitlines() if line.startswith("topic ")}
    topics = Topics.for_station("inspection", "line1-st1")
    needed = {("read" if f.name == "command" else "write", getattr(topics, f.name)) for f in fields(Topics)}
    assert needed <= entries, f"missing from the acl example: {needed - entries}"
    assert not [e for e in entries if e[1].startswith("inspection/") and e[1].endswith("#")]
    readme = (ROOT / "README.md").read_text()
    acl_paragraph = readme[readme.index("**Broker ACL**") :].split("\n\n")[0]
    for _, topic in entries:
        name = topic.removeprefix("inspection/line1-st1/")
        assert (
            f"…/{name}`" in acl_paragraph
            or f"{{station}}/{name}`" in acl_paragraph
            or f"`topic write {topic}`" in acl_paragraph
        ), f"README's ACL paragraph lacks {name}"
