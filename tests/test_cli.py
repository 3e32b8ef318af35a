import subprocess
import sys

import paho.mqtt.client as mqtt
import pytest

from station.cli import main


def test_importing_the_runtime_never_loads_torch():
    code = (
        "import sys, station, station.cli, station.core.metrics, station.core.preprocess, station.tools.simulate, "
        "station.core.imagefolder; sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_help_lists_simulate(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "simulate" in capsys.readouterr().out


def test_bad_arguments_give_a_message_and_a_nonzero_exit(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path), "--count", "0"]) == 1
    assert "--count must be at least 1" in capsys.readouterr().err


def test_the_session_broker_relays_messages(mosquitto):
    """The fixture the daemon tests stand on: a real broker on loopback."""
    received = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: received.append((m.topic, m.payload))
    client.connect(mosquitto.host, mosquitto.port)
    client.subscribe("probe/#", qos=1)
    client.loop_start()
    try:
        import time

        time.sleep(0.2)
        client.publish("probe/x", b"hello", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.loop_stop()
        client.disconnect()
    assert received == [("probe/x", b"hello")]
