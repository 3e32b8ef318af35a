"""`station demo`: the station on its embedded default, on one machine with nothing else.

    embedded MQTT broker (amqtt, loopback)  <-- the real daemon (`station run`) over the
                                               simulated line, bundled model and reference
    a dashboard subscriber prints one line per verdict and the running yield

The bundled model and reference set in station/tools/demo_bundle/ are built by the
project's own train/export/calibrate: scripts/build-demo-model rebuilds them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from station.core.errors import MissingExtraError, StationError
from station.core.verdict import OK
from station.tools.loopback import free_port

DEMO_DIR = Path(__file__).parent / "demo_bundle"
DEMO_MODEL = DEMO_DIR / "model.onnx"
DEMO_MODEL_FP32 = DEMO_DIR / "model-fp32.onnx"  # the same trunk unquantized, for `station bench`
DEMO_REFERENCE = DEMO_DIR / "refs" / "demo"
STATION_ID = "demo-st1"
PREFIX = "inspection"


class EmbeddedBroker:
    """amqtt on a free loopback port, in its own thread with its own event loop."""

    def __init__(self):
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise MissingExtraError(
                "the embedded broker needs amqtt: pip install '.[demo]' (or pass --broker HOST:PORT)"
            ) from None
        for noisy in ("amqtt", "transitions"):  # the broker's internals, not the station's story
            logging.getLogger(noisy).setLevel(logging.ERROR)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = Broker(config, loop=self._loop)
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True, name="amqtt")
        self._thread.start()
        if not started.wait(10):
            raise StationError("the embedded MQTT broker did not start within 10 s")

    def _serve(self, started: threading.Event):
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._broker.start())
        started.set()
        self._loop.run_forever()

    def stop(self):
        try:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(5)
        except Exception:  # shutting down a demo broker must not hide the demo's own result
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class Dashboard:
    """What a plant dashboard does: subscribe to the station, print each verdict."""

    def __init__(self, host: str, port: int, seed: int, out=sys.stdout):
        import paho.mqtt.client as mqtt

        self.seed, self.out = seed, out
        self.verdicts = self.ok = self.agree = 0
        self.first_verdict_at: float | None = None
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dashboard-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/{STATION_ID}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message):
        if not message.topic.endswith("/verdict"):
            return
        verdict = json.loads(message.payload)
        truth = _simulated_truth(verdict["source"])
        with self._lock:
            self.verdicts += 1
            self.ok += verdict["verdict"] == OK
            self.agree += (truth == "good") == (verdict["verdict"] == OK)
            if self.first_verdict_at is None:
                self.first_verdict_at = time.monotonic()
            score = "    n/a" if verdict["score"] is None else f"{verdict['score']:7.4g}"
            print(
                f"{verdict['ts'][11:23]}  seq {verdict['seq']:6d}  {verdict['verdict']}  score {score}"
                f"  part {verdict['source']:14s} ({truth:13s})  yield {self.ok / self.verdicts:6.1%}",
                file=self.out,
                flush=True,
            )

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def _simulated_truth(source: str) -> str:
    """The ground truth of a simulated part, from its source name sim:SEED:INDEX."""
    from station.core.simulated_line import part_class

    try:
        _, seed, index = source.split(":")
        return part_class(int(seed), int(index))
    except ValueError:
        return "unknown"


def write_config(folder: Path, host: str, port: int, seed: int, fps: float, protocol: str = "5") -> Path:
    config = folder / "station.yaml"
    config.write_text(
        f"station: {STATION_ID}\n"
        f'camera: {{source: "sim://?seed={seed}", fps: {fps}}}\n'
        "roi: {x: 142, y: 107, width: 36, height: 26}\n"
        f"model: {DEMO_MODEL}\nreference: {DEMO_REFERENCE}\nstate_dir: {folder / 'state'}\n"
        f"mqtt: {{host: {host}, port: {port}, topic_prefix: {PREFIX}, protocol: '{protocol}'}}\n"
    )
    return config


def run_demo(frames: int | None, broker: tuple[str, int] | None, seed: int, fps: float, out=sys.stdout) -> int:
    if not DEMO_MODEL.exists():
        raise StationError(f"{DEMO_MODEL} is missing: build it with scripts/build-demo-model")
    embedded = None
    if broker:
        host, port = broker
    else:
        embedded = EmbeddedBroker()
        host, port = "127.0.0.1", embedded.port
        print(f"embedded MQTT broker (amqtt) on {host}:{port}", file=out)
    with tempfile.TemporaryDirectory(prefix="station-demo-") as folder:
        # The embedded broker (amqtt) speaks MQTT 3.1.1 only; a broker given by --broker is asked for 5.
        config = write_config(Path(folder), host, port, seed, fps, protocol="5" if broker else "3.1.1")
        dashboard = Dashboard(host, port, seed, out)
        log_path = Path(folder) / "station.log"
        with open(log_path, "w") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "station", "run", "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT
            )
        print(
            f"station {STATION_ID} judging the simulated line at {fps:g} parts/s; topics {PREFIX}/{STATION_ID}/#",
            file=out,
            flush=True,
        )
        try:
            code = _watch(daemon, dashboard, frames)
        except KeyboardInterrupt:
            code = 0
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(10)
            dashboard.close()
            if embedded:
                embedded.stop()
        if code != 0 or daemon.returncode not in (0, -signal.SIGTERM):
            print(log_path.read_text()[-3000:], file=sys.stderr)
            raise StationError(f"the station exited with {daemon.returncode}")
    print(
        f"{dashboard.verdicts} verdicts, yield {dashboard.ok / max(dashboard.verdicts, 1):.1%}, "
        f"verdict matches the simulated truth for {dashboard.agree / max(dashboard.verdicts, 1):.1%}",
        file=out,
    )
    return 0


def _watch(daemon: subprocess.Popen, dashboard: Dashboard, frames: int | None) -> int:
    while frames is None or dashboard.verdicts < frames:
        if daemon.poll() is not None:
            return 1
        time.sleep(0.05)
    return 0
