"""Candidate trunks within a time budget, chosen on the calibration part.

A small ordered list (trunk x loss x input size x seed), the project's default
first, then the pretrained one (EfficientNet-Lite0's ImageNet features under a trained head, at an
input of about 96x96 with the photos' aspect ratio), the frozen per-position models (fit/positions.py),
the from-scratch ones at 36x26 and 72x52, the pretrained trunk at larger inputs up to the photos' own
size (fit/sizes.py), cheapest first, and last the other losses. The first candidate's wall time sets
the estimate of the others (per architecture once one of it has run, scaled by photos, epochs,
pixels and the loss's crops per image), corrected by how far the earlier estimates were off; a
candidate whose estimate, beside the final models it reserves (fit/budget.py: --budget bounds the whole
fit), would overrun the budget is skipped, a later cheaper one may still run. What the whole list and
the chosen recipe's final models leave goes to the final ensemble (fit/budget.py). The choice is made on the CALIBRATION part by fit/choice.py
(AUROC with a paired-resampling confidence; without defects, the false-reject rate).
Never the training loss, never the test part. Each candidate's cost per part is measured with
onnxruntime on its exported float graph (batch 1, one thread, times the final model's members)
BEFORE it trains (the untrained graph has the same operations): one over --max-ms-per-part is
never trained, nor is a larger input of the same trunk after it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration import thresholds as calibration_fit
from fit import tiles
from fit.cost import COST_RUNS, COST_TRIES, COST_WARMUP, onnx_ms  # noqa: F401 (tests, fit/positions.py)
from fit.choice import Choice, choose
from fit.sizes import PRETRAINED_AREA, larger_pretrained_sizes, pretrained_size  # noqa: F401 (PRETRAINED_AREA: tests)
from station.core.errors import DataError, StationError
from station.core.imagefolder import LabeledImage

DEFAULT_SIZE = (36, 26)  # export/trunk.py's input_spec_for default (width, height)
LARGE_SIZE = (72, 52)  # tried only when the images are at least this large
# Seconds per epoch and image relative to the mlp at 36x26, measured with
# export.train.train_split on 480 simulated parts (mlp 100 epochs 4.4 s, cnn 60 epochs 7.9 s).
# Crops embedded per training image and epoch, relative to the center loss (export/losses.py: contrastive
# draws two pairs per image, triplet a positive and a negative).
LOSS_COST = {"contrastive": 4.0, "triplet": 2.0}
# The pretrained trunk trains its head on the frozen backbone's maps, computed once (export/trunk.py), and a
# per-position model trains nothing (one pass of the backbone): per epoch and pixel both cost less than the
# cnn. Measured in the solar cells' search (docs/fit.md): cnn 36x26 60 epochs 32 s, lite0 96x96 10 epochs
# 13 s (0.25 of the cnn), positions 160x160 7 s (0.5); rounded up. 6.0 for both skipped every lite0 size.
# The fine-tuned trunk adds the backward pass through the backbone's last stage: priced at twice lite0's.
ARCH_COST = {"mlp": 1.0, "cnn": 3.0, "lite0": 1.0, "lite0ft": 2.0, "positions": 1.5}
# The whole `station fit`, final models included (fit/budget.py), held within 10 %: 13 minutes keep a fit
# of 2,500 photos within a quarter of an hour on 2 cores, overrun included.
DEFAULT_BUDGET_MINUTES = 13.0
# A 100 parts/s line on the line PC's 2 cores; measured on this machine, which the line PC is not:
# the limit leaves room for the rest of the per-part path (frame, outbox, MQTT).
DEFAULT_MAX_MS_PER_PART = 10.0


@dataclass(frozen=True)
class Candidate:
    arch: str
    loss: str
    seed: int = 0
    input_size: tuple[int, int] | None = None  # (width, height); None: DEFAULT_SIZE

    @property
    def size(self) -> tuple[int, int]:
        return self.input_size or DEFAULT_SIZE

    @property
    def name(self) -> str:
        return f"{self.arch}/{self.loss}/{self.size[0]}x{self.size[1]}/seed{self.seed}"


DEFAULT_CANDIDATE = Candidate("cnn", "center")  # station train's defaults


def candidate_list(native_size: tuple[int, int]) -> list[Candidate]:
    """The ordered list; larger inputs only when the images have the pixels."""
    from fit.positions import position_candidates

    # station train's default first; the pretrained trunk next, so that a short budget still measures it.
    first = [DEFAULT_CANDIDATE, Candidate("lite0", "center", 0, pretrained_size(native_size))]
    first += position_candidates(native_size) + [Candidate("mlp", "center")]
    large = [Candidate("cnn", "center", 0, LARGE_SIZE), Candidate("mlp", "center", 0, LARGE_SIZE)]
    # No second seeds: the final model is an ensemble of seeds (export/train.py: DEFAULT_MEMBERS), and a
    # seed chosen on ~150 calibration parts is chosen on noise.
    rest = [Candidate("cnn", "contrastive"), Candidate("mlp", "contrastive"), Candidate("cnn", "triplet")]
    fits = native_size[0] >= LARGE_SIZE[0] and native_size[1] >= LARGE_SIZE[1]
    # The pretrained trunk at larger inputs, cheapest first, before the other losses: a larger input
    # helped it (docs/fit.md), no other loss has yet been chosen on any measured dataset.
    larger = larger_pretrained_sizes(native_size)
    ladder = [Candidate("lite0", "center", 0, size) for size in larger]
    # Then the backbone's last stage fine-tuned on the parts (export/trunk.py: FineTunedTrunk), at the two
    # smallest pretrained sizes: frozen ImageNet features may miss what a material's defects look like.
    tuned = [Candidate("lite0ft", "center", 0, size) for size in [pretrained_size(native_size)] + larger[:1]]
    return first + (large if fits else []) + ladder + tuned + rest


@dataclass
class Outcome:
    candidate: Candidate
    seconds: float = 0.0
    checkpoint: Path | None = None
    metric: str | None = None
    threshold: float | None = None
    escape_rate: float | None = None
    auroc: float | None = None
    false_reject_rate: float | None = None
    expected_cost: float | None = None
    val_auroc: float | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    error: str | None = None
    n_good: int = 0  # calibration parts measured
    n_defect: int = 0
    good_scores: np.ndarray | None = None  # the calibration part's, out of fold, by the metric chosen
    defect_scores: np.ndarray | None = None
    ms_per_part: float | None = None  # the final model's: onnxruntime, fp32, batch 1, one thread, x members
    over_limit: bool = False  # ms_per_part is over --max-ms-per-part (then `error` says so)
    export_seconds: float = 0.0  # of `seconds`: one trunk's untrained export and its cost measurement
    embed_seconds: float = 0.0  # after `seconds`: the calibration part embedded and calibrated on

    @property
    def train_seconds(self) -> float:
        """The training alone (a frozen candidate: its whole measurement), what fit/budget.py scales."""
        return max(self.seconds - self.export_seconds, 0.0)

    def row(self) -> dict:
        return {
            "candidate": self.candidate.name,
            "arch": self.candidate.arch,
            "loss": self.candidate.loss,
            "input_size": list(self.candidate.size),
            "seed": self.candidate.seed,
            "seconds": round(self.seconds, 1),
            "metric": self.metric,
            "threshold": self.threshold,
            "calibration_escape_rate": self.escape_rate,
            "calibration_auroc": self.auroc,
            "calibration_false_reject_rate": self.false_reject_rate,
            "expected_cost": self.expected_cost,
            "val_auroc": self.val_auroc,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "ms_per_part": None if self.ms_per_part is None else round(self.ms_per_part, 3),
            "export_seconds": round(self.export_seconds, 1),
            "embed_seconds": round(self.embed_seconds, 1),
            "error": self.error,
        }


@dataclass
class SearchOptions:
    budget_minutes: float = DEFAULT_BUDGET_MINUTES
    epochs: int | None = None  # None: export.train's default per architecture
    max_candidates: int | None = None
    defect_rate: float = calibration_fit.DEFAULT_DEFECT_RATE
    escape_cost: float = calibration_fit.DEFAULT_ESCAPE_COST
    target_false_reject: float = calibration_fit.DEFAULT_TARGET_FALSE_REJECT
    max_ms_per_part: float = DEFAULT_MAX_MS_PER_PART
    members: int | None = None  # the final model's; None: export/train.py's default_members(arch)
    progress: bool = False
    data_root: Path | None = None
    say: object = print  # where a line for the person goes
    budget: object = None  # fit/budget.py: Budget (the whole fit's clock); None: one started here, nothing reserved


@dataclass
class Search:
    outcomes: list[Outcome]
    choice: Choice
    skipped: list[str] = field(default_factory=list)
    complete: bool = True  # every candidate of the list ran or was over --max-ms-per-part (none cut by budget or count)

    @property
    def chosen(self) -> Outcome:
        return self.choice.chosen


def run_candidates(
    candidates: list[Candidate],
    train: list[LabeledImage],
    val: list[LabeledImage],
    calibration: list[LabeledImage],
    workdir: Path,
    options: SearchOptions,
) -> Search:
    import torch

    from export.train import TORCH_THREADS

    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        return _search(candidates, train, val, calibration, workdir, options)
    finally:
        torch.set_num_threads(previous)


def _members(candidate, options) -> int:
    """The final models' trunks for `candidate` (a frozen one is one model)."""
    from export.train import default_members

    if candidate.arch == "positions" or tiles.is_tiled(candidate):
        return 1
    return options.members if options.members is not None else default_members(candidate.arch)


def _search(candidates, train, val, calibration, workdir, options) -> Search:
    from fit.budget import Budget

    budget = options.budget or Budget(options.budget_minutes * 60.0)
    outcomes, skipped, unit_costs = [], [], {}
    best = (None, 0.0)  # (the best candidate so far, its final models' estimate): what is reserved
    over, budget_reached = {}, False  # over: (arch, loss) -> the smallest input (pixels) over --max-ms-per-part
    ratios = []  # measured / estimated seconds of the candidates run so far
    limit = len(candidates) if options.max_candidates is None else max(1, options.max_candidates)
    for index, candidate in enumerate(candidates[:limit]):
        pixels = candidate.size[0] * candidate.size[1]
        if pixels >= over.get((candidate.arch, candidate.loss), np.inf):
            skipped.append(f"{candidate.name}: a smaller input of {candidate.arch} was already over --max-ms-per-part")
            continue
        raw = _estimate(candidate, unit_costs, len(train), options.epochs)
        # As far off as the list's earlier estimates were (a busy machine, a loss's own cost), never lower.
        estimate = raw if raw is None or not ratios else raw * max(1.0, float(np.median(ratios)))
        # The final models of the likely winner so far are kept aside (fit/budget.py); a candidate's own, before
        # it ran, come from priors that were 20-50 times off for the pretrained trunk and starved the search
        # of every pretrained size (solar cells: a cnn at AUROC 0.90 where lite0 reaches 0.94). One that wins
        # with final models over what is left is said (`over`), not skipped unseen.
        reserve = best[1]
        fits, left = budget.starts(estimate, reserve)
        if outcomes and not fits:  # a later, cheaper one may still fit
            kept = f", ~{reserve:.0f} s kept for the final models" if reserve else ""
            skipped.append(f"{candidate.name}: budget ({left:.0f} s left, ~{estimate:.0f} s estimated{kept})")
            budget_reached = True
            continue
        hint = f", ~{estimate:.0f} s estimated" if estimate is not None else ""
        options.say(f"candidate {index + 1}/{limit} {candidate.name}{hint}")
        if tiles.is_tiled(candidate):  # frozen, nothing to train: fit/tiles.py measures it per part
            outcome = tiles.measure(candidate, calibration, workdir, options, Outcome(candidate))
        else:
            outcome = _train_and_measure(candidate, train, val, calibration, workdir / f"c{index}.pt", options)
        outcomes.append(outcome)
        if outcome.over_limit:
            over[candidate.arch, candidate.loss] = min(pixels, over.get((candidate.arch, candidate.loss), pixels))
        if outcome.error is None and raw is not None:
            ratios.append(outcome.seconds / max(raw, 1e-9))
        if outcome.error is None and candidate.arch in ARCH_COST:
            unit_costs.setdefault(candidate.arch, _unit_cost(candidate, outcome.seconds, len(train), options.epochs))
        best = _likely_winners(outcomes, budget, options)
    skipped += [f"{c.name}: --max-candidates {limit}" for c in candidates[limit:]]
    usable = [o for o in outcomes if o.error is None]
    if not usable:
        raise DataError(
            "no candidate could be trained:\n  " + "\n  ".join(f"{o.candidate.name}: {o.error}" for o in outcomes)
        )
    choice = choose(usable, DEFAULT_CANDIDATE)
    options.say(choice.line())
    return Search(outcomes, choice, skipped, not budget_reached and limit == len(candidates))


def _likely_winners(outcomes, budget, options) -> tuple:
    """(the likelier winner so far, the larger final-model estimate of the two fit/choice.py may choose: the
    highest calibration AUROC, or the default candidate keeping its place), without its resampling."""
    usable = [o for o in outcomes if o.error is None]
    if not usable or budget.pools is None:
        return (usable[0] if usable else None), 0.0
    top = max(usable, key=lambda o: o.auroc if o.auroc is not None else -(o.false_reject_rate or 0.0))
    pair = [top] + [o for o in usable[:1] if o.candidate == DEFAULT_CANDIDATE]
    return top, max(budget.final(o, _members(o.candidate, options)) for o in pair)


def _epochs(candidate: Candidate, epochs: int | None) -> int:
    from export import train

    return epochs or train.DEFAULT_EPOCHS.get(candidate.arch, 1)


def _work(candidate: Candidate, n_train: int, epochs: int | None) -> float:
    width, height = candidate.size
    crops = LOSS_COST.get(candidate.loss, 1.0) * max(n_train, 1)
    return _epochs(candidate, epochs) * crops * width * height / (DEFAULT_SIZE[0] * DEFAULT_SIZE[1])


def _unit_cost(candidate: Candidate, seconds: float, n_train: int, epochs: int | None) -> float:
    return seconds / _work(candidate, n_train, epochs)


def _estimate(candidate: Candidate, unit_costs: dict, n_train: int, epochs: int | None) -> float | None:
    if not unit_costs or candidate.arch not in ARCH_COST:  # a tiled candidate trains nothing
        return None
    if candidate.arch in unit_costs:
        unit = unit_costs[candidate.arch]
    else:
        arch, measured = next(iter(unit_costs.items()))
        unit = measured * ARCH_COST[candidate.arch] / ARCH_COST[arch]
    return unit * _work(candidate, n_train, epochs)


def _train_and_measure(candidate, train_items, val_items, calibration_items, checkpoint, options) -> Outcome:
    from export import train

    if candidate.arch == "positions":  # nothing to train: fit/positions.py
        from fit.positions import measure_position_candidate

        return measure_position_candidate(candidate, calibration_items, Path(checkpoint).with_suffix(".onnx"), options)
    # One trunk each: candidates compare recipes; the final model is the chosen recipe's ensemble.
    config = train.TrainConfig(
        arch=candidate.arch,
        loss=candidate.loss,
        seed=candidate.seed,
        epochs=options.epochs,
        input_size=candidate.input_size,
        members=1,
    )
    outcome = Outcome(candidate)
    started = time.perf_counter()
    try:
        members = options.members if options.members is not None else train.default_members(candidate.arch)
        outcome.ms_per_part = members * cost_per_part(
            _untrained(config, Path(checkpoint)), options.max_ms_per_part / members
        )
        outcome.export_seconds = time.perf_counter() - started
        if outcome.ms_per_part > options.max_ms_per_part:
            outcome.error = (
                f"{outcome.ms_per_part:.2f} ms a part ({members} x one trunk's, measured here before "
                f"training) is over --max-ms-per-part {options.max_ms_per_part:g}: not trained"
            )
            outcome.over_limit = True
            outcome.seconds = time.perf_counter() - started
            return outcome
        result = train.train_split(
            train_items, val_items, checkpoint, config, progress=options.progress, data_root=options.data_root
        )
        outcome.checkpoint, outcome.val_auroc = Path(checkpoint), result.val_auroc
        outcome.best_epoch, outcome.epochs_run = result.best_epoch, result.epochs_run
        outcome.seconds = time.perf_counter() - started
        _measure_on_calibration(outcome, calibration_items, options)
        outcome.embed_seconds = time.perf_counter() - started - outcome.seconds
    except StationError as exc:
        outcome.error = str(exc)
        outcome.seconds = time.perf_counter() - started
    return outcome


def _untrained(config, checkpoint: Path) -> Path:
    """The candidate's trunk as it starts (same operations as trained), saved beside its checkpoint."""
    from export.trunk import build_trunk, save_checkpoint

    spec = config.spec()
    path = checkpoint.with_name(checkpoint.stem + ".untrained.pt")
    save_checkpoint(
        path,
        build_trunk(config.arch, config.embedding_dim, spec, config.trunk_options),
        config.arch,
        config.embedding_dim,
        spec,
    )
    return path


def _measure_on_calibration(outcome: Outcome, items: list[LabeledImage], options: SearchOptions):
    """Embed the calibration part with the trained torch trunk and calibrate on it (held out)."""
    from export.dataset import load_crops
    from export.train import embed_crops
    from export.trunk import load_checkpoint
    from station.core.preprocess import InputSpec

    model, info = load_checkpoint(outcome.checkpoint)
    spec = InputSpec(**info["input_spec"])
    crops = load_crops(items, spec)
    embeddings = embed_crops(model, crops.crops, spec)
    defect = crops.is_defect
    calibration = calibration_fit.calibrate_held_out(
        embeddings[~defect],
        embeddings[defect] if defect.any() else None,
        target_false_reject=options.target_false_reject,
        defect_rate=options.defect_rate,
        escape_cost=options.escape_cost,
    )
    chosen = calibration.fits[calibration.metric]
    outcome.metric, outcome.threshold = calibration.metric, float(chosen.threshold)
    outcome.escape_rate, outcome.auroc = chosen.escape_rate, chosen.auroc
    outcome.false_reject_rate, outcome.expected_cost = float(chosen.false_reject_rate), chosen.expected_cost
    outcome.n_good, outcome.n_defect = int((~defect).sum()), int(defect.sum())
    outcome.good_scores, outcome.defect_scores = chosen.good_scores, chosen.defect_scores


def cost_per_part(checkpoint: Path, limit_ms: float | None = None) -> float:
    """Milliseconds one part costs the trunk: its exported float graph in onnxruntime, batch 1, one
    thread, as the station builds its session (fit/cost.py: onnx_ms, re-measured while over `limit_ms`)."""
    import tempfile

    from export.onnx_export import export_fp32
    from export.trunk import load_checkpoint
    from station.core.preprocess import InputSpec

    model, info = load_checkpoint(checkpoint)
    spec = InputSpec(**info["input_spec"])
    with tempfile.TemporaryDirectory(dir=Path(checkpoint).parent) as folder:
        path = Path(folder) / "cost.onnx"
        export_fp32(model, spec, path)
        return onnx_ms(path, spec.sample_shape, limit_ms)
