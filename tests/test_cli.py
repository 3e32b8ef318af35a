import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize(
    "argv", [["-v", "check", "-c", "x.yaml"], ["check", "-c", "x.yaml", "-v"], ["check", "--verbose", "-c", "x.yaml"]]
)
def test_verbose_is_accepted_before_and_after_the_subcommand(argv):
    from station.cli import build_parser

    assert build_parser().parse_args(argv).verbose is True
    quiet = [a for a in argv if a not in ("-v", "--verbose")]
    assert build_parser().parse_args(quiet).verbose is False


def test_verbose_after_the_subcommand_turns_on_debug_logging():
    """The parsed flag reaches the logging configuration main() sets up."""
    code = (
        "import logging, sys; from station.cli import build_parser; from station.runtime.logs import "
        "configure_logging; configure_logging(build_parser().parse_args(sys.argv[1:]).verbose); "
        "logging.getLogger('probe').debug('debug is on')"
    )
    loud = subprocess.run(
        [sys.executable, "-c", code, "run", "-c", "x.yaml", "--verbose"], capture_output=True, text=True
    )
    quiet = subprocess.run([sys.executable, "-c", code, "run", "-c", "x.yaml"], capture_output=True, text=True)
    assert "debug is on" in loud.stderr and "debug is on" not in quiet.stderr


def _complete(script: Path, *words: str) -> list[str]:
    """Source the script in bash and ask its completion function, as bash does on TAB."""
    quoted = " ".join(f"'{w}'" for w in words)
    probe = (
        f"source '{script}'; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
        f'COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}; _shtab_station; '
        "printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30, cwd=script.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completion_completes_subcommands_options_and_paths(tmp_path, capsys):
    assert main(["completion", "bash"]) == 0
    script = tmp_path / "station.bash"
    script.write_text(capsys.readouterr().out)
    (tmp_path / "station.yaml").write_text("station: x\n")
    assert _complete(script, "station", "ca") == ["calibrate"]
    assert set(_complete(script, "station", "")) >= {"run", "check", "calibrate", "bench", "completion"}
    assert _complete(script, "station", "run", "--c") == ["--config"]
    assert "--verbose" in _complete(script, "station", "check", "--")
    assert _complete(script, "station", "check", "-c", "station.y") == ["station.yaml"]


@pytest.mark.parametrize(
    "argv",
    [
        ["fit", "--data", "D", "--out", "B", "--seed", "-1"],
        ["train", "--data", "D", "--out", "t.pt", "--seed", "-1"],
        ["simulate", "--out", "D", "--seed", "-3"],
        ["demo", "--seed", "x"],
        ["train", "--data", "D", "--out", "t.pt", "--embedding-dim", "0"],
        ["fit", "--data", "D", "--out", "B", "--max-candidates", "0"],
    ],
)
def test_seeds_and_counts_out_of_range_are_usage_errors_not_tracebacks(argv, capsys):
    """A negative --seed reached numpy (ValueError traceback); --embedding-dim 0 silently meant 128 and
    --max-candidates 0 silently meant 1."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and f"station {argv[0]}: error: argument {argv[-2]}: {argv[-1]!r} is not" in err
