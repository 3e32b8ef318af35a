"""The fake GigE Vision camera (Debian's aravis-tools) as tests drive it: started, killed, read back with
arv-tool. Its fixtures (fake_camera, fake_camera_factory) are in tests/conftest.py; the fake camera answers on
127.0.0.1 only, so they hold a lock file: test runs on the same machine take turns."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon_helpers import write_config

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = "127.0.0.1"
SOURCE = f"genicam://{ADDRESS}"
FAKE_CAMERA, ARV_TOOL = "arv-fake-gv-camera-0.8", "arv-tool-0.8"
LOCK = Path("/tmp/station-tests-fake-gv-camera.lock")


def _aravis_missing() -> str | None:
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis  # noqa: F401
    except (ImportError, ValueError) as exc:
        return f"Aravis through PyGObject is not installed ({exc}): scripts/test installs it"
    missing = [tool for tool in (FAKE_CAMERA, ARV_TOOL) if shutil.which(tool) is None]
    return f"{', '.join(missing)} not installed (Debian aravis-tools, aravis-tools-cli)" if missing else None


needs_aravis = pytest.mark.skipif(_aravis_missing() is not None, reason=str(_aravis_missing()))


class FakeCamera:
    """The fake camera as a process: start, kill (the camera goes away), start again."""

    def __init__(self, *args: str):
        self.args = args
        self.process: subprocess.Popen | None = None

    def start(self):
        self.process = subprocess.Popen(
            [FAKE_CAMERA, "-i", ADDRESS, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while self.control("DeviceModelName") != "Fake":  # answers once its GVCP socket is up
            assert self.process.poll() is None, f"fake camera exited: {self.process.stderr.read().decode()}"
            assert time.monotonic() < deadline, "fake camera does not answer"
            time.sleep(0.2)
        time.sleep(0.3)
        assert self.process.poll() is None, (
            f"fake camera exited (another one on {ADDRESS}?): {self.process.stderr.read().decode()}"
        )

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(5)

    @staticmethod
    def control(*features: str) -> str | None:
        """arv-tool's `control`: 'Name=value' writes, 'Name' reads; the value read (one feature), or None."""
        done = subprocess.run(
            [ARV_TOOL, "-a", ADDRESS, "control", *features], capture_output=True, text=True, timeout=20
        )
        if done.returncode != 0 or not done.stdout.strip():
            return None
        line = done.stdout.strip().splitlines()[-1]
        return line.split(" = ", 1)[1].split(" min:")[0].strip() if " = " in line else line


def genicam_config(tmp_path, station_files, broker, settings: str, **extra) -> Path:
    return write_config(tmp_path, station_files, broker, f"{{source: {SOURCE}, genicam: {{{settings}}}}}", **extra)
