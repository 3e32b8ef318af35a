"""The daemon's side of `trigger: presence`: the gate's problem in the state, and no part left unaccounted for.

A part in the region when the stream stops (the source ends, the station stops) or when a reload
changes what the gate sees (the regions, the model's input size) gets a no_verdict; the gate then
learns the belt again for the new view. Functions of the running daemon (station/runtime/daemon.py).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def note_problem(daemon):
    """The gate's problem (a belt relearned or being learned again) into the state, logged when it changes."""
    logged = list(daemon.gate.notices)
    for notice in logged:
        log.warning("presence: %s", notice)
    daemon.gate.notices.clear()
    problem = daemon.gate.problem
    if problem != daemon.problems.get("presence"):
        if problem is None:
            log.info("presence: the gate trusts its empty belt again")
        elif problem not in logged:
            log.warning("presence: %s", problem)
    daemon._set_problem("presence", problem)


def stream_ends(daemon, reason: str):
    """The stream stops: a part that entered and was not judged gets a no_verdict, never silence."""
    if daemon.gate is not None:
        _store_no_verdicts(daemon, daemon.inspector, daemon.gate.finish(reason))


def inspector_swapped(daemon, previous, reason: str):
    """The belt was learned for the old regions and input size: when they changed, learn it again."""
    if daemon.gate is None or daemon.inspector.view() == previous.view():
        return
    missed = daemon.gate.reset(f"reloaded ({reason}) with another region or input size")
    log.warning(
        "%s: the region or the model's input size changed: the presence gate learns the empty belt again", reason
    )
    _store_no_verdicts(daemon, previous, missed)
    note_problem(daemon)


def _store_no_verdicts(daemon, inspector, missed: list):
    if missed:
        log.warning("no verdict for a part (frame %s): %s", missed[0][0].source, missed[0][1])
        daemon._store_verdicts(inspector, missed, time.monotonic(), None)
        daemon.publisher.notify_outbox()
