"""Folders one process at a time may own or write: the state folder, a reference set. Checked, created, locked.

One process at a time owns a state folder: a second `station run` on the same
config or state_dir (or a camera-mode calibration while the station runs)
would judge twice and fight over the MQTT client id. One process at a time
writes a reference set: two calibrations would number the same version. Each
lock is an flock on a file in the folder, released by the kernel when the
process ends, so a crashed process never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from pathlib import Path

from station.core.errors import AlreadyRunningError, ConfigError, StationError

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


class FolderLock:
    """An flock on FOLDER/LOCK_NAME held while this process owns the folder; the holder's pid and
    what it is doing are written in the file, for the message a second process gets."""

    lock_name = LOCK_FILE
    reentrant = False  # True: taking it again in the process that holds it is a no-op
    _held: dict[str, list] = {}  # lock path -> [fd, depth], for re-entrant locks of this process
    _guard = threading.Lock()

    def __init__(self, folder: Path, what: str):
        self.path = Path(folder) / self.lock_name
        self.what = what
        self._fd: int | None = None
        self._key = str(self.path.absolute())

    def __enter__(self):
        with self._guard:
            held = self._held.get(self._key) if self.reentrant else None
            if held is not None:
                held[1] += 1
                return self
            self._fd = self._take()
            if self.reentrant:
                self._held[self._key] = [self._fd, 1]
        return self

    def _take(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:  # a read-only or full filesystem, a folder in the lock's place
            raise self._unwritable(exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            pid, _, doing = holder.partition(" ")
            raise self._busy(pid, doing) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.what}\n".encode(), 0)
        return fd

    def _unwritable(self, exc: OSError) -> StationError:
        reason = "a read-only filesystem" if exc.errno == errno.EROFS else self.path.name
        return ConfigError(f"{self.path.parent} cannot be written ({exc.strerror}: {reason})")

    def _busy(self, pid: str, doing: str) -> AlreadyRunningError:
        return AlreadyRunningError(f"pid {pid} ({doing or 'another process'}) holds {self.path}")

    def __exit__(self, *exc):
        with self._guard:
            held = self._held.get(self._key) if self.reentrant else None
            if held is not None:
                held[1] -= 1
                if held[1]:
                    return
                del self._held[self._key]
                self._fd = held[0]
            if self._fd is not None:
                os.close(self._fd)  # closing releases the flock
                self._fd = None
                self._released()

    def _released(self):
        """Called once the lock is given up by this process."""


class StateLock(FolderLock):
    """Held while a process owns a state folder; `with StateLock(path, "station run"):`."""

    def _unwritable(self, exc: OSError) -> StationError:
        return ConfigError(f"state_dir: {super()._unwritable(exc)}")

    def _busy(self, pid: str, doing: str) -> AlreadyRunningError:
        return AlreadyRunningError(
            f"already running (pid {pid}): {doing or 'a station'} owns {self.path.parent}; "
            "stop it first (systemctl stop station@...)"
        )


def unwritable_folder(folder: Path, kind: str, exc: OSError) -> str:
    return f"{folder}: cannot write {kind} there ({exc.strerror or exc}); give a folder you can write, with free space"


class WriterLock(FolderLock):
    """Held while a process writes a reference set folder (a whole calibration, save, rollback): a
    second calibration of the same folder is refused at once (exit 75), not after minutes of work.
    Re-entrant: a calibration holds it from its start and save() takes it again. The folder is
    created if need be, and removed again when nothing was written in it (a refused calibration)."""

    lock_name = ".writing.lock"
    reentrant = True

    def __init__(self, folder: Path, what: str, kind: str):
        super().__init__(folder, what)
        self.kind = kind
        self.created = not Path(folder).is_dir()
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._unwritable(exc) from exc

    def _unwritable(self, exc: OSError) -> StationError:
        return ConfigError(unwritable_folder(self.path.parent, self.kind, exc))

    def _released(self):
        if self.created and [p.name for p in self.path.parent.iterdir()] == [self.lock_name]:
            with contextlib.suppress(OSError):  # another writer came in meanwhile: the folder is its now
                self.path.unlink()
                self.path.parent.rmdir()

    def _busy(self, pid: str, doing: str) -> AlreadyRunningError:
        return AlreadyRunningError(
            f"another calibration (pid {pid}) is writing {self.path.parent} "
            f"({doing or 'station calibrate'}); wait until it has finished"
        )
