"""The simulated line as a camera (sim://?seed=N&count=N): one full frame per part."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

from station.core.simulated_line import render_frame, render_part
from station.runtime.sources.base import Frame, FrameSource


class SimSource(FrameSource):
    """The simulated line (station.core.simulated_line): one full frame per part, endless unless count."""

    def __init__(self, seed: int = 0, count: int | None = None, loop: bool = False, fps: float = 0.0):
        super().__init__(f"sim://?seed={seed}" + (f"&count={count}" if count else ""), fps)
        self.seed, self.count, self.loop = seed, count, loop

    def _frames(self) -> Iterator[Frame]:
        while True:
            indices = itertools.count() if self.count is None else range(self.count)
            for index in indices:
                if not self._pace():
                    return
                exposed = time.monotonic()  # the simulated shutter: rendering time is not the camera's
                image = render_frame(render_part(self.seed, index), self.seed)
                yield self._frame(image, f"sim:{self.seed}:{index}", grabbed_at=exposed)
            if not self.loop:
                return
