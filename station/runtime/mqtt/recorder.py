"""Judged parts become durable verdicts: seq and message committed to the outbox together.

While the outbox holds its maximum, the recorder waits for the broker (never
drops a verdict). While the outbox cannot write at all (a full disk, a
filesystem gone read-only), verdicts go out live instead (not durable), with
seqs counted on in memory; the persisted seq is advanced past them, in the
same transaction, as soon as the outbox stores again, so no seq is used twice.
The trouble is logged once when it starts and once when it ends, and is
`problem` (the retained state) meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from station.core.errors import OutboxError, OutboxFullError
from station.runtime.mqtt.outbox import Outbox
from station.runtime.mqtt.publisher import Publisher

log = logging.getLogger(__name__)
# Seconds the first live verdict waits for stored ones still in flight, so none is overtaken.
LIVE_ORDER_WAIT = 2.0

# build(seq, frame, judgement) -> the verdict message for that seq
Build = Callable[[int, object, object], dict]


class VerdictRecorder:
    def __init__(self, outbox: Outbox, publisher: Publisher):
        self.outbox, self.publisher = outbox, publisher
        self.live_verdicts = 0  # published live, not durable, while the outbox could not write
        self.write_errors = 0  # failed attempts to store verdicts
        self.problem: str | None = None  # why verdicts are not stored right now
        self._live_seq: int | None = None  # last seq published live while the outbox's disk is full

    def record(
        self, build: Build, pending: list, stopping: Callable[[], bool], wait: Callable[[str], None]
    ) -> list[dict]:
        """Store (frame, judgement) pairs as verdicts in order; the messages stored or sent.

        `wait(why)` is called while nothing can be stored (it should flush and keep the
        daemon responsive); when `stopping()` turns true, what is left is given up, logged.
        """
        done: list[dict] = []
        while True:
            try:
                stored = self._store(build, pending)
                done, pending = done + stored, pending[len(stored) :]
                if not pending:
                    self._set_problem(None)
                    return done
            except OutboxError as exc:
                self.write_errors += 1
                self._set_problem(str(exc))
                if not isinstance(exc, OutboxFullError):  # cannot write at all: live beats waiting
                    sent = self._publish_live(build, pending)
                    done, pending = done + sent, pending[len(sent) :]
                    if not pending:
                        return done
                if stopping():
                    log.error("stopping with %d judged parts not stored: %s", len(pending), exc)
                    return done
                wait(f"outbox cannot store verdicts: {exc}")

    def _set_problem(self, problem: str | None):
        if problem == self.problem:
            return
        if problem is not None and self.problem is None:
            log.error("verdicts cannot be stored: %s", problem)
        elif problem is None:
            log.warning("outbox %s stores verdicts again", self.outbox.path)
        self.problem = problem

    def _store(self, build: Build, pending: list) -> list[dict]:
        """The first of `pending` that fit in the outbox, stored; OutboxFullError when none fits. A batch
        larger than the outbox's room goes in parts: stored whole, it waited forever for more room than
        outbox.max_messages can ever give."""
        with self.outbox.transaction() as tx:
            if self._live_seq is not None:
                tx.advance_seq(self._live_seq)
            fitting = pending[: max(tx.room, 1)]  # none fits: one, refused as full
            messages = [
                build(seq, frame, judgement) for seq, (frame, judgement) in zip(tx.next_seqs(len(fitting)), fitting)
            ]
            self.publisher.queue_verdicts(tx, messages)
        if self._live_seq is not None:
            log.info("seqs up to %d were published live", self._live_seq)
            self._live_seq = None
        return messages

    def _publish_live(self, build: Build, pending: list) -> list[dict]:
        """The outbox's disk is full: publish verdicts live, not durable; those sent, in order."""
        if not self.publisher.connected:
            return []
        if self._live_seq is None:
            # Stored verdicts still on their way would be overtaken by live ones: let them go first
            # (bounded: deleting acknowledged rows may itself fail on a full disk).
            self.publisher.flush(timeout=LIVE_ORDER_WAIT)
            self._live_seq = self.outbox.last_seq()  # reading works on a full disk
            log.error(
                "outbox %s cannot store verdicts: publishing them live, not durable, from seq %d until it can",
                self.outbox.path,
                self._live_seq + 1,
            )
        sent = []
        for frame, judgement in pending:
            self._live_seq += 1  # used even if the send fails: a gap, never a reuse
            self.outbox.cover_seq(self._live_seq)
            message = build(self._live_seq, frame, judgement)
            if not self.publisher.publish_verdict_live(message):
                break
            sent.append(message)
        self.live_verdicts += len(sent)
        return sent
