"""`trigger: presence`: one verdict per part, on a settled frame, from a stream of belt frames.

The gate looks at the inspection region only (the crop the model would see):

    learning --(learn_frames of empty belt)--> waiting --(differs from the belt by > enter)--> entered
    entered  --(changes < still for still_frames frames)--> judge this frame --> judged
    entered  --(judge_on: centred; the part's centre crosses the region's)--> judge the nearer frame --> judged
    entered  --(back within leave of the belt before settling)--> no_verdict (never silence) --> waiting
    judged   --(back within leave of the belt)--> waiting

`enter` > `leave` is the hysteresis: a part half out of the region does not count as a new one.
While waiting, the empty-belt reference follows slow lighting drift. On a belt that never stops
(`judge_on: centred`), the part's centre is the centroid of its difference from the belt along the
region's width; the frame nearest the crossing of the region's centre is judged, either direction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEARNING, WAITING, ENTERED, JUDGED = "learning", "waiting for part", "part entered", "judged"
DRIFT = 0.05  # share of each empty frame blended into the belt reference
JUDGE_ON = ("still", "centred")


@dataclass(frozen=True)
class PresenceSettings:
    enter: float = 15.0  # mean absolute grey-level difference from the empty belt: a part is there
    leave: float = 8.0  # ...back below this: the region is empty again
    still: float = 4.0  # mean absolute change between consecutive frames: the part stands still
    still_frames: int = 2  # consecutive still frames before the part is judged
    learn_frames: int = 5  # empty-belt frames learned at start
    judge_on: str = "still"  # "still": a stop-and-go belt; "centred": a belt that never stops


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.float32) - b)))


def centre_offset(crop: np.ndarray, belt: np.ndarray) -> float:
    """Where the part's centre lies from the region's centre, in pixels along the width (- left, + right)."""
    weights = np.abs(crop.astype(np.float32) - belt).reshape(crop.shape[0], crop.shape[1], -1).sum(axis=(0, 2))
    total = float(weights.sum())
    if total <= 0.0:
        return 0.0
    return float(np.dot(np.arange(len(weights)), weights) / total) - (len(weights) - 1) / 2.0


class PresenceGate:
    """Feed it every frame's crop in order; it says which frames to judge and which parts got none."""

    def __init__(self, settings: PresenceSettings = PresenceSettings()):
        self.settings = settings
        self.state = LEARNING
        self.parts = 0  # parts seen (judged or not)
        self.missed = 0  # parts that left before settling
        self.skipped_frames = 0  # frames not judged (empty belt, a part moving)
        self._learned: list[np.ndarray] = []
        self._belt: np.ndarray | None = None
        self._previous: np.ndarray | None = None
        self._still = 0
        self._offset: float | None = None  # judge_on: centred, the previous frame's centre offset
        self._last: tuple = (None, None)  # the previous frame and its crop (it may be the one judged)

    def feed(self, crop: np.ndarray) -> str | None:
        """"judge" (this frame), "no_verdict" (a part left unjudged), or None (nothing to do)."""
        if self.state == LEARNING:
            return self._learn(crop)
        away = _difference(crop, self._belt)
        if self.state == WAITING:
            if away > self.settings.enter:
                self.state, self._previous, self._still = ENTERED, crop, 0
                self._offset = centre_offset(crop, self._belt) if self.settings.judge_on == "centred" else None
                self.parts += 1
            else:
                self._belt += DRIFT * (crop - self._belt)
            return None
        if away < self.settings.leave:
            missed = self.state == ENTERED
            self.state = WAITING
            self.missed += missed
            return "no_verdict" if missed else None
        if self.state == ENTERED and self.settings.judge_on == "centred":
            return self._centred(crop)
        if self.state == ENTERED:
            moving = _difference(crop, self._previous) >= self.settings.still
            self._previous, self._still = crop, 0 if moving else self._still + 1
            if self._still >= self.settings.still_frames:
                self.state = JUDGED
                return "judge"
        return None

    def _centred(self, crop: np.ndarray) -> str | None:
        """"judge" this frame or "judge_previous" once the part's centre has crossed the region's."""
        offset, previous = centre_offset(crop, self._belt), self._offset
        self._offset = offset
        if previous is None or (offset * previous > 0.0 and offset != 0.0):
            return None
        self.state = JUDGED
        return "judge_previous" if abs(previous) < abs(offset) else "judge"

    def select(self, frames: list, crops: list) -> tuple[list, list, list]:
        """(frames to judge, their crops, frames on which an unjudged part left), in order."""
        judge_frames, judge_crops, missed = [], [], []
        for frame, crop in zip(frames, crops):
            decision = self.feed(crop)
            if decision == "judge_previous":  # the frame before was nearer the centre
                judge_frames.append(self._last[0])
                judge_crops.append(self._last[1])
            elif decision == "judge":
                judge_frames.append(frame)
                judge_crops.append(crop)
            elif decision == "no_verdict":
                missed.append(frame)
            self._last = (frame, crop)
        self.skipped_frames += len(frames) - len(judge_frames)
        return judge_frames, judge_crops, missed

    def _learn(self, crop: np.ndarray) -> None:
        self._learned.append(crop.astype(np.float32))
        if len(self._learned) >= self.settings.learn_frames:
            self._belt = np.median(np.stack(self._learned), axis=0)
            self._learned, self.state = [], WAITING
        return None
