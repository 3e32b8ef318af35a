import os
import socket
import uuid

import pytest

from station.runtime import sdnotify


def receive(sock) -> str:
    return sock.recv(4096).decode()


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_messages_reach_the_socket(notify_socket):
    assert sdnotify.notify("READY=1", "STATUS=inspecting line1-st1")
    assert receive(notify_socket) == "READY=1\nSTATUS=inspecting line1-st1"
    sdnotify.notify("WATCHDOG=1")
    assert receive(notify_socket) == "WATCHDOG=1"
    sdnotify.notify("STOPPING=1")
    assert receive(notify_socket) == "STOPPING=1"


def test_reloading_carries_the_monotonic_timestamp(notify_socket):
    import time

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    sdnotify.notify(sdnotify.reloading())
    first, second = receive(notify_socket).split("\n")
    assert first == "RELOADING=1"
    stamp = int(second.removeprefix("MONOTONIC_USEC="))
    assert before <= stamp <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_abstract_socket(monkeypatch):
    name = f"station-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert receive(sock) == "READY=1"


def test_no_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "garbage")
    assert sdnotify.watchdog_interval() is None


@pytest.mark.parametrize("address", ["/nonexistent/notify.sock", "@", "x" * 200])
def test_a_broken_socket_warns_once_and_never_raises(monkeypatch, caplog, address):
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setattr(sdnotify, "_warned", set())
    with caplog.at_level("WARNING", logger="station.runtime.sdnotify"):
        assert sdnotify.notify("READY=1") is False
        assert sdnotify.notify("WATCHDOG=1") is False
    warnings = [r for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(warnings) == 1 and address[:20] in warnings[0].getMessage()
