"""`presence:` in station.yaml: the settings of `trigger: presence`, with their defaults and what each means
(the gate itself: station/runtime/presence.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from station.core.config_model import ConfigModel

JUDGE_ON = ("still", "centred")


@dataclass(frozen=True)
class PresenceSettings:
    enter: float = 15.0  # mean absolute grey-level difference from the empty belt: a part is there
    leave: float = 8.0  # ...back below this: the region is empty again
    still: float = 4.0  # mean absolute change between consecutive frames, the light's aside: the part stands still
    still_frames: int = 2  # consecutive still frames before the part is judged
    learn_frames: int = 5  # empty-belt frames learned at start
    judge_on: str = "still"  # "still": a stop-and-go belt; "centred": a belt that never stops
    relearn_frames: int = 750  # frames the region may differ from the belt before the belt is relearned


class PresenceConfig(ConfigModel):
    """trigger: presence (the defaults and what each means: PresenceSettings above)."""

    enter: float = Field(PresenceSettings.enter, gt=0)
    leave: float = Field(PresenceSettings.leave, gt=0)
    still: float = Field(PresenceSettings.still, gt=0)
    still_frames: int = Field(PresenceSettings.still_frames, ge=1)
    learn_frames: int = Field(PresenceSettings.learn_frames, ge=1)
    judge_on: Literal[JUDGE_ON] = PresenceSettings.judge_on
    relearn_frames: int = Field(PresenceSettings.relearn_frames, ge=1)

    @model_validator(mode="after")
    def _hysteresis(self):
        if self.leave >= self.enter:
            raise ValueError(f"leave ({self.leave:g}) must be below enter ({self.enter:g}): that is the hysteresis")
        return self

    def settings(self) -> PresenceSettings:
        return PresenceSettings(**self.model_dump())
