"""The image-folder convention used everywhere.

    DIR/good/...        known-good parts
    DIR/<defect>/...    one folder per defect class (any name but good)

Images may be any size, gray or colour, 8 or 16 bit. Folders are read
recursively and listed in a sorted, reproducible order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from station.core.errors import DataError, ImageReadError

GOOD = "good"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm"})


@dataclass(frozen=True)
class LabeledImage:
    path: Path
    defect_class: str  # "good" for known-good parts

    @property
    def is_defect(self) -> bool:
        return self.defect_class != GOOD


def list_images(folder: Path) -> list[Path]:
    """Every image file below a folder, recursively, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def scan_dataset(root: Path, require_good: bool = True) -> list[LabeledImage]:
    """All images of an image-folder dataset with their class (the subfolder name)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        items.extend(LabeledImage(path, class_dir.name) for path in list_images(class_dir))
    if require_good and not any(not item.is_defect for item in items):
        raise DataError(f"{root}: no images under {root / GOOD}/ (known-good parts are required)")
    if not items:
        raise DataError(f"{root}: no images found in any class folder")
    return items


def pixel_count(path: Path) -> int | None:
    """Width x height from the file's header alone (Pillow reads no pixels); None if unknown."""
    from PIL import Image, UnidentifiedImageError

    # The station bounds pixels itself (camera.max_pixels), with the real count in its message.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None  # not a format Pillow knows: OpenCV decides (and bounds it at 2^30 pixels)
    return width * height


def read_image(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image as stored (gray, colour, 8 or 16 bit); name the file on failure.

    With max_pixels, an image whose header declares more pixels is refused
    before anything is decoded: a small file can unpack to gigabytes.
    """
    path = Path(path)
    if max_pixels is not None:
        pixels = pixel_count(path)
        if pixels is not None and pixels > max_pixels:
            raise ImageReadError(path, f"declares {pixels / 1e6:.0f} MP, more than camera.max_pixels "
                                       f"({max_pixels / 1e6:g} MP): refused before decoding")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(path, f"cannot be read ({exc.strerror})") from exc
    if data.size == 0:
        raise ImageReadError(path, "is empty (0 bytes)")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageReadError(path)
    return image


def image_digest(path: Path) -> str:
    """A short content digest of an image file: which photos trained a model (its metadata)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def dataset_fingerprint(items: list[LabeledImage], root: Path) -> str:
    """sha256 over relative paths and file contents: which data a model saw."""
    digest = hashlib.sha256()
    root = Path(root)
    for item in items:
        digest.update(str(item.path.relative_to(root)).encode())
        digest.update(hashlib.sha256(item.path.read_bytes()).digest())
    return digest.hexdigest()
