"""`roi:` and `rois:` in station.yaml: the region of the frame that is the part, or several named regions of
one part, each judged against a product's reference set.

    rois:
      - {name: left, x: 10, y: 12, width: 36, height: 26}              # the station's product
      - {name: right, x: 60, y: 12, width: 36, height: 26, product: B}  # products.B's reference set

`roi:` (one unnamed region) and `rois:` exclude each other. Every problem names
the line and key path of the region it is about (station/runtime/config/station.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from station.core.config_model import ConfigModel
from station.core.product import product_name_problem

MAX_REGIONS = 32
_PRODUCTS = "_station_products"  # validation context: the products: mapping, for each region's product check
_NAMES = "_region_names"  # validation context: the names seen so far, for the uniqueness check


class _Box:
    """x, y, width and height in frame pixels: `roi:` and each of `rois:`."""

    def to_roi(self):
        from station.core.preprocess import Roi

        return Roi(self.x, self.y, self.width, self.height)


class RoiConfig(_Box, ConfigModel):
    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(ge=1)
    height: int = Field(ge=1)


class RegionConfig(_Box, ConfigModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)
    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    product: str | None = None  # the reference set it is judged against; default: the station's product

    @field_validator("name")
    @classmethod
    def _unique(cls, name: str, info: ValidationInfo) -> str:
        if info.context is not None:
            seen = info.context.setdefault(_NAMES, set())
            if name in seen:
                raise ValueError(f"another region is already named {name!r}: region names must be unique")
            seen.add(name)
        return name

    @field_validator("product")
    @classmethod
    def _known_product(cls, product: str | None, info: ValidationInfo) -> str | None:
        if product is None:
            return None
        problem = product_name_problem(product)
        if problem:
            raise ValueError(problem)
        if info.context is not None and _PRODUCTS in info.context:
            products = info.context[_PRODUCTS]
            if products is None:
                raise ValueError("a region's product needs products: {NAME: PATH} (this station has one reference:)")
            if product not in products:
                raise ValueError(f"must be one of the products ({', '.join(sorted(products))}), got {product!r}")
        return product


def _before(value: Any, info: ValidationInfo) -> Any:
    """Hand the already validated products: to the regions' product checks (a fresh context per parse)."""
    if value is not None and info.data.get("roi") is not None:
        raise ValueError("give roi (one region) or rois (named regions), not both")
    if info.context is not None:
        info.context[_PRODUCTS] = info.data.get("products")
        info.context[_NAMES] = set()
    return value


def _after(regions: tuple[RegionConfig, ...] | None):
    if regions is None:
        return None
    if not regions:
        raise ValueError("name at least one region (or use roi:)")
    if len(regions) > MAX_REGIONS:
        raise ValueError(f"at most {MAX_REGIONS} regions, got {len(regions)}")
    return regions


# StationConfig's field: declared after roi and products, whose validated values it reads.
Regions = Annotated[tuple[RegionConfig, ...] | None, BeforeValidator(_before), AfterValidator(_after)]
