"""The service units: systemd's own checks, the sandbox score, and the W^X lock the units ask for.

`systemd-analyze verify` refuses a unit whose ExecStart binary does not exist,
so the units are verified as copies whose /opt/station/venv/bin/station points
at this venv's `station` (everything else byte for byte), under instance names.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
INSTALLED_STATION = "/opt/station/venv/bin/station"
EXPOSURE_BOUND = 2.0  # measured 1.6 with systemd 252 (Debian 12); 0 = locked down, 10 = exposed


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: scripts/test installs it (Debian package systemd)")
    return found


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([systemd_analyze(), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> dict[str, Path]:
    """station@line1.service and station-calibrate@line1.service, runnable from this venv."""
    station = Path(sys.executable).parent / "station"
    assert station.is_file(), f"{station}: the project is not installed in this venv"
    folder = tmp_path_factory.mktemp("units")
    made = {}
    for template in ("station@.service", "station-calibrate@.service"):
        text = (UNITS / template).read_text()
        assert INSTALLED_STATION in text
        instance = folder / template.replace("@.", "@line1.")
        instance.write_text(text.replace(INSTALLED_STATION, str(station)))
        made[template] = instance
    return made


def test_units_pass_systemd_analyze_verify(instances):
    result = analyze("verify", *map(str, instances.values()))
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_verify_does_complain_about_a_broken_unit(instances, tmp_path):
    broken = tmp_path / "station@line1.service"
    broken.write_text(instances["station@.service"].read_text().replace("UMask=0077", "Umask=0077"))
    result = analyze("verify", str(broken))
    assert "Unknown key 'Umask'" in result.stdout + result.stderr


@pytest.mark.parametrize("template", ["station@.service", "station-calibrate@.service"])
def test_exposure_score(instances, template):
    result = analyze("security", "--offline=true", "--no-pager", str(instances[template]))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout[-500:]
    score, verdict = float(match.group(1)), match.group(2)
    print(f"{template}: systemd-analyze security exposure {score} {verdict}")
    assert score < EXPOSURE_BOUND and verdict == "OK", result.stdout
    for line in (
        "✓ MemoryDenyWriteExecute=",
        "✓ NoNewPrivileges=",
        "✓ RestrictAddressFamilies=~AF_NETLINK",
        "✓ CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "✓ ProtectSystem=",
        "✓ SystemCallFilter=~@privileged",
    ):
        assert line in result.stdout, line


def unit_settings(path: Path) -> list[tuple[str, str]]:
    return [
        tuple(line.split("=", 1))
        for line in path.read_text().splitlines()
        if line and not line.startswith(("#", "[", " ")) and "=" in line
    ]


def test_calibration_runs_as_the_station_in_the_same_sandbox():
    station = unit_settings(UNITS / "station@.service")
    calibrate = unit_settings(UNITS / "station-calibrate@.service")
    service_only = {
        "Type",
        "NotifyAccess",
        "ExecStart",
        "ExecReload",
        "TimeoutStartSec",
        "TimeoutStopSec",
        "WatchdogSec",
        "Restart",
        "RestartSec",
        "RestartPreventExitStatus",
        "LoadCredential",
        "Description",
        "Documentation",
        "After",
        "StartLimitIntervalSec",
        "WantedBy",
    }
    missing = [f"{k}={v}" for k, v in station if k not in service_only and (k, v) not in calibrate]
    assert not missing, f"station-calibrate@.service lacks: {missing}"
    settings = dict(calibrate)
    assert settings["Conflicts"] == settings["OnSuccess"] == settings["OnFailure"] == "station@%i.service"
    assert "calibrate -c /etc/station/%i.yaml" in settings["ExecStart"]
    station_settings = dict(station)
    assert station_settings["ExecStart"].endswith("station run -c /etc/station/%i.yaml")
    # The config names the credential mqtt.password_credential: mqtt-password.
    assert station_settings["LoadCredential"] == "mqtt-password:/etc/station/%i.mqtt-password"


# Syscall numbers (x86_64) for a seccomp filter with systemd 252's MemoryDenyWriteExecute=
# semantics (mmap W+X, mprotect/pkey_mprotect to X, shmat SHM_EXEC: EPERM) plus the
# @resources calls the libraries are seen to make (OpenBLAS mbinds its buffers).
SANDBOXED = textwrap.dedent("""
    import ctypes, errno, mmap, struct, sys
    AUDIT_ARCH_X86_64, ALLOW, EPERM = 0xC000003E, 0x7FFF0000, 0x00050000 | errno.EPERM
    MMAP, MPROTECT, PKEY_MPROTECT, SHMAT = 9, 10, 329, 30
    RESOURCES = (237, 238, 203, 144, 141, 160)  # mbind set_mempolicy sched_setaffinity sched_setscheduler setpriority setrlimit
    LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
    program = [(LD, 0, 0, 4), (JEQ, 1, 0, AUDIT_ARCH_X86_64), (RET, 0, 0, ALLOW), (LD, 0, 0, 0)]
    for nr, mask in ((MMAP, 6), (MPROTECT, 4), (PKEY_MPROTECT, 4), (SHMAT, 0o100000)):
        program += [(JEQ, 0, 5, nr), (LD, 0, 0, 32), (AND, 0, 0, mask), (JEQ, 0, 1, mask),
                    (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)]
    for nr in RESOURCES:
        program += [(JEQ, 0, 1, nr), (RET, 0, 0, EPERM)]
    program.append((RET, 0, 0, ALLOW))
    code = b"".join(struct.pack("HBBI", *op) for op in program)
    buffer = ctypes.create_string_buffer(code)
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    prog = Prog(len(program), ctypes.addressof(buffer))
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        sys.exit(f"seccomp: errno {ctypes.get_errno()}")
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("the W^X filter is not active")
    except PermissionError:
        pass
    # Only now the heavy libraries: onnxruntime, OpenCV, numpy/scipy, matplotlib for the report.
    from calibration import live
    from station.runtime.config.station import load_config
    result = live.calibrate_from_camera(load_config(sys.argv[1]), None, count=30)
    print("calibrated", result.saved.n_good, result.saved.metric)
""")


def test_station_pipeline_runs_with_memory_deny_write_execute(tmp_path):
    """MemoryDenyWriteExecute=yes is only safe if nothing maps writable+executable memory
    (a JIT) or makes memory executable later (e.g. a library asking for an executable stack)."""
    if platform.machine() != "x86_64":
        pytest.skip("the filter's syscall numbers are x86_64's")
    from tests.onnx_models import projection_model

    model = projection_model(tmp_path / "m.onnx")
    config = tmp_path / "station.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        station: line1
        camera: {{source: "sim://?seed=3&count=60"}}
        roi: {{x: 142, y: 107, width: 36, height: 26}}
        model: {model}
        reference: refs/A
        state_dir: {tmp_path / "state"}
    """)
    )
    result = subprocess.run(
        [sys.executable, "-c", SANDBOXED, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MPLCONFIGDIR": str(tmp_path / "mpl")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "calibrated 30 " in result.stdout


def test_the_genicam_drop_in_passes_verify_and_keeps_the_sandbox(instances, tmp_path):
    """systemd/station-genicam.conf (docs/genicam.md), installed as station@line1.service.d/genicam.conf."""
    unit = tmp_path / "station@line1.service"
    unit.write_text(instances["station@.service"].read_text())
    (tmp_path / "station@line1.service.d").mkdir()
    (tmp_path / "station@line1.service.d" / "genicam.conf").write_text((UNITS / "station-genicam.conf").read_text())
    result = analyze("verify", str(unit))
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    result = analyze("security", "--offline=true", "--no-pager", str(unit))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match and float(match.group(1)) < EXPOSURE_BOUND and match.group(2) == "OK", result.stdout
    print(f"station@.service with the GenICam drop-in: systemd-analyze security exposure {match.group(1)}")
    assert "✗ RestrictAddressFamilies=~AF_NETLINK" in result.stdout  # the drop-in's one widening: Aravis needs it
    assert "char-usb_device:rw" in result.stdout and "✓ MemoryDenyWriteExecute=" in result.stdout
