"""`trigger: presence`: one verdict per part, on a settled frame, from a stream of belt frames.

The gate looks at the inspection region only (the crop the model would see):

    learning --(learn_frames of empty belt)--> waiting --(differs from the belt by > enter)--> entered
    entered  --(changes < still for still_frames frames)--> judge this frame --> judged
    entered  --(back within leave of the belt before settling)--> no_verdict (never silence) --> waiting
    judged   --(back within leave of the belt)--> waiting

`enter` > `leave` is the hysteresis: a part half out of the region does not count as a new one.
While waiting, the empty-belt reference follows slow lighting drift.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEARNING, WAITING, ENTERED, JUDGED = "learning", "waiting for part", "part entered", "judged"
DRIFT = 0.05  # share of each empty frame blended into the belt reference


@dataclass(frozen=True)
class PresenceSettings:
    enter: float = 15.0  # mean absolute grey-level difference from the empty belt: a part is there
    leave: float = 8.0  # ...back below this: the region is empty again
    still: float = 4.0  # mean absolute change between consecutive frames: the part stands still
    still_frames: int = 2  # consecutive still frames before the part is judged
    learn_frames: int = 5  # empty-belt frames learned at start


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.float32) - b)))


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

    def feed(self, crop: np.ndarray) -> str | None:
        """"judge" (this frame), "no_verdict" (a part left unjudged), or None (nothing to do)."""
        if self.state == LEARNING:
            return self._learn(crop)
        away = _difference(crop, self._belt)
        if self.state == WAITING:
            if away > self.settings.enter:
                self.state, self._previous, self._still = ENTERED, crop, 0
                self.parts += 1
            else:
                self._belt += DRIFT * (crop - self._belt)
            return None
        if away < self.settings.leave:
            missed = self.state == ENTERED
            self.state = WAITING
            self.missed += missed
            return "no_verdict" if missed else None
        if self.state == ENTERED:
            moving = _difference(crop, self._previous) >= self.settings.still
            self._previous, self._still = crop, 0 if moving else self._still + 1
            if self._still >= self.settings.still_frames:
                self.state = JUDGED
                return "judge"
        return None

    def select(self, frames: list, crops: list) -> tuple[list, list, list]:
        """(frames to judge, their crops, frames on which an unjudged part left), in order."""
        judge_frames, judge_crops, missed = [], [], []
        for frame, crop in zip(frames, crops):
            decision = self.feed(crop)
            if decision == "judge":
                judge_frames.append(frame)
                judge_crops.append(crop)
            elif decision == "no_verdict":
                missed.append(frame)
        self.skipped_frames += len(frames) - len(judge_frames)
        return judge_frames, judge_crops, missed

    def _learn(self, crop: np.ndarray) -> None:
        self._learned.append(crop.astype(np.float32))
        if len(self._learned) >= self.settings.learn_frames:
            self._belt = np.median(np.stack(self._learned), axis=0)
            self._learned, self.state = [], WAITING
        return None
