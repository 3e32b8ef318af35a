"""Keep NG crops (and optionally a sample of OK ones) for review and retraining.

Files are named by verdict id under STATE/crops/{NG,OK}/, and the folder is
kept under a size bound by deleting the oldest files first.
"""
from __future__ import annotations

import logging
import random
from collections import deque
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)


class CropKeeper:
    def __init__(self, folder: Path, keep_ng: bool, ok_sample_rate: float, max_bytes: int, seed: int | None = None):
        self.folder = Path(folder)
        self.keep_ng, self.ok_sample_rate, self.max_bytes = keep_ng, ok_sample_rate, max_bytes
        self._random = random.Random(seed)
        self._files: deque[tuple[Path, int]] = deque()  # oldest first
        self._bytes = 0
        self._load_existing()

    def _load_existing(self):
        existing = sorted(
            (p for p in self.folder.glob("*/*.png") if p.is_file()), key=lambda p: p.stat().st_mtime
        ) if self.folder.is_dir() else []
        self._files = deque((p, p.stat().st_size) for p in existing)
        self._bytes = sum(size for _, size in self._files)

    def wants(self, verdict: str) -> bool:
        if verdict == "NG":
            return self.keep_ng and self.max_bytes > 0
        return self.ok_sample_rate > 0 and self.max_bytes > 0 and self._random.random() < self.ok_sample_rate

    def keep(self, crop: np.ndarray, verdict: str, verdict_id: str):
        """Write the crop; a failure is logged, never allowed to stop inspection."""
        path = self.folder / verdict / f"{verdict_id}.png"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            ok, encoded = cv2.imencode(".png", crop)
            if not ok:
                raise OSError("PNG encoding failed")
            path.write_bytes(encoded.tobytes())
        except OSError as exc:
            log.warning("cannot keep crop %s: %s", path, exc)
            return
        size = path.stat().st_size
        self._files.append((path, size))
        self._bytes += size
        self._trim()

    def _trim(self):
        while self._bytes > self.max_bytes and self._files:
            oldest, size = self._files.popleft()
            oldest.unlink(missing_ok=True)
            self._bytes -= size
