"""A durable outbox on disk (SQLite): no verdict is lost between the scorer and MQTT.

The daemon puts messages; the publisher sends them in insertion order and acks
each one only when the broker has acknowledged it. The station's `seq` counter
lives in the same database, so a seq and the message carrying it commit
together in one transaction:

    with outbox.transaction() as tx:
        seq = tx.next_seq()
        tx.put(topic, make_payload(seq), qos=1)

Durability: WAL with synchronous=FULL. With NORMAL a power cut (a line cabinet
switched off at the end of a shift) can roll back the last commits: verdicts
already counted as sent to the outbox vanish, and worse, the seq counter goes
back and seqs get reused. FULL costs one fsync per commit, so verdicts are
stored in batches (one transaction per batch) and acks ride on the next
verdict commit's fsync (see ack()).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from station.core.errors import OutboxDiskError, OutboxError, OutboxFullError
from station.runtime.mqtt.seq_mark import SeqMark

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused, even after acks
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('seq', 0), ('depth', 0);
-- depth kept by triggers: exact across processes and O(1), unlike COUNT(*) on 100k rows.
CREATE TRIGGER IF NOT EXISTS depth_up AFTER INSERT ON messages
    BEGIN UPDATE counters SET value = value + 1 WHERE name = 'depth'; END;
CREATE TRIGGER IF NOT EXISTS depth_down AFTER DELETE ON messages
    BEGIN UPDATE counters SET value = value - 1 WHERE name = 'depth'; END;
"""
FULL_LOG_INTERVAL = 60.0  # seconds between "outbox full" error lines
INCREMENTAL = 2  # PRAGMA auto_vacuum value
SHRINK_PAGES = 256  # free pages (1 MiB at 4 KiB) worth handing back once the outbox is empty


@dataclass(frozen=True)
class Message:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float  # wall clock (time.time()) when put


class _RateLimitedError:
    """Logs the first refusal at once, then at most one summary line per interval."""

    def __init__(self, interval: float):
        self.interval = interval
        self.last = -float("inf")
        self.suppressed = 0

    def __call__(self, message: str):
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        extra = f" ({self.suppressed} more refused since the last report)" if self.suppressed else ""
        log.error("%s%s", message, extra)
        self.last, self.suppressed = now, 0


class OutboxTransaction:
    """Seq reservations and puts that commit (or roll back) together."""

    def __init__(self, outbox: "Outbox"):
        self._outbox = outbox
        self._db = outbox._db
        self._room = outbox.max_messages - self._counter("depth")

    @property
    def room(self) -> int:
        """Messages this transaction can still put before the outbox holds its maximum."""
        return self._room

    def _counter(self, name: str) -> int:
        return self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]

    def next_seq(self) -> int:
        """The next station seq: strictly increasing, never reused after a restart."""
        return self._outbox.cover_seq(
            self._db.execute("UPDATE counters SET value = value + 1 WHERE name = 'seq' RETURNING value").fetchone()[0]
        )

    def advance_seq(self, at_least: int) -> int:
        """Move the persisted seq up to at least `at_least` (seqs used while it could not be stored)."""
        return self._outbox.cover_seq(
            self._db.execute(
                "UPDATE counters SET value = MAX(value, ?) WHERE name = 'seq' RETURNING value", (int(at_least),)
            ).fetchone()[0]
        )

    def next_seqs(self, count: int) -> range:
        """Reserve `count` consecutive seqs at once (one statement for a whole batch)."""
        last = self._outbox.cover_seq(
            self._db.execute(
                "UPDATE counters SET value = value + ? WHERE name = 'seq' RETURNING value", (count,)
            ).fetchone()[0]
        )
        return range(last - count + 1, last + 1)

    def put_many(self, topic: str, payloads: list[bytes], qos: int = 1, retain: bool = False) -> range:
        """Insert many messages on one topic with one statement; their ids (consecutive: one
        connection, one transaction, AUTOINCREMENT)."""
        if len(payloads) > self._room:
            raise self._outbox._full()
        created = time.time()
        self._db.executemany(
            "INSERT INTO messages (topic, payload, qos, retain, created) VALUES (?, ?, ?, ?, ?)",
            [(topic, bytes(p), int(qos), int(bool(retain)), created) for p in payloads],
        )
        self._room -= len(payloads)
        last = self._db.execute("SELECT last_insert_rowid()").fetchone()[0]
        return range(last - len(payloads) + 1, last + 1)

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        if self._room <= 0:
            raise self._outbox._full()
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"outbox payloads are bytes, got {type(payload).__name__}")
        cursor = self._db.execute(
            "INSERT INTO messages (topic, payload, qos, retain, created) VALUES (?, ?, ?, ?, ?)",
            (topic, bytes(payload), int(qos), int(bool(retain)), time.time()),
        )
        self._room -= 1
        return cursor.lastrowid


class Outbox:
    """Messages waiting for the broker's acknowledgement, in insertion order."""

    def __init__(self, path: Path | str, max_messages: int = 100_000, seq_mark: Path | None = None):
        """`seq_mark`: the station's STATE/seq (station/runtime/mqtt/seq_mark.py), so seq survives losing this file."""
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        self.path = Path(path)
        self.seq_mark = SeqMark(seq_mark) if seq_mark is not None else None
        self._highest_seq = 0  # of every seq handed out, stored or live (a rolled-back one only makes a gap)
        self.max_messages = max_messages
        self._lock = threading.RLock()  # one connection shared by the daemon and publisher threads
        self._report_full = _RateLimitedError(FULL_LOG_INTERVAL)
        self._report_disk_full = _RateLimitedError(FULL_LOG_INTERVAL)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._errors("open"):
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise OutboxError(f"{self.path}: SQLite refused WAL mode (got {mode}); is it on a network filesystem?")
            self._db.execute("PRAGMA synchronous=FULL")
            self._use_incremental_vacuum()
            self._db.executescript(SCHEMA)
        if self.seq_mark is not None:
            self._continue_seq()

    def _continue_seq(self):
        """A new outbox (or one older than the last clean stop) continues after the seq mark, said loudly."""
        mark, last = self.seq_mark.read(), self.last_seq()
        if mark is None and last == 0:
            log.warning(
                "outbox %s is new and %s holds no seq: seq starts at 1 (right for a new station; a station "
                "that ran before starts its seq again)",
                self.path,
                self.seq_mark.path,
            )
        elif mark is not None and mark.seq > last and (last == 0 or mark.exact):
            log.warning(
                "outbox %s %s, but this station has used seqs up to %d (%s): seq continues at %d; verdicts "
                "the previous outbox held undelivered are not in this one",
                self.path,
                "is new" if last == 0 else f"is behind the last run (seq {last})",
                mark.seq,
                self.seq_mark.path,
                mark.seq + 1,
            )
            with self.transaction() as tx:
                tx.advance_seq(mark.seq)
        self.cover_seq(self.last_seq())

    def cover_seq(self, seq: int) -> int:
        """`seq` is about to be used: the seq mark must cover it first (one write per block); returns seq."""
        if self.seq_mark is not None:
            self._highest_seq = max(self._highest_seq, seq)
            self.seq_mark.cover(seq)
        return seq

    # -- writing

    @contextmanager
    def transaction(self) -> Iterator[OutboxTransaction]:
        """One atomic unit: everything in it commits together, or nothing on an exception."""
        with self._lock, self._errors("write"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield OutboxTransaction(self)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _rollback(self):
        # A failed COMMIT (disk full) may leave the transaction open; never leave it so.
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("outbox %s: rollback failed: %s", self.path, exc)

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Store one message durably; returns its id. OutboxFullError when full."""
        with self.transaction() as tx:
            return tx.put(topic, payload, qos, retain)

    def put_many(self, messages: Iterable[tuple[str, bytes, int, bool]]) -> list[int]:
        """Store (topic, payload, qos, retain) messages in one commit: all or none."""
        with self.transaction() as tx:
            return [tx.put(*message) for message in messages]

    def next_seq(self) -> int:
        """Reserve the next seq on its own (see transaction() to pair it with a put)."""
        with self.transaction() as tx:
            return tx.next_seq()

    # -- reading and acknowledging

    def pending(self, limit: int = 100, after_id: int = 0) -> list[Message]:
        """Up to `limit` unacknowledged messages with id > after_id, oldest first."""
        with self._lock, self._errors("read"):
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, created FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [
            Message(id_, topic, bytes(payload), qos, bool(retain), created)
            for id_, topic, payload, qos, retain, created in rows
        ]

    def ack(self, *ids: int) -> int:
        """Forget delivered messages (one commit for all ids); returns how many were pending.

        Acks commit without an fsync of their own: in WAL mode the next verdict
        commit (synchronous=FULL) makes them durable too. A power cut in between
        can only bring back acked messages, which are then sent again: a
        duplicate, which QoS 1 allows, never a loss or a reused seq.
        """
        if not ids:
            return 0
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self.transaction():
                    cursor = self._db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])
                    removed = cursor.rowcount
                if self.depth() == 0:
                    with self._errors("shrink"):
                        self._shrink()
                return removed
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def _use_incremental_vacuum(self):
        """Free pages go back to the filesystem after a backlog (see _shrink); an outbox made
        before this setting is rebuilt once by VACUUM, which is what applies it."""
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
            self._db.execute(f"PRAGMA auto_vacuum={INCREMENTAL}")
            self._db.execute("VACUUM")

    def _shrink(self):
        """A backlog was delivered: hand its pages back and truncate the WAL."""
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        if free >= SHRINK_PAGES:
            self._db.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page only
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def depth(self) -> int:
        """How many messages wait for delivery."""
        with self._lock, self._errors("read"):
            return self._db.execute("SELECT value FROM counters WHERE name = 'depth'").fetchone()[0]

    def last_seq(self) -> int:
        """The last seq handed out (0 before the first)."""
        with self._lock, self._errors("read"):
            return self._db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]

    def close(self):
        with self._lock:
            if self.seq_mark is not None:
                self._write_last_seq()
            self._db.close()

    def _write_last_seq(self):
        try:
            last = self.last_seq()
        except OutboxError as exc:  # the reservation on disk still covers every seq used
            log.warning("outbox %s: the last seq cannot be read for %s (%s)", self.path, self.seq_mark.path, exc)
            return
        self.seq_mark.stopped(max(last, self._highest_seq))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- errors for a person

    def _full(self) -> OutboxFullError:
        message = (
            f"outbox {self.path} is full ({self.max_messages} undelivered messages; is the MQTT broker "
            f"reachable?): new messages are refused, not dropped"
        )
        self._report_full(message)
        return OutboxFullError(message)

    @contextmanager
    def _errors(self, action: str):
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):  # SQLITE_FULL: 'database or disk is full'
                message = (
                    f"outbox {self.path}: the disk is full ({exc}); free space on "
                    f"{self.path.parent} or lower outbox.max_messages"
                )
                self._report_disk_full(message)
                raise OutboxDiskError(message) from exc
            raise OutboxError(f"outbox {self.path}: cannot {action} ({exc})") from exc
        except sqlite3.DatabaseError as exc:
            raise OutboxError(
                f"outbox {self.path}: cannot {action}, the database is damaged ({exc}); move it "
                f"(and its -wal and -shm files) aside to start a new outbox: seq continues after the "
                f"last one used (STATE/seq), the verdicts it still holds are not sent"
            ) from exc
