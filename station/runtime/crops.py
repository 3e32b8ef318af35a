"""Keep NG crops (and optionally a sample of OK ones) for review and retraining: the region
at the camera's resolution, as the quality engineer needs to see the defect.

Files are named by verdict id under STATE/crops/{NG,OK}/, and the folder is
kept under a size bound by deleting the oldest files first. A writer thread
does the disk work: a slow or full disk must never stall inspection, so when
the writer falls behind, crops are skipped and counted, never verdicts.
"""

from __future__ import annotations

import errno
import logging
import queue
import random
import shutil
import threading
import time
from collections import deque
from pathlib import Path

import cv2
import numpy as np

from station.core.verdict import NG, OK

log = logging.getLogger(__name__)
QUEUE_DEPTH = 512
QUEUE_BYTES = 64_000_000  # crops are regions at the camera's resolution: a bound in bytes as well
FAILURE_LOG_INTERVAL = 60.0  # seconds between "cannot keep crop" warnings
# Crops share the state folder's disk with the outbox: they never take its last FREE_SPACE_RESERVE
# bytes, so review pictures cannot fill the disk under the verdicts (max_mb bounds only the crops).
FREE_SPACE_RESERVE = 64 << 20


class CropKeeper:
    def __init__(self, folder: Path, keep_ng: bool, ok_sample_rate: float, max_bytes: int, seed: int | None = None):
        self.folder = Path(folder)
        self.keep_ng, self.ok_sample_rate, self.max_bytes = keep_ng, ok_sample_rate, max_bytes
        self.skipped = 0  # crops not kept because the writer was behind
        self.failed = 0  # crops that could not be written (full disk, no folder)
        self.folder_error: str | None = None  # why the crops folder cannot be used
        self._last_failure_log = -float("inf")
        self._random = random.Random(seed)
        self._files: deque[tuple[Path, int]] = deque()  # oldest first
        self._bytes = 0
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self._queued_bytes = 0  # of crops waiting for the writer (updated by both threads: a close estimate)
        self._thread: threading.Thread | None = None

    @classmethod
    def for_station(cls, state_dir: Path, keep) -> "CropKeeper":
        """The keeper for STATE/crops as `keep_crops:` in station.yaml says."""
        return cls(Path(state_dir) / "crops", keep.ng, keep.ok_sample_rate, int(keep.max_mb * 1e6))

    def wants(self, verdict: str) -> bool:
        if self.max_bytes <= 0:
            return False
        if verdict == NG:
            return self.keep_ng
        return self.ok_sample_rate > 0 and self._random.random() < self.ok_sample_rate

    def keep(self, crop: np.ndarray, verdict: str, verdict_id: str):
        """Queue the crop for writing; returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, daemon=True, name="crop-keeper")
            self._thread.start()
        try:
            if self._queued_bytes + crop.nbytes > QUEUE_BYTES:
                raise queue.Full
            self._queue.put_nowait((crop.copy(), verdict, verdict_id))
            self._queued_bytes += crop.nbytes
        except queue.Full:
            self.skipped += 1
            if self.skipped % 1000 == 1:
                log.warning("crop writer is behind (%s): %d crops not kept so far", self.folder, self.skipped)

    def close(self, timeout: float = 2.0):
        """Write what is queued (within timeout), then stop the writer; never blocks longer."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def _write_loop(self):
        try:
            self._load_existing()
            for verdict in (NG, OK):
                (self.folder / verdict).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file where the folder should be, a full or read-only disk
            log.error("cannot keep crops in %s: %s; inspection goes on without them", self.folder, exc)
            self.folder_error = str(exc)
            while (item := self._queue.get()) is not None:
                self.failed += 1  # drained, so keep() and close() never block on a full queue
            return
        while (item := self._queue.get()) is not None:
            self._write(*item)
            self._queued_bytes -= item[0].nbytes

    def _load_existing(self):
        existing = sorted((p for p in self.folder.glob("*/*.png") if p.is_file()), key=lambda p: p.stat().st_mtime)
        self._files = deque((p, p.stat().st_size) for p in existing)
        self._bytes = sum(size for _, size in self._files)

    def _write(self, crop: np.ndarray, verdict: str, verdict_id: str):
        path = self.folder / verdict / f"{verdict_id}.png"
        try:
            ok, encoded = cv2.imencode(".png", crop)
            if not ok:
                raise OSError("PNG encoding failed")
            if shutil.disk_usage(self.folder).free - len(encoded) < FREE_SPACE_RESERVE:
                raise OSError(errno.ENOSPC, f"less than {FREE_SPACE_RESERVE >> 20} MB would stay free for the outbox")
            path.write_bytes(encoded.tobytes())
        except OSError as exc:  # a full disk loses a review picture, never a verdict
            path.unlink(missing_ok=True)  # no half-written picture left behind
            self.failed += 1
            now = time.monotonic()
            if now - self._last_failure_log >= FAILURE_LOG_INTERVAL:  # one line a minute, not one per part
                log.warning("cannot keep crop %s: %s (%d crops not kept so far)", path, exc, self.failed)
                self._last_failure_log = now
            return
        self._files.append((path, len(encoded)))
        self._bytes += len(encoded)
        while self._bytes > self.max_bytes and self._files:
            oldest, size = self._files.popleft()
            oldest.unlink(missing_ok=True)
            self._bytes -= size
