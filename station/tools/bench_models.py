"""What `station bench -c station.yaml` times: the station's models (the form it would run here first) and
its model's cost per part, batch 1 or a tiled part's tiles in one batch."""

from __future__ import annotations

from pathlib import Path

from station.tools import bench_latency


def station_models(config) -> tuple[list[Path], Path, str, int]:
    """(models, reference, why, regions) of a station.yaml: the form the station would run here first (timed as
    at start, station/runtime/model_forms.py), then its other forms, timed raw; the active product's reference."""
    from station.runtime.model_forms import choose

    regions = len(config.rois or ()) if config.rois and len(config.rois) > 1 else bench_latency.REGIONS
    if not isinstance(config.model, dict):
        models, reference, why = [config.model], config.reference_for()[1], f"model {config.model}"
    else:
        choice = choose(config)
        others = [path for form, path in sorted(config.model_paths.items()) if form != choice.form]
        models, reference, why = (
            [config.model[choice.form], *others],
            config.for_form(choice.form).reference_for()[1],
            choice.line(),
        )
    if config.tiles:  # a part is its tiles, judged in one batch: raw onnxruntime times that part
        geometry = _tile_geometry(config, reference)
        # The daemon's stages run on bench's simulated parts, whole: a reference set for them is calibrated there.
        return models, None, f"{why}\n{TILES_MARK}{geometry.text()}", geometry.count
    return models, reference, why, regions


TILES_MARK = "tiles: "  # the line station_models adds for a tiled station.yaml


def _tile_geometry(config, reference: Path):
    from station.core import reference_set
    from station.runtime.inspector import tile_geometry

    return tile_geometry(config, reference_set.load(reference), reference)


def cost_per_part(raw: dict, tiled: str | None) -> dict:
    if tiled is None:
        return {"ms_per_part": round(raw["p50_us"] / 1000.0, 4), "tiles": None}
    return {
        "ms_per_part": round(raw["regions"]["per_part_us"] / 1000.0, 4),
        "tiles": raw["regions"]["n"],
        "ms_per_tile": round(raw["regions"]["per_region_us"] / 1000.0, 4),
        "geometry": tiled,
    }


def cost_line(figures: dict) -> str:
    """The station's model's cost per part (and per tile for a tiled part), one line."""
    cost, model = figures["cost_per_part"], next(iter(figures["raw_onnxruntime"].values()))
    named = f"{model['arch']} {model['quantization']}"
    if not cost["tiles"]:
        return f"cost per part: {cost['ms_per_part']:.3f} ms ({named}, batch 1, raw onnxruntime)"
    return (
        f"cost per part: {cost['ms_per_part']:.3f} ms = {cost['tiles']} tiles x {cost['ms_per_tile']:.4f} ms a tile "
        f"in one batch ({named}, raw onnxruntime; {cost['geometry']})"
    )
