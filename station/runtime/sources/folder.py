"""An image folder as a camera: every image below it, sorted, once or in a loop."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from station.core.errors import DataError
from station.core.imagefolder import list_images, read_image
from station.runtime.sources.base import Frame, FrameSource

log = logging.getLogger(__name__)


class FolderSource(FrameSource):
    """Images below a folder, recursively, sorted; `source` is the path inside the folder."""

    def __init__(self, folder: Path, loop: bool = False, fps: float = 0.0, max_pixels: int | None = None):
        super().__init__(str(folder), fps)
        self.max_pixels = max_pixels
        self.folder = Path(folder)
        self.loop = loop
        self.skipped = 0

    def _frames(self) -> Iterator[Frame]:
        while not self.closed:
            try:
                paths = list_images(self.folder)
            except DataError as exc:
                log.error("image folder source: %s", exc)
                return
            delivered = 0
            for path in paths:
                try:
                    image = read_image(path, self.max_pixels)
                except DataError as exc:
                    self.skipped += 1
                    log.warning("skipped unreadable image %s", exc)
                    continue
                if not self._pace():
                    return
                delivered += 1
                yield self._frame(image, str(path.relative_to(self.folder)))
            if not self.loop or delivered == 0:  # looping over nothing readable would spin
                if delivered == 0 and self.loop:
                    log.error("image folder %s has no readable images: source ended", self.folder)
                return
