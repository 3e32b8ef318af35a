"""The frame size the station judges: the one it checked at start. Frames of another size are not judged.

A camera reconfigured or a stream renegotiated changes the frame size mid-run; with an ROI (or named
regions) set on the first frames, judging such a frame would cut another picture's region and resize it
to the model's input without a word and flip verdicts (the ROI may still fit). Such frames get a
no_verdict with the reason and the state a `frame` problem, until the size returns or a reload or
changeover accepts the new size (when every region fits it). Without an ROI the whole frame is the
part, as in training, so a folder of photos of many sizes is judged photo by photo (each checked
against the model's input, too small being refused).
"""

from __future__ import annotations

import logging

from station.core.errors import DataError

log = logging.getLogger(__name__)


def size_text(size: tuple) -> str:
    """(height, width) -> "WIDTHxHEIGHT", the way sizes are said everywhere else."""
    return f"{size[1]}x{size[0]}"


class FrameSizes:
    """The accepted (height, width), the last one seen (for a reload to accept), frames not judged."""

    def __init__(self, set_problem):
        self.accepted: tuple[int, int] | None = None
        self.latest: tuple[int, int] | None = None
        self.not_judged = 0  # each a no_verdict with its reason
        self._set_problem = set_problem  # (kind, text or None): the daemon's state problems
        self._problem: str | None = None

    def accept(self, shape: tuple, inspector) -> str | None:
        """Judge frames of this shape from now on; why not (a region outside it, too small), keeping the old size."""
        problem = inspector.frame_problem(shape)
        if problem is None:
            self.accepted = tuple(shape[:2])
        return problem

    def refusal(self, shape: tuple, inspector) -> str | None:
        """Why a frame of this shape is not judged; None to judge it."""
        size = self.latest = tuple(shape[:2])
        if size == self.accepted:
            return None
        if self.accepted is None or inspector.whole_frame:  # the first frame seen, or every photo its own part
            return self.accept(shape, inspector)
        accepted = size_text(self.accepted)
        return (
            f"frame size {size_text(size)} differs from the {accepted} the station checked: not judged "
            f"until the camera gives {accepted} again or a reload accepts the new size"
        )

    def sort(self, frames: list, inspector) -> tuple[list, list, list]:
        """(frames to judge, their crops, [(frame, why not)]) of a batch, the refusals reported."""
        kept, crops, refused = [], [], []
        for frame in frames:
            reason = frame.problem or self.refusal(frame.image.shape, inspector)
            if reason is None:
                try:
                    crops.append(inspector.crop(frame.image))
                    kept.append(frame)
                    continue
                except DataError as exc:
                    reason = f"frame {frame.source} cannot be judged: {exc}"
            refused.append((frame, reason))
        self._report(refused, last_judged=bool(kept) and kept[-1] is frames[-1])
        return kept, crops, refused

    def _report(self, refused: list, last_judged: bool):
        """Logged and in the state when it starts, cleared once a frame is judged again. Per batch, not
        per frame: a folder of mixed sizes must not flood the log and the state."""
        self.not_judged += len(refused)
        for reason in dict.fromkeys(reason for _, reason in refused):
            if reason != self._problem:
                log.error("frames are not judged: %s", reason)
                self._say(reason)
        if last_judged and self._problem is not None:
            log.info("frames are judged again (%s)", size_text(self.accepted))
            self._say(None)

    def _say(self, problem: str | None):
        self._problem = problem
        self._set_problem("frame", problem)

    def after_reload(self, inspector, reason: str):
        """A reload or changeover is the person's word that the camera's new frame size is meant."""
        if self.latest is None or self.accepted is None or self.latest == self.accepted:
            return
        problem = self.accept(self.latest, inspector)
        if problem:
            log.error("%s: the camera's %s frames stay unjudged: %s", reason, size_text(self.latest), problem)
        else:
            log.warning("%s: the camera's new frame size %s is judged from now on", reason, size_text(self.latest))
