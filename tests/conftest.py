"""Shared fixtures: a real mosquitto broker on a free loopback port, simulated data."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Broker:
    """A mosquitto process on loopback that tests may stop and start again."""

    def __init__(self, workdir: Path, extra_config: str = ""):
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(self.binary).exists():
            pytest.fail("mosquitto is not installed: the README's test command installs it from Debian packages")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n{extra_config}"
        )
        self.log = workdir / "mosquitto.log"
        self.process: subprocess.Popen | None = None

    def start(self):
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config)], stdout=open(self.log, "ab"), stderr=subprocess.STDOUT
        )
        wait_for_port(self.port)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)
        self.process = None


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
    from station.simulate import write_dataset

    root = tmp_path_factory.mktemp("sim") / "parts"
    write_dataset(root, count=240, seed=11)
    return root
