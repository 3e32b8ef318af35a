"""Judged parts become durable verdicts: seq and message committed to the outbox together.

While the outbox is full, the recorder waits for the broker (never drops a
verdict). While the outbox's disk is full, verdicts go out live instead (not
durable), with seqs counted on in memory; the persisted seq is advanced past
them, in the same transaction, as soon as the outbox stores again, so no seq
is used twice.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from station.core.errors import OutboxDiskError, OutboxError
from station.runtime.outbox import Outbox
from station.runtime.publisher import Publisher

log = logging.getLogger(__name__)

# build(seq, frame, judgement) -> the verdict message for that seq
Build = Callable[[int, object, object], dict]


class VerdictRecorder:
    def __init__(self, outbox: Outbox, publisher: Publisher):
        self.outbox, self.publisher = outbox, publisher
        self.live_verdicts = 0  # published live, not durable, while the disk was full
        self._live_seq: int | None = None  # last seq published live while the outbox's disk is full

    def record(self, build: Build, pending: list, stopping: Callable[[], bool], wait: Callable[[str], None]) -> list[dict]:
        """Store (frame, judgement) pairs as verdicts in order; the messages stored or sent.

        `wait(why)` is called while nothing can be stored (it should flush and keep the
        daemon responsive); when `stopping()` turns true, what is left is given up, logged.
        """
        done: list[dict] = []
        while True:
            try:
                return done + self._store(build, pending)
            except OutboxError as exc:
                if isinstance(exc, OutboxDiskError):
                    sent = self._publish_live(build, pending)
                    done, pending = done + sent, pending[len(sent):]
                    if not pending:
                        return done
                if stopping():
                    log.error("stopping with %d judged parts not stored: %s", len(pending), exc)
                    return done
                wait(f"outbox cannot store verdicts: {exc}")

    def _store(self, build: Build, pending: list) -> list[dict]:
        with self.outbox.transaction() as tx:
            if self._live_seq is not None:
                tx.advance_seq(self._live_seq)
            messages = [build(seq, frame, judgement)
                        for seq, (frame, judgement) in zip(tx.next_seqs(len(pending)), pending)]
            self.publisher.queue_verdicts(tx, messages)
        if self._live_seq is not None:
            log.warning("outbox %s stores verdicts again (after seq %d published live)", self.outbox.path, self._live_seq)
            self._live_seq = None
        return messages

    def _publish_live(self, build: Build, pending: list) -> list[dict]:
        """The outbox's disk is full: publish verdicts live, not durable; those sent, in order."""
        if not self.publisher.connected:
            return []
        if self._live_seq is None:
            self._live_seq = self.outbox.last_seq()  # reading works on a full disk
            log.error("outbox %s cannot store verdicts (disk full): publishing them live, not durable, "
                      "from seq %d until it can", self.outbox.path, self._live_seq + 1)
        sent = []
        for frame, judgement in pending:
            self._live_seq += 1  # used even if the send fails: a gap, never a reuse
            message = build(self._live_seq, frame, judgement)
            if not self.publisher.publish_verdict_live(message):
                break
            sent.append(message)
        self.live_verdicts += len(sent)
        return sent
