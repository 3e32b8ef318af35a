"""An image folder as a camera: every image below it, sorted, once or in a loop.

A looping folder is a camera: when it is gone or holds nothing readable
(renamed away, emptied, being refilled) it reconnects with backoff and says
why. A folder read once ends, and says why when it gave no frame at all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from station.core.backoff import Backoff
from station.core.errors import DataError
from station.core.imagefolder import IMAGE_SUFFIXES, list_images, read_image
from station.runtime.sources.base import Frame, FrameSource

log = logging.getLogger(__name__)


class FolderSource(FrameSource):
    """Images below a folder, recursively, sorted; `source` is the path inside the folder."""

    def __init__(
        self,
        folder: Path,
        loop: bool = False,
        fps: float = 0.0,
        max_pixels: int | None = None,
        backoff: Backoff | None = None,
    ):
        super().__init__(str(folder), fps)
        self.max_pixels = max_pixels
        self.folder = Path(folder)
        self.loop = loop
        self.skipped = 0
        # Listing a folder is cheap and one renamed back should be read again soon.
        self.backoff = backoff or Backoff(first=0.5, ceiling=5.0)

    def _frames(self) -> Iterator[Frame]:
        lost_before = False
        while not self.closed:
            try:
                paths = list_images(self.folder)
            except DataError as exc:
                why = f"image folder {exc}" if self.folder.exists() else f"image folder {self.folder} does not exist"
            else:
                delivered, first_error = 0, None
                for path in paths:
                    try:
                        image = read_image(path, self.max_pixels)
                    except DataError as exc:
                        self.skipped += 1
                        first_error = first_error or str(exc)
                        log.warning("skipped unreadable image %s", exc)
                        if not self._pace():
                            return
                        yield self._unreadable(str(path.relative_to(self.folder)), f"unreadable image {exc}")
                        continue
                    if not self._pace():
                        return
                    if delivered == 0:
                        self._back(lost_before)
                        lost_before = False
                    delivered += 1
                    yield self._frame(image, str(path.relative_to(self.folder)))
                if delivered:
                    if not self.loop:
                        return
                    continue
                why = self._nothing_readable(len(paths), first_error)
            if not self.loop:
                self._ended_without_frames(why)
                return
            lost_before = self._lost(why)  # looping over nothing readable would spin

    def _nothing_readable(self, listed: int, first_error: str | None) -> str:
        if listed == 0:
            return (
                f"image folder {self.folder} holds no images "
                f"(the station reads {' '.join(sorted(IMAGE_SUFFIXES))}; hidden files are skipped)"
            )
        return f"image folder {self.folder}: none of its {listed} images can be read (e.g. {first_error})"
