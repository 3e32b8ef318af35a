"""The per-position part of a format-3 reference set (station-reference-set/3; station/core/reference_set.py).

reference.yaml names the model's feature grid under `positions` (rows, cols, channels, stride,
offset: station/core/preprocess.py's FeatureGrid); arrays.npz holds, float32:

    position_mean       (P, C)     the good parts' mean at each position
    position_precision  (P, C, C)  the inverse of their OAS-shrunk covariance there
    position_typical    (P,)       their median out-of-fold distance there (locates a defect between cells)

P = rows x cols, C = channels. Loaded with allow_pickle=False; wrong dtypes, shapes or non-finite
values are refused naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from station.core.preprocess import FeatureGrid
from station.core.scoring import PositionReference

GRID_KEYS = ("rows", "cols", "channels", "stride", "offset")


def summary_grid(grid: FeatureGrid) -> dict:
    return {
        "rows": grid.rows,
        "cols": grid.cols,
        "channels": grid.channels,
        "stride": grid.stride,
        "offset": grid.offset,
    }


def summary_problem(summary: dict) -> tuple[str, str] | None:
    """(key, problem) when the summary's `positions` is unusable, else None."""
    grid = summary.get("positions")
    if not isinstance(grid, dict):
        return "positions", "missing (rows, cols, channels, stride, offset of the model's feature map)"
    for key in GRID_KEYS:
        value = grid.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and key != "offset"):
            return f"positions.{key}", f"must be an integer{'' if key == 'offset' else ' >= 1'}, is {value!r}"
    if grid["rows"] * grid["cols"] * grid["channels"] != summary["embedding_dim"]:
        return "positions", (
            f"{grid['rows']}x{grid['cols']} positions x {grid['channels']} channels is not "
            f"embedding_dim {summary['embedding_dim']}"
        )
    return None


def grid(summary: dict) -> FeatureGrid:
    values = summary["positions"]
    return FeatureGrid(*(values[key] for key in GRID_KEYS))


def arrays(model: PositionReference) -> dict[str, np.ndarray]:
    return {
        "position_mean": np.asarray(model.mean, dtype=np.float32),
        "position_precision": np.asarray(model.precision, dtype=np.float32),
        "position_typical": np.asarray(model.typical, dtype=np.float32),
    }


def model_from_npz(data: bytes, where: Path, grid: FeatureGrid, error: type[Exception]) -> PositionReference:
    expected = {
        "position_mean": (grid.positions, grid.channels),
        "position_precision": (grid.positions, grid.channels, grid.channels),
        "position_typical": (grid.positions,),
    }
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            fields = {name: np.array(stored[name]) for name in expected}
    except Exception as exc:  # numpy and zipfile raise many types for damaged bytes (BadZipFile, EOFError, ...)
        raise error(f"{where}: unusable arrays: {exc or type(exc).__name__}") from None
    for name, shape in expected.items():
        array = fields[name]
        if array.dtype != np.float32 or array.shape != shape or not np.all(np.isfinite(array)):
            raise error(f"{where}: {name} is {array.dtype} {array.shape}, expected finite float32 {shape}")
    return PositionReference(
        mean=fields["position_mean"],
        precision=fields["position_precision"],
        typical=fields["position_typical"],
        grid=grid,
    )
