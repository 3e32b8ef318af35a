"""The data check `station fit` runs before anything trains.

Every image is read once: unreadable files are named together; an image whose
pixels appear in two classes is refused with both paths (its label cannot be
right twice); near-duplicates (8x8 difference hash of the grey image within
NEAR_DUPLICATE_BITS bits AND a 16x16 thumbnail within NEAR_DUPLICATE_GREY grey
levels) form groups that the split never cuts, so a part photographed twice
cannot sit in training and in the test at once. The hash alone is not enough:
smooth surfaces (magnetic tiles) give different photos the same gradient signs,
and chained into groups they made whole tile types one part of the split.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from station.core.errors import DataError, ImageReadError
from station.core.imagefolder import GOOD, IMAGE_SUFFIXES, LabeledImage, is_hidden, read_image, scan_dataset

NEAR_DUPLICATE_BITS = 3  # of 64; simulated distinct parts lie >= 4 bits apart, most > 15
# Mean absolute difference of 16x16 grey thumbnails: the same part shot again differs by ~1-2. On the
# 1,344 magnetic-tile photos the hash alone chained 653 images into 142 groups; with this bound
# 29 images in 13 groups remain (20 pairs within 3 grey levels; the 0.01 % quantile of all pairs is 5).
NEAR_DUPLICATE_GREY = 3.0
# A part photographed again makes a group of a few photos (magnetic tiles: 13 groups of 2-3). A group
# above this share of its class, and above MIN_GROUP_CAP photos, is the check chaining different parts
# of a uniform product under a fixed camera: kept whole it starved the split (151 of 200 good parts in
# one group left 34 to train on) or made fit refuse; it is split as separate parts, with a warning.
MAX_GROUP_SHARE = 0.05
MIN_GROUP_CAP = 5
MIN_DEFECTS_PER_CLASS = 5
LOOKS_LIKE_IMAGES = frozenset({".webp", ".gif", ".heic", ".jp2", ".exr", ".raw", ".dng"})  # photos not read
MIN_GOOD = 50  # the calibration part (a fifth) must hold calibration's 10 good parts
MAX_NAMED = 20
LOW_BITS_LIMIT = 1 << 14  # a 16-bit image with no pixel above this keeps at most 64 grey levels


@dataclass(frozen=True)
class DataCheck:
    root: Path
    items: list[LabeledImage]
    groups: np.ndarray  # near-duplicate group per item; a group is never split
    file_sha256: list[str]
    warnings: list[str]
    native_size: tuple[int, int]  # median (width, height) of the images

    @property
    def fingerprint(self) -> str:
        """sha256 over sorted relative paths and file digests."""
        digest = hashlib.sha256()
        for relative, file_digest in sorted(zip(self.relative_paths, self.file_sha256)):
            digest.update(relative.encode() + b"\0" + file_digest.encode())
        return digest.hexdigest()

    @property
    def relative_paths(self) -> list[str]:
        return [item.path.relative_to(self.root).as_posix() for item in self.items]

    @property
    def class_counts(self) -> dict[str, int]:
        names = [item.defect_class for item in self.items]
        return {name: names.count(name) for name in sorted(set(names))}


def check_data(root: Path, min_good: int = MIN_GOOD) -> DataCheck:
    root = Path(root)
    items = scan_dataset(root)
    seen = _read_all(items)
    pixel_keys = [one.pixel_key for one in seen]
    _refuse_cross_class_duplicates(items, pixel_keys)
    groups = near_duplicate_groups([one.hash for one in seen], pixel_keys, np.stack([one.thumbnail for one in seen]))
    groups, dissolved = dissolve_chained_groups(items, groups)
    size = (int(np.median([one.size[0] for one in seen])), int(np.median([one.size[1] for one in seen])))
    digests = [one.digest for one in seen]
    data = DataCheck(root, items, groups, digests, [], size)
    warnings = (
        _count_warnings(data.class_counts, min_good)
        + dissolved
        + _group_warnings(items, groups)
        + _unread_warnings(root, items)
        + _low_bits_warnings(seen)
    )
    return DataCheck(root, items, groups, digests, warnings, size)


@dataclass(frozen=True)
class _Seen:
    """What the check keeps of one image, never its pixels: held decoded, 300 colour photos of 3 MP took
    2.7 GB (a thousand of a 12 MP camera: 36 GB); this way 90 MB."""

    digest: str  # of the file
    pixel_key: str  # of the decoded pixels
    hash: int
    thumbnail: np.ndarray
    size: tuple[int, int]  # width, height
    brightest16: int | None = None  # the brightest pixel of a 16-bit image


def _read_all(items: list[LabeledImage]) -> list[_Seen]:
    seen, failures = [], []
    for item in items:
        try:
            image = read_image(item.path)
        except ImageReadError as exc:
            failures.append(str(exc))
            continue
        seen.append(
            _Seen(
                hashlib.sha256(item.path.read_bytes()).hexdigest(),
                _pixel_key(image),
                difference_hash(image),
                thumbnail(image),
                (image.shape[1], image.shape[0]),
                int(image.max()) if image.dtype == np.uint16 else None,
            )
        )
    if failures:
        shown = "\n  ".join(failures[:MAX_NAMED])
        more = f"\n  ... and {len(failures) - MAX_NAMED} more" if len(failures) > MAX_NAMED else ""
        raise DataError(f"{len(failures)} image(s) cannot be read (fix or remove them):\n  {shown}{more}")
    return seen


def _pixel_key(image: np.ndarray) -> str:
    return hashlib.sha256(f"{image.shape}{image.dtype}".encode() + np.ascontiguousarray(image).tobytes()).hexdigest()


def _refuse_cross_class_duplicates(items: list[LabeledImage], keys: list[str]):
    first_seen: dict[str, int] = {}
    clashes = []
    for index, key in enumerate(keys):
        other = first_seen.setdefault(key, index)
        if other != index and items[other].defect_class != items[index].defect_class:
            clashes.append(
                f"{items[other].path} ({items[other].defect_class}) and "
                f"{items[index].path} ({items[index].defect_class})"
            )
    if clashes:
        shown = "\n  ".join(clashes[:MAX_NAMED])
        raise DataError(
            f"{len(clashes)} image(s) have the same pixels in two classes; one label is wrong, "
            f"remove or relabel one of each pair:\n  {shown}"
        )


def grey8(image: np.ndarray) -> np.ndarray:
    """Grey, 8-bit view of any stored image (16-bit scaled down)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY) if image.shape[2] >= 3 else image[:, :, 0]
    if image.dtype != np.uint8:
        image = (image.astype(np.float64) * (255.0 / max(float(np.iinfo(image.dtype).max), 1.0))).astype(np.uint8)
    return image


def difference_hash(image: np.ndarray) -> int:
    """64-bit dHash: is each of 8x8 cells brighter than its right neighbour (9x8 area-resized grey)."""
    small = cv2.resize(grey8(image).astype(np.float32), (9, 8), interpolation=cv2.INTER_AREA)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def thumbnail(image: np.ndarray) -> np.ndarray:
    return cv2.resize(grey8(image).astype(np.float32), (16, 16), interpolation=cv2.INTER_AREA)


def near_duplicate_groups(
    hashes: list[int],
    pixel_keys: list[str],
    thumbnails: np.ndarray | None = None,
    bits: int = NEAR_DUPLICATE_BITS,
    grey: float = NEAR_DUPLICATE_GREY,
) -> np.ndarray:
    """Group id per image: images within `bits` Hamming bits whose thumbnails also differ by at most
    `grey` levels (or with identical pixels) share one."""
    n = len(hashes)
    parent = np.arange(n)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    values = np.array(hashes, dtype=np.uint64)
    for i in range(n - 1):
        close = np.flatnonzero(np.bitwise_count(values[i + 1 :] ^ values[i]) <= bits) + i + 1
        if thumbnails is not None and close.size:
            close = close[np.abs(thumbnails[close] - thumbnails[i]).mean(axis=(1, 2)) <= grey]
        for j in close:
            parent[find(j)] = find(i)
    by_key: dict[str, int] = {}
    for i, key in enumerate(pixel_keys):
        parent[find(i)] = find(by_key.setdefault(key, i))
    roots = np.array([find(i) for i in range(n)])
    return np.unique(roots, return_inverse=True)[1]


def dissolve_chained_groups(items: list[LabeledImage], groups: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Groups too large to be one part photographed again become separate parts; (groups, warnings)."""
    groups = np.asarray(groups).copy()
    counts = Counter(item.defect_class for item in items)
    warnings, next_id = [], int(groups.max(initial=-1)) + 1
    for group in np.flatnonzero(np.bincount(groups) > MIN_GROUP_CAP):
        members = np.flatnonzero(groups == group)
        name, size = items[int(members[0])].defect_class, len(members)
        if size <= MAX_GROUP_SHARE * counts[name]:
            continue
        groups[members] = np.arange(next_id, next_id + size)
        next_id += size
        warnings.append(
            f"{size} of the {counts[name]} {name!r} images chained into one near-duplicate group, too "
            f"large to be one part photographed again (a uniform product?): split as separate parts. "
            "If they are photos of the same few parts, the test figures are optimistic: add other parts"
        )
    return np.unique(groups, return_inverse=True)[1], warnings


def _count_warnings(counts: dict[str, int], min_good: int) -> list[str]:
    n_good = counts.get(GOOD, 0)
    if n_good < min_good:
        raise DataError(
            f"only {n_good} good parts: fit needs at least {min_good} (a fifth of them calibrates "
            f"the threshold, another fifth tests it); add {min_good - n_good} more"
        )
    warnings = [
        f"defect class {name!r} has only {n} images: its escape rate is not measurable; "
        f"add at least {MIN_DEFECTS_PER_CLASS - n} more (each part of the split should see it)"
        for name, n in counts.items()
        if name != GOOD and n < MIN_DEFECTS_PER_CLASS
    ]
    return warnings


def _group_warnings(items: list[LabeledImage], groups: np.ndarray) -> list[str]:
    sizes = np.bincount(groups)
    grouped = int(np.sum(sizes[sizes > 1]))
    if not grouped:
        return []
    return [
        f"{grouped} images are near-duplicates of another, in {int(np.sum(sizes > 1))} groups; "
        "each group stays in one part of the split"
    ]


def _unread_warnings(root: Path, items: list[LabeledImage]) -> list[str]:
    """What the scan passed over, said aloud: a class of .webp photos or an empty folder must not vanish silently."""
    read = {item.path for item in items}
    classes = {item.defect_class for item in items}
    empty = [
        p.name for p in sorted(root.iterdir()) if p.is_dir() and not is_hidden(Path(p.name)) and p.name not in classes
    ]
    # Notes beside the class folders (a README.md, a LICENSE) are the dataset's, not parts: only files
    # inside a class folder, or images beside them, are worth a word.
    unread = Counter(
        p.suffix.lower() or p.name
        for p in root.rglob("*")
        if p.is_file()
        and p not in read
        and not is_hidden(p.relative_to(root))
        and (p.parent != root or p.suffix.lower() in IMAGE_SUFFIXES | LOOKS_LIKE_IMAGES)
    )
    warnings = [f"class folder {root / name}/ holds no images: ignored" for name in empty]
    if unread:
        kinds = ", ".join(f"{kind} {n}" for kind, n in unread.most_common())
        warnings.append(
            f"{sum(unread.values())} file(s) under {root} not read ({kinds}): only "
            f"{' '.join(sorted(IMAGE_SUFFIXES))} images inside a class folder are; convert or move "
            "any that are parts"
        )
    return warnings


def _low_bits_warnings(seen: list[_Seen]) -> list[str]:
    """16-bit images filled only to 12 or 14 bits: the station keeps the top 8 of 16 (station.core.preprocess),
    so a 12-bit camera's parts reach grey level 15 of 255. On simulated parts stored as 12-bit the test
    AUROC fell from 1.000 to 0.948 and a quarter of the defects escaped, without a word."""
    dim = [one.brightest16 for one in seen if one.brightest16 is not None and one.brightest16 < LOW_BITS_LIMIT]
    if not dim:
        return []
    brightest = max(dim)
    return [
        f"{len(dim)} 16-bit image(s) use only the lowest {brightest.bit_length()} bits (brightest pixel {brightest} "
        f"of 65535): the station keeps the top 8 of 16 bits, so their parts reach grey level {brightest >> 8} "
        "of 255 and lose most contrast; scale them to the full 16-bit range (a 12-bit camera's values x 16) "
        "or save them as 8-bit, and the line's frames the same way"
    ]
