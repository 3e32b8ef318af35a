"""`station demo`: the embedded default, as a user runs it."""

import re
import subprocess
import sys
import time


from station.tools.demo import DEMO_MODEL, DEMO_REFERENCE
from station.core.embedder import Embedder
from station.core import reference_set

VERDICT_LINE = re.compile(
    r"^\d\d:\d\d:\d\d\.\d{3}  seq +\d+  (OK|NG)  score +[\d.e+-]+  part sim:0:\d+ .* yield +[\d.]+%$"
)


def run_demo(*args, timeout=90):
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "station", "demo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    first_verdict_after = None
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if first_verdict_after is None and " seq " in line:
            first_verdict_after = time.monotonic() - started
    process.wait(timeout)
    return process.returncode, lines, process.stderr.read(), first_verdict_after


def test_the_bundled_demo_model_and_reference_belong_together():
    embedder = Embedder(DEMO_MODEL)
    loaded = reference_set.load(DEMO_REFERENCE)
    reference_set.verify_for_model(loaded, embedder.info.sha256, embedder.info.embedding_dim)
    assert embedder.info.quantization.startswith("int8")


def test_demo_on_its_embedded_broker_prints_verdicts_and_stops_after_n():
    code, lines, err, first = run_demo("--frames", "12", "--fps", "20")
    assert code == 0, err
    assert lines[0].startswith("embedded MQTT broker (amqtt) on 127.0.0.1:")
    verdicts = [line for line in lines if " seq " in line]
    assert len(verdicts) >= 12
    for line in verdicts:
        assert VERDICT_LINE.match(line), line
    assert first is not None and first < 20
    assert re.match(r"^\d+ verdicts, yield [\d.]+%, verdict matches the simulated truth for [\d.]+%$", lines[-1])


def test_demo_against_a_given_broker(mosquitto):
    code, lines, err, _ = run_demo("--frames", "30", "--fps", "50", "--broker", f"127.0.0.1:{mosquitto.port}")
    assert code == 0, err
    assert not any("embedded" in line for line in lines)
    agreement = float(re.search(r"simulated truth for ([\d.]+)%", lines[-1]).group(1))
    assert agreement >= 90.0  # the bundled int8 model on the simulated line
