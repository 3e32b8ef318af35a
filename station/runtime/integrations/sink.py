"""What an integration hears from the daemon: one small interface, fed from one place (wiring.py).

The daemon never calls an integration itself: it tells `Integrations` (its one dispatch point) what
happened, and that hands it to each sink that is on. A sink overrides what it wants; the rest do nothing.

    judged(inspector, messages, frames)   a batch is stored: its verdict and no_verdict messages, in
                                          order, and the frames the verdicts judged (the loop's thread)
    state(state)                          the retained state was published (the loop's thread)
    queued(ids, messages)                 messages went into the outbox, inside its transaction, before
                                          the drain can send them (the publisher's caller's thread)
    delivered(outbox_id)                  the broker acknowledged one (the publisher's drain thread)
    close()                               the station stops; before the publisher does
"""

from __future__ import annotations


class Sink:
    def judged(self, inspector, messages: list[dict], frames: list):
        pass

    def state(self, state: dict):
        pass

    def queued(self, ids, messages: list[dict]):
        pass

    def delivered(self, outbox_id: int):
        pass

    def close(self):
        pass
