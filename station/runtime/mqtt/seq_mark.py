"""The highest seq a station may have used, kept beside its outbox, so seq never goes back between runs.

The outbox holds the seq counter, committed with each verdict. This small file (STATE/seq) holds a
high-water mark outside the database, so moving a damaged outbox aside (the exit-74 advice) or
deleting it does not start seq at 1 again. While the station runs the mark is reserved ahead, a
block of RESERVE seqs at a time (one atomic write per block, not per verdict), always before a seq
beyond it commits; a clean stop writes the exact last seq. A new outbox continues after the mark:
after a clean stop without a gap, after a crash with a gap of at most RESERVE seqs, never a reuse.

    STATE/seq    "4000 reserved"   seqs up to 4000 may have been used (the station runs, or crashed)
                 "3127 last"       the last seq used; the station stopped cleanly
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from station.core.errors import StationError
from station.core.user_files import read_text

log = logging.getLogger(__name__)

FILE = "seq"
RESERVE = 1000  # seqs covered by one write of the mark
_LAST, _RESERVED = "last", "reserved"


@dataclass(frozen=True)
class Mark:
    seq: int
    exact: bool  # the last seq used (a clean stop), not a reservation ahead of it


class SeqMark:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.covered = -1  # seqs up to this are covered by the mark on disk (none yet: the first cover writes)
        self.problem: str | None = None  # why the mark cannot be written right now

    def read(self) -> Mark | None:
        """The mark on disk; None when there is none or it cannot be used (said in the log)."""
        if not self.path.exists():
            return None
        try:
            words = read_text(self.path, StationError, "seq mark", max_bytes=256).split()
        except StationError as exc:
            log.warning("%s: ignored: %s", self.path, exc)
            return None
        if len(words) != 2 or not words[0].isdigit() or words[1] not in (_LAST, _RESERVED):
            log.warning("%s: ignored: holds %r, not '<seq> last' or '<seq> reserved'", self.path, " ".join(words)[:40])
            return None
        return Mark(int(words[0]), words[1] == _LAST)

    def cover(self, seq: int):
        """Make sure the mark on disk is at least `seq`, reserving a block ahead; before that seq commits."""
        if seq > self.covered:
            self._write(seq + RESERVE, _RESERVED)

    def stopped(self, last_seq: int):
        """A clean stop: the exact last seq, so a new outbox continues without a gap."""
        self._write(last_seq, _LAST)

    def _write(self, seq: int, kind: str):
        try:
            _write_atomically(self.path, f"{seq} {kind}\n".encode())
        except OSError as exc:
            problem = (
                f"{self.path} cannot be written ({exc.strerror or exc}): if the outbox is lost too, seqs "
                "after the last one written there would be used again"
            )
            if problem != self.problem:
                log.error("seq mark %s", problem)
            self.problem = problem
            return
        if self.problem:
            log.warning("seq mark %s is written again", self.path)
        self.problem = None
        self.covered = seq


def _write_atomically(path: Path, content: bytes):
    """Temp file, fsync, rename, fsync of the folder: the file holds the old content or the new, never a torn one."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
