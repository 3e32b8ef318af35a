"""Shared fixtures: a real mosquitto broker on a free loopback port, simulated data."""
from __future__ import annotations

from pathlib import Path

import pytest

from station.tools.loopback import Mosquitto


# The tests' broker is the station's own loopback mosquitto (stop/start, extra config).
Broker = Mosquitto


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    """A running mosquitto broker for the whole session (host, port on loopback)."""
    broker = Broker(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def sim_dataset(tmp_path_factory) -> Path:
    """A small simulated image-folder dataset shared by the session (read only)."""
    from station.tools.simulate import write_dataset

    root = tmp_path_factory.mktemp("sim") / "parts"
    write_dataset(root, count=240, seed=11)
    return root
