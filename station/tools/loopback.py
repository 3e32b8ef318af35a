"""Loopback helpers: a free port, and a mosquitto broker on it.

Used where the station needs a broker of its own on this machine: `station
bench`, scripts/verdicts-over-mqtt and the test suite.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from station.core.errors import StationError

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise StationError(f"nothing listens on {HOST}:{port} after {timeout} s")


class Mosquitto:
    """A mosquitto process on a free loopback port; may be stopped and started again."""

    def __init__(self, workdir: Path, extra_config: str = ""):
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(self.binary).exists():
            raise StationError("mosquitto is not installed: apt-get install mosquitto (or pass --broker HOST:PORT)")
        self.host = HOST
        self.port = free_port()
        self.config = Path(workdir) / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n{extra_config}"
        )
        self.log = Path(workdir) / "mosquitto.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port)
        return self

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)
        self.process = None
