"""Home Assistant MQTT discovery from a real daemon process against a real mosquitto."""

from __future__ import annotations

import json

from tests.daemon_helpers import finish, schema, start_station, wait_until, write_config
from tests.mqtt_helpers import Recorder

# The configuration variables Home Assistant documents for an MQTT sensor
# (https://www.home-assistant.io/integrations/sensor.mqtt/, "Configuration Variables"),
# and the keys of its `device` map on the same page.
SENSOR_KEYS = {
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "default_entity_id",
    "device",
    "device_class",
    "enabled_by_default",
    "encoding",
    "entity_category",
    "entity_picture",
    "expire_after",
    "force_update",
    "icon",
    "json_attributes_template",
    "json_attributes_topic",
    "last_reset_value_template",
    "name",
    "object_id",
    "options",
    "payload_available",
    "payload_not_available",
    "platform",
    "qos",
    "state_class",
    "state_topic",
    "suggested_display_precision",
    "unique_id",
    "unit_of_measurement",
    "value_template",
}
DEVICE_KEYS = {
    "configuration_url",
    "connections",
    "hw_version",
    "identifiers",
    "manufacturer",
    "model",
    "model_id",
    "name",
    "serial_number",
    "suggested_area",
    "sw_version",
    "via_device",
}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}


def configs(recorder) -> dict[str, bytes]:
    """The latest payload per discovery topic."""
    return {m.topic: m.payload for m in recorder.on("/config")}


def test_the_station_is_one_device_whose_entities_stay_until_discovery_is_turned_off(
    tmp_path, station_files, broker, sim_dataset
):
    source = f"{{source: {sim_dataset / 'good'}}}"
    config = write_config(tmp_path, station_files, broker, source, homeassistant="{discovery: true}")
    code, output = finish(start_station(config))
    assert code == 0, output

    ha = Recorder(broker.host, broker.port, "homeassistant/#")  # after the station stopped: retained
    wait_until(lambda: len(configs(ha)) >= 4, 15, "four retained discovery configs")
    found = {topic: json.loads(payload) for topic, payload in configs(ha).items()}
    ha.close()
    assert set(found) == {f"homeassistant/sensor/st1/{o}/config" for o in ("verdict", "score", "ok_count", "ng_count")}
    for topic, entity in found.items():
        assert set(entity) <= SENSOR_KEYS, (
            f"{topic}: keys Home Assistant does not document: {set(entity) - SENSOR_KEYS}"
        )
        assert set(entity["device"]) <= DEVICE_KEYS
        assert entity["state_topic"] in ("plant/st1/verdict", "plant/st1/stats")
        assert entity["availability_topic"] == "plant/st1/status" and entity["payload_available"] == "online"
        assert entity.get("state_class", "measurement") in STATE_CLASSES
        # The template reads a field that the payload's schema requires.
        field = entity["value_template"].removeprefix("{{ value_json.").removesuffix(" }}")
        assert field in schema(entity["state_topic"].rsplit("/", 1)[1])["required"]
    assert len({e["unique_id"] for e in found.values()}) == 4
    assert len({json.dumps(e["device"], sort_keys=True) for e in found.values()}) == 1  # one device

    # A restart keeps them (and says them again).
    code, output = finish(start_station(config))
    assert code == 0, output
    ha = Recorder(broker.host, broker.port, "homeassistant/#")
    wait_until(lambda: len(configs(ha)) >= 4, 15, "the configs after a restart")
    assert all(payload for payload in configs(ha).values())
    ha.close()

    # Turned off: empty retained configs remove the entities.
    watcher = Recorder(broker.host, broker.port, "homeassistant/#")
    config = write_config(tmp_path, station_files, broker, source, homeassistant="{discovery: false}")
    code, output = finish(start_station(config))
    assert code == 0, output
    wait_until(lambda: sum(1 for m in watcher.on("/config") if not m.payload) >= 4, 15, "four empty configs")
    watcher.close()
    late = Recorder(broker.host, broker.port, "homeassistant/#")
    late.publish("homeassistant/test/marker", b"x")  # retained messages come before what follows the SUBSCRIBE
    wait_until(lambda: late.on("/marker"), 15, "the marker")
    assert not late.on("/config"), "a retained discovery config is left"
    late.close()
    assert not (tmp_path / "state" / "homeassistant.json").exists()
