"""trigger: mqtt: the frame of a trigger's part, taken within TRIGGER_FRAME_WAIT of the trigger's arrival.

A trigger that waited that long in the command queue, or whose camera gives no frame in time, is
not judged on a later part's frame: it is refused, and the daemon publishes a no_verdict for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from station.runtime.commands import Command
from station.runtime.frame_feed import LatestFrame
from station.runtime.mqtt.messages import no_verdict_message, utc_timestamp
from station.runtime.sources import Frame

TRIGGER_FRAME_WAIT = 1.0  # seconds between a trigger's arrival and its frame, at most, either way
WAIT_SLICE = 0.1  # the wait for a frame is cut into slices: the watchdog is pinged and a stop seen between


def frame_for(
    latest: LatestFrame, command: Command, camera: str, keep_alive: Callable[[], None], stopping: Callable[[], bool]
) -> tuple[Frame | None, str | None]:
    """(the trigger's frame, None), or (None, why there is none)."""
    waited = time.monotonic() - command.received_at
    if waited >= TRIGGER_FRAME_WAIT:
        return None, (
            f"trigger waited {waited:.1f} s for the station (more than {TRIGGER_FRAME_WAIT:g} s): "
            "its part has moved on; not judged"
        )
    frame, error = latest.for_trigger(0.0)  # a camera with a software trigger (GenICam) takes the frame now
    while error is None and not is_frame_of(frame, command):
        left = command.received_at + TRIGGER_FRAME_WAIT - time.monotonic()
        if left <= 0 or stopping():
            break
        keep_alive()
        frame = latest.get(timeout=min(WAIT_SLICE, left))
    if error is None and not is_frame_of(frame, command):
        error = f"no frame from {camera} within {TRIGGER_FRAME_WAIT:g} s of the trigger; not judged"
    return (None, error) if error else (frame, None)


def is_frame_of(frame: Frame | None, command: Command) -> bool:
    """Grabbed close enough to the trigger to be its part: a frame from long before is a stalled camera's."""
    return frame is not None and abs(frame.grabbed_at - command.received_at) <= TRIGGER_FRAME_WAIT


def unjudged_trigger(station: str, product: str, command: Command, reason: str):
    """build(seq, frame, judgement) of the recorder: the no_verdict of a trigger not judged."""
    ts = utc_timestamp(time.time())
    return lambda seq, _frame, _judgement: no_verdict_message(
        station=station,
        seq=seq,
        source=f"trigger {command.id}",
        product=product,
        ts=ts,
        reason=reason,
        part_id=command.part_id,
    )
