"""Which form of the model this station runs: the faster on its own CPU, or the one station.yaml pins.

A bundle may carry its model as fp32 and as int8 (`model: {fp32: PATH, int8: PATH}`, each form with its
own reference sets: config/forms.py). Which is faster depends on the CPU, not on the model: the default
cnn ran 139 us int8 against 116 us fp32 on a 2-core AMD EPYC (AVX-512 VNNI) and 142 against 147 us on
a 2-core Intel Xeon, so `station fit`'s PC cannot decide for the line PC. At start, on every reload and
changeover, each form is loaded as the station runs it (build_session, the configured threads) and timed
on the configured input (one crop per region, in one call, as judge_crops does), the forms taking turns
run by run so a busy machine slows both alike; the faster runs. With a pin only the pinned form is
loaded and timed: a station told to run int8 does not depend on the fp32 file.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import numpy as np

from station.core.embedder import Embedder, same_input
from station.core.errors import ModelError

log = logging.getLogger(__name__)

WARM_RUNS = 3  # the first runs allocate
TIMED_RUNS = 15  # per form, at most
MIN_TIMED_RUNS = 3  # per form, even for a slow model
TIMING_BUDGET_S = 0.3  # of timed runs for all forms together: start stays well under a second


@dataclass(frozen=True)
class FormChoice:
    form: str  # fp32 or int8: the form judging
    embedder: Embedder  # the chosen form's, loaded
    per_part_us: dict[str, float]  # median cost of one part (every region) per timed form, this machine
    regions: int  # crops in one part's call (1 without rois:)
    pinned: bool  # model_form: pinned it, rather than auto

    @property
    def why(self) -> str:
        if self.pinned:
            return "pinned by model_form"
        if len(self.per_part_us) == 1:
            return "the only form"
        return "auto: the faster on this CPU"

    def describe(self) -> dict:
        """For the state payload: the form judging and what each form cost here (us a part)."""
        return {"model_form": self.form, "model_forms_us": dict(self.per_part_us)}

    def line(self) -> str:
        """One line for the log and `station check`."""
        timings = ", ".join(
            f"{form} {us:,.0f} us" for form, us in sorted(self.per_part_us.items(), key=lambda item: item[1])
        )
        per = f" a part of {self.regions} regions" if self.regions > 1 else " a part"
        return f"model form {self.form} ({self.why}): {timings}{per} (onnxruntime, timed at start)"


def form_of(quantization: str) -> str:
    """A model file's form from its own metadata (int8-dynamic and int8-static are both int8)."""
    return "int8" if quantization.startswith("int8") else "fp32"


def choose(config) -> FormChoice:
    """Load the configured forms, time them, keep the chosen one's embedder; ModelError names the file."""
    paths = config.model_paths
    forms = [config.model_form] if config.model_form != "auto" else sorted(paths)
    embedders = {form: _load(form, paths[form], config.runtime.threads) for form in forms}
    same_input(embedders, paths)
    regions = max(len(config.rois or ()), 1)
    if config.tiles is not None and config.roi is not None:  # every tile is a crop of the part's one call
        regions = config.tiles.geometry(config.roi).count  # (without an roi the count is the reference set's)
    per_part_us = time_forms(embedders, regions)
    chosen = min(per_part_us, key=per_part_us.get)
    choice = FormChoice(chosen, embedders[chosen], per_part_us, regions, pinned=config.model_form != "auto")
    log.info("%s", choice.line())
    return choice


def _load(form: str, path, threads: int) -> Embedder:
    embedder = Embedder(path, threads=threads)
    found = form_of(embedder.info.quantization)
    if found != form:  # a swapped pair would judge with another form's thresholds
        raise ModelError(
            f"{path} (model.{form}) is a {embedder.info.quantization} model, not the {form} form: "
            f"give it as model.{found}"
        )
    return embedder


def time_forms(embedders: dict[str, Embedder], regions: int = 1) -> dict[str, float]:
    """Median microseconds of one part (`regions` crops in one embed call) per form, taking turns."""
    spec = next(iter(embedders.values())).input_spec
    part = np.zeros((regions,) + spec.sample_shape, np.float32)
    for embedder in embedders.values():
        for _ in range(WARM_RUNS):
            embedder.embed(part)
    samples: dict[str, list[float]] = {form: [] for form in embedders}
    deadline = time.perf_counter() + TIMING_BUDGET_S
    for run in range(TIMED_RUNS):
        if run >= MIN_TIMED_RUNS and time.perf_counter() > deadline:
            break
        for form, embedder in embedders.items():
            start = time.perf_counter()
            embedder.embed(part)
            samples[form].append(time.perf_counter() - start)
    return {form: round(statistics.median(runs) * 1e6, 1) for form, runs in samples.items()}
