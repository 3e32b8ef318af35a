"""A station's state folder (outbox, kept crops, pause flag): checked, created, locked.

One process at a time owns a state folder: a second `station run` on the same
config or state_dir (or a camera-mode calibration while the station runs)
would judge twice and fight over the MQTT client id. The lock is an flock on
STATE/station.lock, released by the kernel when the process ends, so a
crashed station never leaves a stale lock behind.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from station.core.errors import AlreadyRunningError, ConfigError

LOCK_FILE = "station.lock"


def state_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be a state folder, without creating anything; None when it can."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"state_dir: {path} is a file, not a folder"
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and existing.is_dir() and os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"state_dir: {path} is on a read-only filesystem ({existing}): the outbox needs to write"
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return f"state_dir: {path} cannot be created or written (check the folder and its owner)"
    return None


def open_state_dir(path: Path) -> Path:
    """Create the state folder (0700) or say why it cannot be; ConfigError (exit 78)."""
    path = Path(path)
    problem = state_dir_problem(path)
    if problem is None:
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            problem = f"state_dir: {path} cannot be created: {exc.strerror}"
    if problem:
        raise ConfigError(problem)
    return path


class StateLock:
    """Held while a process owns a state folder; `with StateLock(path, "station run"):`."""

    def __init__(self, state_dir: Path, what: str):
        self.path = Path(state_dir) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "StateLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:  # a read-only or full filesystem, a folder in the lock's place
            raise ConfigError(f"state_dir: {self.path.parent} cannot be written ({exc.strerror}: "
                              f"{'a read-only filesystem' if exc.errno == errno.EROFS else self.path.name})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunningError(
                f"already running (pid {holder.split()[0]}): {holder.partition(' ')[2] or 'a station'} "
                f"owns {self.path.parent}; stop it first (systemctl stop station@...)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.what}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
