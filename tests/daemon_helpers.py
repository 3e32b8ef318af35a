"""Helpers for tests that run the daemon as a real process (reliability and security tests).

start_station runs `station run` on a configuration write_config writes (for the broker and
station_files fixtures of tests/conftest.py); the rest is what fault tests need: the daemon's output read while it runs, sd_notify
datagrams with their arrival times, a TCP gate in front of the broker, and the
outbox read from outside the process.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

SCHEMAS = Path(__file__).parent.parent / "station" / "runtime" / "mqtt" / "schemas"


def schema(name):
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def write_config(folder: Path, files: Path, broker, camera: str, **extra) -> Path:
    """station.yaml for products A and B of `files` (station_files), publishing to `broker`."""
    lines = {
        "station": "st1",
        "camera": camera,
        "model": str(files / "model.onnx"),
        "products": f"{{A: {files / 'refs' / 'A'}, B: {files / 'refs' / 'B'}}}",
        "product": "A",
        "state_dir": str(folder / "state"),
        "mqtt": f"{{host: 127.0.0.1, port: {broker.port}, topic_prefix: plant}}",
        "stats_interval": "0.5",
        **extra,
    }
    path = folder / "station.yaml"
    path.write_text("".join(f"{key}: {value}\n" for key, value in lines.items()))
    return path


def start_station(config: Path, notify: TimedNotify | None = None, watchdog_usec: int | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return subprocess.Popen(
        [sys.executable, "-m", "station", "run", "-c", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process, timeout=30):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def wait_until(predicate, timeout: float = 15.0, what: str = "condition", interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Output:
    """The daemon's stdout+stderr, read line by line while it runs (a full pipe would block it)."""

    def __init__(self, process):
        self.process = process
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def count(self, fragment: str) -> int:
        return sum(fragment in line for line in list(self.lines))

    def wait_for(self, fragment: str, timeout: float = 15.0):
        wait_until(lambda: self.count(fragment) > 0, timeout, f"{fragment!r} in the daemon's output")

    def finish(self, timeout: float = 30.0) -> int:
        code = self.process.wait(timeout)
        self._thread.join(5)
        return code


class TimedNotify:
    """A NOTIFY_SOCKET that keeps (monotonic time, line) of every sd_notify line received."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, OSError):
                continue
            now = time.monotonic()
            self.received.extend((now, line) for line in data.decode().splitlines())

    def lines(self) -> list[str]:
        """Every line received so far, in order."""
        return [text for _, text in list(self.received)]

    def times(self, line: str, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [t for t, text in list(self.received) if text == line and since <= t <= until]

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def largest_gap(times: list[float], start: float, end: float) -> float:
    """The longest stretch between start and end without an event."""
    points = [start] + sorted(t for t in times if start < t < end) + [end]
    return max(b - a for a, b in zip(points, points[1:]))


class TcpGate:
    """A loopback TCP proxy in front of the broker that the test opens and closes.

    Closed, it refuses new connections (existing ones are cut when the broker goes):
    a broker that comes back is reachable for the test's subscriber first, so the
    subscriber's re-subscription cannot race the station's first publishes.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.is_open = threading.Event()
        self.is_open.set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.is_open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def open(self):
        self.is_open.set()

    def close(self):
        self.is_open.clear()

    def shutdown(self):
        self._closed = True
        self.listener.close()


def outbox_counters(state_dir: Path) -> dict[str, int]:
    """The outbox's seq and depth, read from outside the daemon (WAL allows a concurrent reader)."""
    with sqlite3.connect(state_dir / "outbox.sqlite3", timeout=5) as db:
        return dict(db.execute("SELECT name, value FROM counters").fetchall())


def seq_report(verdicts: list[dict]) -> tuple[list[int], dict[int, set[str]]]:
    """Seqs in order of first arrival, and the verdict ids seen for each seq."""
    first_seen, ids = [], {}
    for verdict in verdicts:
        if verdict["seq"] not in ids:
            first_seen.append(verdict["seq"])
        ids.setdefault(verdict["seq"], set()).add(verdict["id"])
    return first_seen, ids


def assert_complete_and_ordered(verdicts: list[dict], last_seq: int):
    """Every seq 1..last_seq arrived, first arrivals in seq order, one verdict (id) per seq."""
    first_seen, ids = seq_report(verdicts)
    missing = sorted(set(range(1, last_seq + 1)) - set(ids))
    assert not missing, f"{len(missing)} verdicts lost, e.g. seqs {missing[:10]}"
    assert set(ids) == set(range(1, last_seq + 1)), (
        f"unexpected seqs {sorted(set(ids) - set(range(1, last_seq + 1)))[:10]}"
    )
    assert first_seen == sorted(first_seen), "verdicts arrived out of seq order"
    reused = {seq: found for seq, found in ids.items() if len(found) > 1}
    assert not reused, f"seqs used for different verdicts: {dict(list(reused.items())[:5])}"


def json_payloads(messages) -> list[dict]:
    return [json.loads(m.payload) for m in messages]
