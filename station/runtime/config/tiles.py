"""`tiles:` in station.yaml: the roi cut into a grid of overlapping tiles (station/core/tiles.py).

    roi: {x: 0, y: 0, width: 500, height: 1240}
    tiles: {width: 96, height: 96, stride_x: 64, stride_y: 64}   # strides default to half a tile

Without an roi the whole frame is the part, as everywhere: the tiles then cover the region the
reference set was calibrated on (its reference.yaml records it: the box every calibration photo
held) from the frame's top-left corner, and every frame that holds it is judged, as photos of
several sizes are without an roi. The tiles become the part's regions (`tile-r0c0`, `tile-r0c1`, ...: station/runtime/regions.py),
all judged against the station's product and ONE reference set, calibrated on these tiles
(its reference.yaml records them; a set calibrated otherwise is refused at load). Every problem
names the line and key it is about, as every other configuration problem does.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from station.core.config_model import ConfigModel

_ROI = "_tiles_roi"  # validation context: the validated roi:, for the tile-size checks


class TilesConfig(ConfigModel):
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    # Half a tile by default: a defect up to half a tile across then lies whole inside some tile.
    stride_x: int | None = Field(None, ge=1)
    stride_y: int | None = Field(None, ge=1)

    @field_validator("width", "height")
    @classmethod
    def _inside_roi(cls, value: int, info: ValidationInfo) -> int:
        roi = (info.context or {}).get(_ROI)
        if roi is not None:
            side = getattr(roi, info.field_name)
            if value > side:
                raise ValueError(
                    f"a tile {value} pixels {'wide' if info.field_name == 'width' else 'high'} does "
                    f"not fit in the roi's {info.field_name} of {side}: tiles must be no larger than the roi"
                )
        return value

    @field_validator("stride_x", "stride_y")
    @classmethod
    def _no_gaps(cls, value: int | None, info: ValidationInfo) -> int | None:
        side = info.data.get("width" if info.field_name == "stride_x" else "height")
        if value is not None and side is not None and value > side:
            raise ValueError(
                f"{value} is larger than the tile's {'width' if info.field_name == 'stride_x' else 'height'} "
                f"({side}): the tiles would leave gaps, and a defect in a gap is never judged"
            )
        return value

    @property
    def strides(self) -> tuple[int, int]:
        return (self.stride_x or -(-self.width // 2), self.stride_y or -(-self.height // 2))

    def geometry(self, roi):
        """The TileGeometry over a region of roi.width x roi.height (a RoiConfig or Roi)."""
        from station.core.tiles import TileGeometry

        stride_x, stride_y = self.strides
        return TileGeometry(self.width, self.height, stride_x, stride_y, roi.width, roi.height)


def _before(value: Any, info: ValidationInfo) -> Any:
    """Tiles cut the one roi: refused with rois: or without an roi, before the tile's own keys are read."""
    if value is None:
        return None
    if info.data.get("rois") is not None:
        raise ValueError("tiles cut one roi: into tiles; with rois: (named regions) give no tiles")
    if info.data.get("roi") is None:
        return value  # no roi: the reference set's region at the frame's top-left (station/runtime/inspector.py)
    if info.context is not None:
        info.context[_ROI] = info.data.get("roi")
    return value


def _after(tiles: TilesConfig | None, info: ValidationInfo) -> TilesConfig | None:
    if tiles is None or info.data.get("roi") is None:
        return tiles
    from station.core.errors import DataError

    try:
        tiles.geometry(info.data["roi"])  # the count bound (station/core/tiles.py)
    except DataError as exc:
        raise ValueError(str(exc)) from None
    return tiles


# StationConfig's field: declared after roi and rois, whose validated values it reads.
Tiles = Annotated[TilesConfig | None, BeforeValidator(_before), AfterValidator(_after)]
