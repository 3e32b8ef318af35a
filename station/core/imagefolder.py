"""The image-folder convention used everywhere.

    DIR/good/...        known-good parts
    DIR/<defect>/...    one folder per defect class (any name but good)

Images may be any size, gray or colour, 8 or 16 bit. Folders are read
recursively and listed in a sorted, reproducible order; hidden files and
folders (a name starting with '.') are skipped.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
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
    """Every image file below a folder, recursively, sorted; hidden files and folders are not read.

    Linked folders are followed (Path.rglob skipped them silently inside a class folder), each real
    folder once, so a link back up cannot loop. An image's name that is not a readable file (a link to
    nothing, a named pipe) is listed too: reading it says why, where skipping it lost a part unnamed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    found, visited = [], set()
    for top, folders, files in os.walk(folder, followlinks=True):
        status = os.stat(top)
        if (status.st_dev, status.st_ino) in visited:
            folders[:] = []
            continue
        visited.add((status.st_dev, status.st_ino))
        folders[:] = sorted(
            name for name in folders if not name.startswith(".")
        )  # the same folder linked twice: the first name
        here = Path(top)
        found.extend(
            here / name for name in files if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
        )
    return sorted(found)


def is_hidden(relative: Path) -> bool:
    """A name starting with '.' on the way: macOS's ._* resource forks and .DS_Store, .ipynb_checkpoints,
    a viewer's .thumbnails. Never parts: reading them made classes of them or refused them as unreadable."""
    return any(part.startswith(".") for part in Path(relative).parts)


def scan_dataset(root: Path, require_good: bool = True) -> list[LabeledImage]:
    """All images of an image-folder dataset with their class (the subfolder name)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: {'not a folder' if root.exists() else 'dataset folder does not exist'} "
            f"(give the folder that holds {GOOD}/ and one folder per defect class)"
        )
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(Path(p.name))):
        items.extend(LabeledImage(path, class_dir.name) for path in list_images(class_dir))
    if require_good and not any(not item.is_defect for item in items):
        raise DataError(f"{root}: no images under {root / GOOD}/ (known-good parts are required){_no_good_hint(root)}")
    if not items:
        raise DataError(f"{root}: no images found in any class folder")
    return items


def _no_good_hint(root: Path) -> str:
    """What the folder holds instead, so the refusal says what to change."""
    good = root / GOOD
    if good.is_dir():
        kinds = sorted(
            {p.suffix.lower() or p.name for p in good.rglob("*") if p.is_file() and not is_hidden(p.relative_to(good))}
        )
        return (
            f"; it holds {', '.join(kinds)} files, the station reads {' '.join(sorted(IMAGE_SUFFIXES))}"
            if kinds
            else "; it is empty"
        )
    cased = [p.name for p in root.iterdir() if p.is_dir() and p.name.lower() == GOOD]
    if cased:
        return f"; rename {root / cased[0]}/ to {GOOD}/ (folder names are case-sensitive)"
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()):
        return f"; {root} holds images itself: --data takes the folder that holds {GOOD}/ and the defect folders"
    return f"; put photos of known-good parts in {good}/"


def pixel_count(data: np.ndarray) -> int | None:
    """Width x height from an image file's header alone; None if unknown.

    PNG and JPEG (what cameras and image folders hold) are read here in a few
    microseconds; anything else through Pillow, which reads no pixels either
    (but costs ~90 us a file: too much per frame of a folder source).
    """
    head = data[:24].tobytes()  # the file's bytes as read (uint8)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big") * int.from_bytes(head[20:24], "big")
    if head[:2] == b"\xff\xd8":
        return _jpeg_pixels(data[:JPEG_HEADER_BYTES].tobytes())
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # the station bounds pixels itself, with the real count in its message
    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None  # not a format Pillow knows: OpenCV decides (and bounds it at 2^30 pixels)
    return width * height


JPEG_HEADER_BYTES = 1 << 18  # the frame header follows EXIF and thumbnails, within the first 64 KiB or so


def _jpeg_pixels(data: bytes) -> int | None:
    """The frame size of the first SOF marker (SOF0-SOF15 but DHT, JPG, DAC)."""
    at = 2
    while at + 9 <= len(data) and data[at] == 0xFF:
        marker, length = data[at + 1], int.from_bytes(data[at + 2 : at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[at + 5 : at + 7], "big") * int.from_bytes(data[at + 7 : at + 9], "big")
        at += 2 + length
    return None


DEFAULT_MAX_PIXELS = 50_000_000  # camera.max_pixels' default: far above any inspection camera's frame


def max_file_bytes(max_pixels: int | None) -> int:
    """The largest file an image of max_pixels can be: 16-bit RGBA uncompressed, and room for metadata."""
    return (max_pixels or DEFAULT_MAX_PIXELS) * 8 + (1 << 20)


def read_image(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image as stored (gray, colour, 8 or 16 bit); name the file on failure.

    With max_pixels, an image whose header declares more pixels is refused
    before anything is decoded: a small file can unpack to gigabytes.
    """
    path = Path(path)
    limit = max_file_bytes(max_pixels)
    try:
        size = regular_file_size(path)
        if size > limit:  # read whole, a 20 GB file named part.png would take the line PC's memory
            raise ImageReadError(
                path,
                f"is {size / 1e6:.0f} MB, more than an image of "
                f"{(max_pixels or DEFAULT_MAX_PIXELS) / 1e6:g} MP can be: refused before reading",
            )
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(path, f"cannot be read ({exc.strerror})") from exc
    if data.size == 0:
        raise ImageReadError(path, "is empty (0 bytes)")
    if max_pixels is not None:
        pixels = pixel_count(data)
        if pixels is not None and pixels > max_pixels:
            raise ImageReadError(
                path,
                f"declares {pixels / 1e6:.0f} MP, more than camera.max_pixels "
                f"({max_pixels / 1e6:g} MP): refused before decoding",
            )
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageReadError(path)
    if image.dtype not in (np.uint8, np.uint16):  # float or 32-bit TIFFs decode, but no step can use them
        raise ImageReadError(
            path,
            f"has {image.dtype} pixels; the station reads 8- or 16-bit images: save it as an 8- or 16-bit PNG or TIFF",
        )
    return image


def regular_file_size(path: Path) -> int:
    """The size of a regular file; ImageReadError (naming it) for what cannot be read as one: a link to
    nothing, or a named pipe, socket or device, whose read would block the station or never end."""
    try:
        status = os.stat(path)
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise ImageReadError(path, f"is a link to {os.readlink(path)}, which does not exist") from exc
        raise
    if not stat.S_ISREG(status.st_mode):
        raise ImageReadError(path, f"is not a file but a {_file_kind(status.st_mode)}: nothing to read")
    return status.st_size


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "named pipe"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "folder"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def image_digest(path: Path) -> str:
    """A short content digest of an image file: which photos trained a model (its metadata)."""
    try:
        regular_file_size(path)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError as exc:
        raise ImageReadError(path, f"cannot be read ({exc.strerror})") from exc


def dataset_fingerprint(items: list[LabeledImage], root: Path) -> str:
    """sha256 over relative paths and file contents: which data a model saw."""
    digest = hashlib.sha256()
    root = Path(root)
    for item in items:
        digest.update(str(item.path.relative_to(root)).encode())
        digest.update(hashlib.sha256(item.path.read_bytes()).digest())
    return digest.hexdigest()
