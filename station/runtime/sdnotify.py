"""systemd's notify protocol without libsystemd: datagrams to $NOTIFY_SOCKET.

notify("READY=1"), notify("WATCHDOG=1"), notify("STATUS=..."), notify(reloading()),
notify("STOPPING=1"). Every call is a no-op when not started by systemd
(Type=notify) so the daemon runs the same by hand.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)
_warned: set[str] = set()  # sockets already reported broken: one warning each, not one per ping


def notify(*states: str) -> bool:
    """Send state lines to systemd; True if sent, False when there is no socket.

    Never raises: a broken $NOTIFY_SOCKET is warned about once and the
    station runs on (systemd would then restart it for a missed READY or
    watchdog, which says more than a traceback at start).
    """
    configured = os.environ.get("NOTIFY_SOCKET")
    if not configured or not states:
        return False
    address = "\0" + configured[1:] if configured.startswith("@") else configured  # @: abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(states).encode(), address)
    except (OSError, ValueError) as exc:
        if configured not in _warned:
            _warned.add(configured)
            log.warning("NOTIFY_SOCKET=%s cannot be used (%s): running without systemd notifications", configured, exc)
        return False
    return True


def reloading() -> str:
    """RELOADING=1 with the timestamp systemd (>= 253, Type=notify-reload) requires."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval() -> float | None:
    """Seconds between the pings systemd expects (WatchdogSec), None if not for this process.

    Ping at half of it, as sd_watchdog_enabled(3) advises.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None
