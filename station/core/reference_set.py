"""Reference sets on disk: load, verify, save atomically, roll back.

A reference set is a folder with one subfolder per version and a CURRENT file
naming the active one:

    refs/A/CURRENT              "v0003"
    refs/A/v0003/reference.yaml human-readable summary, thresholds, checksum
    refs/A/v0003/arrays.npz     reference vector, precision, SOART3 unit space
    refs/A/v0003/report/        pictures of the calibration, when made

A new version is written to a temporary folder, fsynced and renamed into
place; only then does CURRENT switch (itself by temp file + rename). A crash
at any point leaves the previous version active and intact. Arrays are loaded
with allow_pickle=False: nothing is unpickled.

Format 1 holds the three fixed scores; format 2 (written only when the set
carries a learned KISSME metric, arrays.npz then also holds "kissme") adds it.
Format 3 is a per-position model's (station/core/reference_positions.py). All three load, so a
station rolls back across them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from station.core.version import __version__
from station.core.errors import ConfigError, StationError
from station.core.product import product_name_problem
from station.core import reference_positions
from station.core.scoring import ALL_SCORES, POSITION_SCORES, SCORES, PositionReference, ReferenceModel
from station.core.state_dir import WriterLock, unwritable_folder
from station.core.user_files import parse_yaml, read_bytes, read_text

FORMAT = "station-reference-set/1"
FORMAT_KISSME = "station-reference-set/2"  # FORMAT plus the learned "kissme" array and metric
FORMAT_POSITIONS = "station-reference-set/3"  # a per-position model's: position_mean, position_precision
FORMATS = (FORMAT, FORMAT_KISSME, FORMAT_POSITIONS)
CURRENT = "CURRENT"
SUMMARY = "reference.yaml"
ARRAYS = "arrays.npz"
_VERSION_DIR = re.compile(r"^v(\d{4,})$")
MAX_POINTER_BYTES = 256  # CURRENT holds one version name
# Two d x d float64 matrices (precision, kissme) for d = 4096 take 256 MiB; real sets are far smaller.
MAX_ARRAYS_BYTES = 512 << 20


class ReferenceSetError(StationError):
    """A reference set is missing, corrupt, or does not belong to the model."""

    exit_code = 65


@dataclass(frozen=True)
class ReferenceSet:
    model: ReferenceModel | PositionReference
    metric: str
    thresholds: dict[str, float]
    product: str
    model_sha256: str
    n_good: int
    statistics: dict = field(default_factory=dict)
    created: str = ""
    version: int = 0  # assigned when saved
    path: Path | None = None

    @property
    def threshold(self) -> float:
        return self.thresholds[self.metric]

    @property
    def embedding_dim(self) -> int:
        return self.model.embedding_dim


def check_product_name(name: str) -> str:
    """Product names become folder names (station.core.product has the rule)."""
    problem = product_name_problem(name)
    if problem:
        raise ReferenceSetError(problem)
    return name


def verify_for_model(reference_set: ReferenceSet, model_sha256: str, embedding_dim: int):
    """Refuse a reference set calibrated with another model."""
    where = reference_set.path or reference_set.product
    if reference_set.embedding_dim != embedding_dim:
        raise ReferenceSetError(
            f"{where}: reference set has {reference_set.embedding_dim}-d embeddings, the model gives {embedding_dim}-d"
        )
    if reference_set.model_sha256 != model_sha256:
        raise ReferenceSetError(
            f"{where}: reference set was calibrated for model {reference_set.model_sha256[:12]}, "
            f"not for the loaded model {model_sha256[:12]}; recalibrate with `station calibrate`"
        )


# -- reading -----------------------------------------------------------------


def versions(root: Path) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _VERSION_DIR.match(p.name)))


def current_version(root: Path) -> int:
    root = Path(root)
    pointer = root / CURRENT
    try:
        pointer.lstat()
    except OSError as exc:  # missing, or the folder is a symlink loop
        raise ReferenceSetError(
            f"{root}: not a reference set (no readable {CURRENT}: {exc.strerror}){_where(root)}"
        ) from None
    text = read_text(pointer, ReferenceSetError, f"reference set's {CURRENT} file", max_bytes=MAX_POINTER_BYTES).strip()
    match = _VERSION_DIR.match(text)
    if not match:
        raise ReferenceSetError(f"{pointer}: names {text[:40]!r}, not a version folder (v0001, v0002, ...)")
    return int(match.group(1))


def _where(root: Path) -> str:
    """The reference set a near miss meant: a `station fit` bundle's, or the set a version folder belongs to."""
    if (root / "reference" / CURRENT).is_file():
        return f"; a station fit bundle? its reference set is {root / 'reference'}"
    if _VERSION_DIR.match(root.name) and (root.parent / CURRENT).is_file():
        return f"; {root.name} is one version of the reference set {root.parent}: give that"
    return ""


def load(root: Path, version: int | None = None, model=None) -> ReferenceSet:
    """The current (or a given) version of a reference set, verified by checksum; with `model` (an Embedder's
    info: sha256, embedding_dim) refused when calibrated with another model."""
    root = Path(root)
    named_by_current = version is None
    version = current_version(root) if named_by_current else version
    folder = root / _version_name(version)
    if not folder.is_dir():
        where = f"{root / CURRENT}: names {folder.name}" if named_by_current else f"{root}: {folder.name}"
        raise ReferenceSetError(
            f"{where}, which is not there (versions: "
            f"{', '.join(map(_version_name, versions(root))) or 'none'}); roll back or recalibrate"
        )
    summary_path = folder / SUMMARY
    summary = parse_yaml(
        read_text(summary_path, ReferenceSetError, "reference set summary"),
        summary_path,
        ReferenceSetError,
        "reference set summary",
    )
    if not isinstance(summary, dict) or summary.get("format") not in FORMATS:
        raise ReferenceSetError(f"{summary_path}: not a {' or '.join(FORMATS)} summary")
    if summary.get("checksum") != _summary_checksum(summary, summary_path):
        raise ReferenceSetError(f"{summary_path}: checksum mismatch (edited by hand or corrupted)")
    _check_summary(summary, summary_path)
    arrays_bytes = read_bytes(folder / ARRAYS, ReferenceSetError, MAX_ARRAYS_BYTES, "reference arrays")
    if hashlib.sha256(arrays_bytes).hexdigest() != summary["arrays_sha256"]:
        raise ReferenceSetError(f"{folder / ARRAYS}: checksum mismatch (corrupted)")
    if summary["format"] == FORMAT_POSITIONS:
        arrays = reference_positions.model_from_npz(
            arrays_bytes, folder / ARRAYS, reference_positions.grid(summary), ReferenceSetError
        )
    else:
        arrays = _model_from_npz(
            arrays_bytes, folder / ARRAYS, int(summary["embedding_dim"]), learned=summary["format"] == FORMAT_KISSME
        )
    loaded = ReferenceSet(
        model=arrays,
        metric=summary["metric"],
        thresholds={k: float(v) for k, v in summary["thresholds"].items()},
        product=summary["product"],
        model_sha256=summary["model_sha256"],
        n_good=int(summary["n_good"]),
        statistics=summary.get("statistics", {}),
        created=summary["created"],
        version=version,
        path=folder,
    )
    if model is not None:
        verify_for_model(loaded, model.sha256, model.embedding_dim)
    return loaded


def _check_summary(summary: dict, where: Path):
    """Content, not just checksum: a set written by another tool or version must not crash the station."""

    def refuse(key: str, problem: str):
        raise ReferenceSetError(f"{where}: {key}: {problem}; recalibrate (station calibrate) or roll back")

    for key, kind in (
        ("embedding_dim", int),
        ("metric", str),
        ("thresholds", dict),
        ("product", str),
        ("model_sha256", str),
        ("n_good", int),
        ("arrays_sha256", str),
        ("created", str),
    ):
        if key not in summary:
            refuse(key, "missing")
        if not isinstance(summary[key], kind) or isinstance(summary[key], bool):
            refuse(key, f"must be {kind.__name__}, is {type(summary[key]).__name__}")
    if summary["embedding_dim"] < 1 or summary["n_good"] < 1:
        refuse("embedding_dim" if summary["embedding_dim"] < 1 else "n_good", "must be at least 1")
    known = {FORMAT_KISSME: ALL_SCORES, FORMAT_POSITIONS: POSITION_SCORES}.get(summary["format"], SCORES)
    if summary["format"] == FORMAT_POSITIONS and (problem := reference_positions.summary_problem(summary)):
        refuse(*problem)
    if summary["metric"] not in known:
        refuse("metric", f"unknown metric {summary['metric']!r} (this format knows {', '.join(known)})")
    for name, value in summary["thresholds"].items():
        if name not in known:
            refuse(f"thresholds.{name}", "unknown metric")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            refuse(f"thresholds.{name}", f"must be a number >= 0, is {value!r}")
    chosen = summary["thresholds"].get(summary["metric"])
    if chosen is None:
        refuse("thresholds", f"no threshold for the chosen metric {summary['metric']}")
    if chosen == float("inf"):  # another metric's may be inf (unusable there); the verdict's never
        refuse(f"thresholds.{summary['metric']}", "the chosen metric's threshold is infinite: nothing would be NG")
    if product_name_problem(summary["product"]):
        refuse("product", product_name_problem(summary["product"]))


def _model_from_npz(data: bytes, where: Path, dim: int, learned: bool = False) -> ReferenceModel:
    shapes = {**_ARRAY_SHAPES, **(_LEARNED_SHAPES if learned else {})}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            fields = {name: np.array(arrays[name], dtype=np.float64) for name in shapes}
    except Exception as exc:  # numpy and zipfile raise many types for damaged bytes (BadZipFile, EOFError, ...)
        raise ReferenceSetError(f"{where}: unusable arrays: {exc or type(exc).__name__}") from None
    for name, shape in shapes.items():
        expected = tuple(dim if s == "d" else s for s in shape)
        if fields[name].shape != expected or not np.all(np.isfinite(fields[name])):
            raise ReferenceSetError(f"{where}: {name} has shape {fields[name].shape}, expected finite {expected}")
    return ReferenceModel(**fields)


_ARRAY_SHAPES = {"reference": ("d",), "precision": ("d", "d"), "soart3_mean": (3,), "soart3_precision": (3, 3)}
_LEARNED_SHAPES = {"kissme": ("d", "d")}


# -- writing -----------------------------------------------------------------


def save(root: Path, reference_set: ReferenceSet, report_files: dict[str, bytes] | None = None) -> ReferenceSet:
    """Write a new version atomically and make it current; returns it as saved."""
    root = Path(root)
    check_product_name(reference_set.product)
    if reference_set.metric not in reference_set.model.scores:
        raise ReferenceSetError(
            f"unknown metric {reference_set.metric!r}; this set has {', '.join(reference_set.model.scores)}"
        )
    with writing(root, f"saving product {reference_set.product}"):
        return _save(root, reference_set, report_files)


def writing(root: Path, what: str) -> WriterLock:
    """`with writing(root, what):` while this process writes the reference set at root (created if need be);
    a second writer gets AlreadyRunningError (exit 75) naming this process."""
    return WriterLock(Path(root), what, "a reference set")


def _save(root: Path, reference_set: ReferenceSet, report_files: dict[str, bytes] | None) -> ReferenceSet:
    try:
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    except OSError as exc:
        raise _unwritable(root, exc) from exc
    version = (versions(root) or [0])[-1] + 1
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        arrays_bytes = _npz_bytes(reference_set.model)
        _write_synced(staging / ARRAYS, arrays_bytes)
        summary = _summary(reference_set, version, created, hashlib.sha256(arrays_bytes).hexdigest())
        _write_synced(staging / SUMMARY, yaml.safe_dump(summary, sort_keys=False).encode())
        for name, content in (report_files or {}).items():
            (staging / "report").mkdir(exist_ok=True)
            _write_synced(staging / "report" / name, content)
        # mkdtemp makes 0700 folders; a version gets the mode any folder gets here
        # (the service's UMask=0077 still keeps it private there).
        os.chmod(staging, 0o777 & ~_umask())
        _fsync_dir(staging)
        os.rename(staging, root / _version_name(version))
        _fsync_dir(root)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk: nothing changed, and the message says where
            raise _unwritable(root, exc) from exc
        raise
    _point_current(root, version)
    return load(root, version)


def _unwritable(root: Path, exc: OSError) -> ConfigError:
    return ConfigError(unwritable_folder(root, "a reference set", exc))


def rollback(root: Path, version: int | None = None) -> int:
    """Make an earlier version current: the given one, or the one before current."""
    root = Path(root)
    current_version(root)  # a folder that is not a reference set is said so, not created
    with writing(root, "rolling back"):
        return _rollback(root, version)


def _rollback(root: Path, version: int | None) -> int:
    available = versions(root)
    if version is None:
        earlier = [v for v in available if v < current_version(root)]
        if not earlier:
            raise ReferenceSetError(f"{root}: no version before v{current_version(root):04d} to roll back to")
        version = earlier[-1]
    if version not in available:
        raise ReferenceSetError(f"{root}: no version {version}; available: {', '.join(map(str, available))}")
    load(root, version)  # refuse to switch to a corrupt version
    _point_current(root, version)
    return version


def _format(model) -> str:
    return (
        FORMAT_POSITIONS if isinstance(model, PositionReference) else FORMAT if model.kissme is None else FORMAT_KISSME
    )


def _summary(reference_set: ReferenceSet, version: int, created: str, arrays_sha256: str) -> dict:
    summary = {
        "format": _format(reference_set.model),
        "product": reference_set.product,
        "version": version,
        "created": created,
        "station_version": __version__,
        "model_sha256": reference_set.model_sha256,
        "embedding_dim": reference_set.embedding_dim,
        "n_good": reference_set.n_good,
        "metric": reference_set.metric,
        "threshold": float(reference_set.threshold),
        "thresholds": {k: float(v) for k, v in reference_set.thresholds.items()},
        "statistics": _plain(reference_set.statistics),
        "arrays": ARRAYS,
        "arrays_sha256": arrays_sha256,
    }
    if isinstance(reference_set.model, PositionReference):
        summary["positions"] = reference_positions.summary_grid(reference_set.model.grid)
    summary["checksum"] = _summary_checksum(summary)
    _check_summary(summary, Path(reference_set.product))  # never write what load would refuse
    return summary


def _summary_checksum(summary: dict, where: Path | None = None) -> str:
    body = {k: v for k, v in summary.items() if k != "checksum"}
    try:
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    except (TypeError, ValueError) as exc:  # keys of mixed types (1: and a:) cannot be sorted
        raise ReferenceSetError(f"{where}: not a reference set summary ({exc})") from None


def _plain(value):
    """numpy scalars and tuples -> plain YAML-safe Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _npz_bytes(model: ReferenceModel | PositionReference) -> bytes:
    buffer = io.BytesIO()
    if isinstance(model, PositionReference):
        np.savez(buffer, **reference_positions.arrays(model))
        return buffer.getvalue()
    names = list(_ARRAY_SHAPES) + (list(_LEARNED_SHAPES) if model.kissme is not None else [])
    np.savez(buffer, **{name: np.asarray(getattr(model, name), dtype=np.float64) for name in names})
    return buffer.getvalue()


def _umask() -> int:
    """The process umask, read without changing it (Linux); 022 if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _version_name(version: int) -> str:
    return f"v{version:04d}"


def _write_synced(path: Path, content: bytes):
    with open(path, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _point_current(root: Path, version: int):
    temporary = root / f".{CURRENT}.tmp"
    _write_synced(temporary, f"{_version_name(version)}\n".encode())
    os.replace(temporary, root / CURRENT)
    _fsync_dir(root)
