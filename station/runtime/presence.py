"""`trigger: presence`: one verdict per part, on a settled frame, from a stream of belt frames.

The gate looks at the inspection region only (the crop the model would see):

    learning --(learn_frames of empty belt)--> waiting --(differs from the belt by > enter)--> entered
    entered  --(changes < still for still_frames frames)--> judge this frame --> judged
    entered  --(judge_on: centred; the part's centre crosses the region's)--> judge the nearer frame --> judged
    entered  --(back within leave of the belt before settling)--> no_verdict (never silence) --> waiting
    judged   --(back within leave of the belt)--> waiting

`enter` > `leave` is the hysteresis: a part half out of the region does not count as a new one.
On a belt that never stops (`judge_on: centred`), the part's centre is the centroid of its difference
from the belt along the region's width; the frame nearest the crossing of the region's centre is judged.

The light: a change that moves every pixel of the region by about the same amount from one frame to
the next is the light, not a part; it is added to everything the gate compares with, in every state,
so a slow drift never makes the empty belt look occupied (nor a flicker make a part look moving).

What was learned can be wrong (a part in the region at start, the light changed while a part stood
there): the belt is the settled picture the region keeps coming back to. When the region settles
again on a picture it had left, without passing the learned belt, that picture is the belt: the gate
relearns it, judges the parts that settled in between (or says one passed unjudged), and says so in
`problem` until the new belt has seen a part come and go. A region that has not looked like the belt
for `relearn_frames` frames is relearned too, from its settled picture; the belt learned before is
kept, and when the region settles back on it, that one was right (the part had stood that long).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from station.runtime.config.presence import PresenceSettings

DEFAULT_SETTINGS = PresenceSettings()  # frozen: shared by every gate built without settings

LEARNING, WAITING, ENTERED, JUDGED = "learning", "waiting for part", "part entered", "judged"
DRIFT = 0.05  # share of each empty frame blended into the belt reference
MAX_VIEWS = 8  # settled pictures remembered while the region differs from the belt
UNIFORM_SHARE = 0.5  # pixels changing alike (the rest may be a part moving) for their change to be the light's
LEFT_SETTLED = "the part left before it settled"
PASSED_UNSEEN = "a part passed while the learned empty belt was wrong (the belt was relearned)"


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.float32) - b)))


def centre_offset(crop: np.ndarray, belt: np.ndarray) -> float:
    """Where the part's centre lies from the region's centre, in pixels along the width (- left, + right)."""
    weights = np.abs(crop.astype(np.float32) - belt).reshape(crop.shape[0], crop.shape[1], -1).sum(axis=(0, 2))
    total = float(weights.sum())
    if total <= 0.0:
        return 0.0
    return float(np.dot(np.arange(len(weights)), weights) / total) - (len(weights) - 1) / 2.0


def light_change(picture: np.ndarray, previous: np.ndarray, band: float, limit: float) -> tuple[float, float]:
    """(the light's change, what moved) between two frames. The light's change is the mean change of the
    pixels near the median change, when nearly all are (a moving edge is not); what moved is the mean
    absolute change apart from the median one."""
    delta = picture - previous
    median = float(np.median(delta))
    motion = float(np.mean(np.abs(delta - median)))
    alike = np.abs(delta - median) <= band
    if alike.mean() < UNIFORM_SHARE:
        return 0.0, motion
    shift = float(delta[alike].mean())
    return (shift if abs(shift) < limit else 0.0), motion


@dataclass
class View:
    """A settled picture of the region while it differed from the belt."""

    picture: np.ndarray  # float32, follows the light
    frame: object
    crop: np.ndarray | None
    judged: bool  # judged, or belongs to the part being judged
    left: bool = False  # the region has since differed from it by more than enter
    old_belt: bool = False  # the belt learned before a relearn


class PresenceGate:
    """Feed it every frame's crop in order; it says which frames to judge and which parts got none."""

    def __init__(self, settings: PresenceSettings = DEFAULT_SETTINGS):
        self.settings = settings
        self.parts = 0  # parts seen (judged or not)
        self.missed = 0  # parts that got a no_verdict
        self.frames = 0  # frames seen
        self.judged = 0  # frames judged
        self.relearned = 0  # times the belt was relearned
        self.problem: str | None = None  # why the gate cannot be trusted right now; None when all is well
        self.notices: list[str] = []  # what it found out, to be logged (a problem may clear within one batch)
        self._start_learning()

    def _start_learning(self):
        self.state = LEARNING
        self._learned: list[np.ndarray] = []
        self._belt: np.ndarray | None = None
        self._previous: np.ndarray | None = None  # the previous frame's picture
        self._still = 0
        self._away = 0  # frames since the region last looked like the belt
        self._views: list[View] = []
        self._old_belt: View | None = None
        self._offset: float | None = None  # judge_on: centred, the previous frame's centre offset
        self._last: tuple = (None, None)  # the previous frame and its crop (it may be the one judged)
        self._out: list = []  # ("judge", frame, crop) or ("no_verdict", frame, reason), this batch
        self._after_part: str | None = None  # a part was in the region at a reset: learn once it has moved away

    # -- the interface

    @property
    def skipped_frames(self) -> int:
        """Frames not judged (empty belt, a part moving)."""
        return self.frames - self.judged

    def select(self, frames: list, crops: list) -> tuple[list, list, list]:
        """(frames to judge, their crops, (frame, reason) of parts that get no verdict), in frame order."""
        for frame, crop in zip(frames, crops):
            self._step(frame, crop)
            self._last = (frame, crop)
        out, self._out = sorted(self._out, key=lambda d: getattr(d[1], "frame_no", 0)), []
        judged = [(frame, crop) for kind, frame, crop in out if kind == "judge"]
        self.frames, self.judged = self.frames + len(frames), self.judged + len(judged)
        return (
            [f for f, _ in judged],
            [c for _, c in judged],
            [(f, why) for kind, f, why in out if kind == "no_verdict"],
        )

    def finish(self, reason: str) -> list:
        """The stream stops here: (frame, reason) for a part in the region not yet judged (then it counts as done)."""
        if self.state != ENTERED:
            return []
        self.state, self.missed = JUDGED, self.missed + 1
        return [(self._last[0], reason)]

    def reset(self, reason: str) -> list:
        """What the gate sees changed (a reload): learn the belt again; (frame, reason) for a part left unjudged."""
        part_there = self.state in (ENTERED, JUDGED)
        missed = self.finish(f"the station {reason} while a part was in the region")
        self._start_learning()
        self._after_part = "waiting" if part_there else None
        self.problem = f"learning the empty belt again: the station {reason}"
        return missed

    def feed(self, crop: np.ndarray) -> str | None:
        """One frame (its crop): "judge", "no_verdict" or None; for tests and tools that need no frames."""
        judged, _, missed = self.select([None], [crop])
        return "judge" if judged else "no_verdict" if missed else None

    # -- one frame

    def _step(self, frame, crop: np.ndarray):
        picture = crop.astype(np.float32)
        if self._belt is not None and picture.shape != self._belt.shape:  # the daemon resets first; never crash
            self._out.extend(("no_verdict", f, why) for f, why in self.reset("changed the region's size"))
        if self.state == LEARNING:
            return self._learn(picture)
        self._follow_light(picture)
        away = _difference(picture, self._belt)
        if self.state == WAITING:
            return self._wait(frame, crop, picture, away)
        self._away += 1
        if away < self.settings.leave:
            return self._back(frame)
        for view in self._views:
            view.left = view.left or _difference(picture, view.picture) > self.settings.enter
        if self._still >= self.settings.still_frames and self._settled(frame, crop, picture):
            return None
        if self.state == ENTERED and self.settings.judge_on == "centred":
            self._centred(frame, crop, picture)
        self._overdue(frame, crop, picture)
        return None

    def _follow_light(self, picture: np.ndarray):
        """Move every reference with the light; count the frames the region stood still."""
        shift, motion = light_change(picture, self._previous, self.settings.enter, self.settings.enter)
        self._previous = picture
        self._still = self._still + 1 if motion < self.settings.still else 0
        if shift:
            self._belt += shift
            for view in self._views + ([self._old_belt] if self._old_belt else []):
                view.picture += shift

    def _wait(self, frame, crop, picture, away: float):
        if away <= self.settings.enter:
            self._belt += DRIFT * (picture - self._belt)
            return None
        self.state, self._still, self._away, self.parts = ENTERED, 0, 1, self.parts + 1
        self._offset = centre_offset(crop, self._belt) if self.settings.judge_on == "centred" else None
        self._views = []
        return None

    def _back(self, frame):
        """The region looks like the belt again: the part has gone (a no_verdict if it was never judged)."""
        if self.state == ENTERED:
            self.missed += 1
            self._out.append(("no_verdict", frame, LEFT_SETTLED))
        self.state, self._views, self._away = WAITING, [], 0
        self.problem = None  # the belt has seen a part come and go
        return None

    def _settled(self, frame, crop, picture) -> bool:
        """The region stands still away from the belt: a part to judge, the same one, or the belt coming back."""
        near = [
            v
            for v in self._views + ([self._old_belt] if self._old_belt else [])
            if _difference(picture, v.picture) < self.settings.leave
        ]
        back = next((v for v in near if v.left or v.old_belt), None)
        if back is not None:
            self._relearn_from(back, frame, picture)
            return True
        if near or any(_difference(picture, v.picture) <= self.settings.enter for v in self._views):
            return False  # the same settled picture, or one too like it to be another part
        self._views = self._views[-(MAX_VIEWS - 1) :] + [View(picture.copy(), frame, crop, self.state == ENTERED)]
        if self.state == ENTERED and self.settings.judge_on == "still":
            self.state = JUDGED
            self._out.append(("judge", frame, crop))
        return False

    def _relearn_from(self, back: View, frame, picture):
        """The region came back to a picture other than the belt: that picture is the belt."""
        between = [
            v
            for v in self._views
            if not v.judged and v is not back and _difference(v.picture, picture) >= self.settings.leave
        ]
        self._out.extend(("judge", v.frame, v.crop) for v in between)
        self.parts += len(between)
        if back.old_belt:  # the belt learned first was right: the relearned picture was a part standing long
            self.notices.append(
                f"the empty belt learned before came back on frame {getattr(frame, 'source', '?')}: "
                "it is the belt again (a part had stood in the region)"
            )
            self.parts -= self.state == ENTERED  # "entering" was that part leaving
            self.problem = None
            self._old_belt = None
        else:
            if not between and self.state == JUDGED:
                self.parts, self.missed = self.parts + 1, self.missed + 1
                self._out.append(("no_verdict", frame, PASSED_UNSEEN))
            self._adopt(
                picture,
                frame,
                "the region kept settling back on a picture other than the learned empty "
                "belt (a part in the region when it was learned, or the light changed)",
            )
        self._belt, self.state, self._views, self._away = picture.copy(), WAITING, [], 0

    def _overdue(self, frame, crop, picture):
        """Away from the belt for relearn_frames: relearn from a settled picture, keep the old belt."""
        if self._away < self.settings.relearn_frames:
            return
        if self._still < self.settings.still_frames:
            self.problem = (
                f"the region has not looked like the learned empty belt for over {self.settings.relearn_frames}"
                " frames and does not stand still (a part stuck, a covered or flickering camera)"
            )
            return
        if self.state == ENTERED:  # a part that stopped where judge_on: centred waited for it to pass
            self.state = JUDGED
            self._out.append(("judge", frame, crop))
        self._old_belt = View(self._belt, None, None, judged=True, left=True, old_belt=True)
        self._adopt(
            picture,
            frame,
            f"the region had not looked like the learned empty belt for {self._away} frames "
            "(a part standing that long, a covered camera, or a belt learned wrong)",
        )
        self._belt, self.state, self._views, self._away = picture.copy(), WAITING, [], 0

    def _part_moved_away(self, picture: np.ndarray) -> bool:
        """After a reset with a part in the region: True once the region has moved and stands still again."""
        previous, self._previous = self._previous, picture
        if previous is None or previous.shape != picture.shape:
            return False
        moving = light_change(picture, previous, self.settings.enter, self.settings.enter)[1] >= self.settings.still
        if moving:
            self._after_part = "moved"
        elif self._after_part == "moved":
            self._after_part = None
        return self._after_part is None

    def _adopt(self, picture, frame, why: str):
        self.relearned += 1
        self.problem = (
            f"relearned the empty belt on frame {getattr(frame, 'source', '?')}: {why}; "
            "cleared once a part has come and gone"
        )
        self.notices.append(self.problem)

    def _centred(self, frame, crop, picture):
        """Judge this frame or the previous one once the part's centre has crossed the region's."""
        offset, previous = centre_offset(crop, self._belt), self._offset
        self._offset = offset
        if previous is None or (offset * previous > 0.0 and offset != 0.0):
            return
        self.state = JUDGED
        nearer = self._last if abs(previous) < abs(offset) and self._last[1] is not None else (frame, crop)
        self._out.append(("judge", *nearer))

    def _learn(self, picture: np.ndarray):
        if self._after_part and not self._part_moved_away(picture):
            return None
        if self._learned and self._learned[0].shape != picture.shape:
            self._learned = []
        self._learned.append(picture)
        self._previous = picture
        if len(self._learned) >= self.settings.learn_frames:
            self._belt = np.median(np.stack(self._learned), axis=0)
            self._learned, self.state = [], WAITING
            if self.problem and self.problem.startswith("learning"):
                self.problem = None
        return None
