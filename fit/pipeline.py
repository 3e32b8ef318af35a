"""`station fit`: data check -> honest split -> candidates -> export -> calibrate -> test -> bundle."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from calibration import thresholds as calibration_fit
from fit import bundle, forms as model_forms, figures, report, tiles
from fit.budget import Budget, Pools, after_audit, plan_members
from fit.candidates import (
    DEFAULT_BUDGET_MINUTES,
    DEFAULT_MAX_MS_PER_PART,
    SearchOptions,
    candidate_list,
    run_candidates,
)
from fit.data_check import DataCheck, check_data
from fit.split import DEFAULT_FRACTIONS, select, split_parts, split_table, require_goods
from station.core.errors import ConfigError, DataError
from station.core.imagefolder import GOOD
from station.core.product import product_name_problem
from station.core.version import __version__

VAL_FRACTIONS = {"train": 0.85, "calibration": 0.15, "test": 0.0}  # early stopping, inside the train part
# A model's threshold slice: 15 % of its photos, but at least THRESHOLD_GOODS good parts where the photos allow
# (up to MAX_THRESHOLD_SHARE of them). A threshold set on n good parts places the false-reject rate only to
# about 1/n: on the commutators a slice of 31 good parts gave 14.7 % false rejects on new parts (docs/fit.md).
THRESHOLD_GOODS = 100
MAX_THRESHOLD_SHARE = 0.4


@dataclass
class FitOptions:
    data: Path
    out: Path
    seed: int = 0
    budget_minutes: float = DEFAULT_BUDGET_MINUTES
    epochs: int | None = None
    max_candidates: int | None = None
    defect_rate: float = calibration_fit.DEFAULT_DEFECT_RATE
    escape_cost: float = calibration_fit.DEFAULT_ESCAPE_COST
    target_false_reject: float = calibration_fit.DEFAULT_TARGET_FALSE_REJECT
    product: str | None = None
    members: int | None = None  # trunks of the final model; None: export/train.py's default_members(arch)
    max_ms_per_part: float = DEFAULT_MAX_MS_PER_PART
    progress: bool = False
    say: object = print

    def check(self):
        if self.budget_minutes <= 0:
            raise ConfigError(f"--budget {self.budget_minutes} must be a positive number of minutes")
        if not 0 < self.defect_rate < 1:
            raise ConfigError(f"--defect-rate {self.defect_rate} must lie between 0 and 1")
        if self.escape_cost <= 0:
            raise ConfigError(f"--escape-cost {self.escape_cost} must be positive (false rejects per escape)")
        if not 0 < self.target_false_reject < 0.5:
            raise ConfigError(f"--target-false-reject {self.target_false_reject} must lie between 0 and 0.5")
        if self.members is not None and self.members < 1:
            raise ConfigError(f"--members {self.members} must be at least 1")
        if not self.max_ms_per_part > 0:
            raise ConfigError(f"--max-ms-per-part {self.max_ms_per_part} must be a positive number of milliseconds")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs} must be at least 1")
        problem = _out_problem(Path(self.out), Path(self.data))
        if problem:
            raise ConfigError(problem)
        problem = product_name_problem(self.product_name)
        if problem:
            raise ConfigError(f"--product: {problem}")

    @property
    def product_name(self) -> str:
        return self.product or bundle.station_id(Path(self.out).resolve().name)


def _out_problem(out: Path, data: Path) -> str | None:
    """Why the bundle cannot go to --out; checked before anything is read or trained."""
    if (out / bundle.FIT_JSON).exists():
        return f"{out} already holds a fitted bundle; give a new --out folder"
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; give the name of a new folder for the bundle"
    resolved, data = out.resolve(), data.resolve()
    if resolved == data or data in resolved.parents:
        return (
            f"--out {out} lies inside --data {data}: the bundle's images would become a class of the next "
            "fit; give a folder outside the data"
        )
    if out.is_dir() and any(out.iterdir()):
        return (
            f"--out {out} already exists and is not empty; give a new (or empty) folder: the bundle's "
            f"{bundle.MODEL}, {bundle.STATION_YAML} and {bundle.REFERENCE}/ would mix with what is there"
        )
    return None


def run_fit(options: FitOptions) -> dict:
    """Everything `station fit` does; returns fit.json's content (also written)."""
    options.check()
    started = time.perf_counter()
    data = check_data(options.data)
    parts = split_parts(data.items, data.groups, options.seed)
    require_goods(data.items, parts)
    require_threshold_goods(data, parts, options.seed)
    out = Path(options.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=".fit-", dir=out))
    except OSError as exc:
        raise ConfigError(
            f"--out {out}: cannot write there ({exc.strerror or exc}); give a folder you can write"
        ) from exc
    try:
        result = _fit_in(data, parts, out, workdir, options, Budget(options.budget_minutes * 60.0, started=started))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["budget"].update(_budget_total(result["budget"], result["seconds"]))
    bundle.write_json(out / bundle.FIT_JSON, result)
    for line in report.summary_lines(result):
        options.say(line)
    return result


def _fit_in(
    data: DataCheck, parts: list[str], out: Path, workdir: Path, options: FitOptions, budget: Budget | None = None
) -> dict:
    train_items, train_groups = (
        select(data.items, parts, "train"),
        np.asarray(select(list(data.groups), parts, "train")),
    )
    inner = split_parts(train_items, train_groups, options.seed, VAL_FRACTIONS)
    calibration_items, test_items = select(data.items, parts, "calibration"), select(data.items, parts, "test")
    budget = budget or Budget(options.budget_minutes * 60.0)
    budget.pools = _pools(
        data, parts, len(select(train_items, inner, "train")), len(calibration_items), len(test_items)
    )
    options.say(report.data_line(data, parts, sum(p == "calibration" for p in inner)))
    candidates = candidate_list(data.native_size)
    tiled, tile_notes = tiles.tiled_candidates(data.items, workdir, options.max_ms_per_part, options.say)
    candidates[1:1] = tiled  # after the default: cheap (nothing trained), so a short budget still measures them
    search = run_candidates(
        candidates,
        select(train_items, inner, "train"),
        select(train_items, inner, "calibration"),
        calibration_items,
        workdir,
        SearchOptions(
            budget_minutes=options.budget_minutes,
            epochs=options.epochs,
            max_candidates=options.max_candidates,
            defect_rate=options.defect_rate,
            escape_cost=options.escape_cost,
            target_false_reject=options.target_false_reject,
            max_ms_per_part=options.max_ms_per_part,
            members=options.members,
            progress=options.progress,
            data_root=data.root,
            say=options.say,
            budget=budget,
        ),
    )
    search.skipped += tile_notes
    # Cross-fitting. The audit model is the chosen recipe trained without the test part (train and
    # calibration parts, less its own threshold slice), thresholded on that slice, judged on the test
    # part: fit.json's figures. The bundle's model is then the same recipe and threshold rule on every
    # photo but its own threshold slice: the tiles gained 0.994 vs 0.982 AUROC from training on 85 %
    # of the photos instead of 68 % (docs/fit.md).
    candidate = search.chosen.candidate
    plan = _member_plan(search, options, budget)
    if plan.added:
        options.say(f"budget: {plan.why}: the final models get {plan.members} trunks")
        options = replace(options, members=plan.members)
    if plan.over:
        options.say(f"budget: {plan.over}")
    finals = time.perf_counter()
    build = build_model
    if candidate.arch == "positions":  # frozen: nothing to train (fit/positions.py)
        from fit.positions import build_position_model as build
    audit_items, audit_groups = _audit_pool(data, parts)
    audit = build(candidate, audit_items, audit_groups, workdir / "audit", options, data, "audit model")
    if tiles.is_tiled(candidate):  # each test photo judged by its worst tile, as the station will
        per_form = {"fp32": tiles.evaluate(audit.embedder, audit.reference_set, test_items, candidate.geometry)}
    else:
        per_form = model_forms.test_figures(audit.forms, test_items)
    evaluation, tested = per_form[model_forms.headline(audit.forms)]
    audit_share = len(audit_items) / (len(audit_items) + len(data.items))  # of both models' photos
    late = after_audit(budget, time.perf_counter() - finals, plan.final_estimated * audit_share, 1 - audit_share)
    if late:
        options.say(f"budget: {late}")
    final = build(candidate, data.items, list(data.groups), out, options, data, "bundle model")
    (out / bundle.REPORT).mkdir(exist_ok=True)
    for name, content in figures.test_report(evaluation, tested.paths).items():
        (out / bundle.REPORT / name).write_bytes(content)
    (out / bundle.STATION_YAML).write_text(
        bundle.station_yaml(options.product_name, data.native_size, data.fingerprint, list(final.forms))
        + (tiles.station_yaml_section(candidate) if tiles.is_tiled(candidate) else "")
    )
    warnings = (
        data.warnings
        + final.calibration.warnings
        + _test_warnings(evaluation.figures(), options)
        + [f"budget: {text}" for text in (plan.over, late) if text]
    )
    result = {
        **_fit_json(data, parts, options, search, audit, final, evaluation.figures(), warnings),
        "forms": model_forms.fit_json(final.forms, per_form),
    }
    added = (audit.train_seconds + final.train_seconds) * plan.added / plan.members if plan.added else None
    result["budget"] = plan.summary(time.perf_counter() - finals, budget.elapsed(), added)
    return result


def _budget_total(summary: dict, total_seconds: float) -> dict:
    """fit.json's budget with the whole run's measured seconds (fit.json written included, nearly)."""
    from fit.budget import TOLERANCE

    return {
        "total_seconds": total_seconds,
        "spent_seconds": total_seconds,
        "spent_share": round(total_seconds / summary["budget_seconds"], 3),
        "within": total_seconds <= summary["budget_seconds"] * (1 + TOLERANCE),
    }


def _pools(data: DataCheck, parts: list[str], n_search_train: int, n_calibration: int, n_test: int) -> Pools:
    """fit/budget.py's photo counts, each final model's threshold slice by threshold_fractions (its owner)."""
    pools = (_audit_pool(data, parts)[0], data.items)
    trained = [len(items) * threshold_fractions(items)["train"] for items in pools]
    from export.onnx_export import MAX_GATE_IMAGES

    return Pools(
        n_search_train=n_search_train,
        n_calibration=n_calibration,
        n_final_train=round(sum(trained)),
        n_final_held=round(sum(len(items) for items in pools) - sum(trained)),
        n_final_all=sum(len(items) for items in pools),
        n_test=n_test,
        n_final_gate=round(sum(min(n, MAX_GATE_IMAGES) for n in trained)),
    )


def _member_plan(search, options: FitOptions, budget: Budget):
    """fit/budget.py's rule: what the list and the chosen recipe's final models leave of --budget adds trunks."""
    from export.train import default_members

    chosen = search.chosen
    default = (
        1
        if chosen.candidate.arch == "positions" or tiles.is_tiled(chosen.candidate)
        else default_members(chosen.candidate.arch)
    )
    return plan_members(chosen, default, options.members, budget, options.max_ms_per_part, search.complete)


def _audit_pool(data: DataCheck, parts: list[str]) -> tuple[list, list]:
    """The audit model's photos: the train and calibration parts."""
    return (
        select(data.items, parts, "train") + select(data.items, parts, "calibration"),
        select(list(data.groups), parts, "train") + select(list(data.groups), parts, "calibration"),
    )


def threshold_fractions(items: list) -> dict[str, float]:
    """A model's train / threshold-slice split of `items` (THRESHOLD_GOODS above)."""
    n_good = sum(not item.is_defect for item in items)
    share = min(MAX_THRESHOLD_SHARE, max(VAL_FRACTIONS["calibration"], THRESHOLD_GOODS / max(n_good, 1)))
    return {"train": 1.0 - share, "calibration": share, "test": 0.0}


def require_threshold_goods(data: DataCheck, parts: list[str], seed: int):
    """Every slice that sets a threshold must hold calibration's minimum of good parts. Found before anything
    trains: 60 good parts passed the data check, trained for minutes, then the audit model's slice held 8."""
    audit_items, audit_groups = _audit_pool(data, parts)
    slices = {"the calibration part": [i for i, p in zip(data.items, parts) if p == "calibration"]}
    for what, items, groups in (
        ("the audit model's threshold slice", audit_items, audit_groups),
        ("the bundle model's threshold slice", data.items, list(data.groups)),
    ):
        held = split_parts(items, np.asarray(groups), seed, threshold_fractions(items))
        slices[what] = [item for item, part in zip(items, held) if part == "calibration"]
    minimum = calibration_fit.MIN_GOOD_PARTS
    short = {what: sum(not item.is_defect for item in items) for what, items in slices.items()}
    short = {what: n for what, n in short.items() if n < minimum}
    if not short:
        return
    n_good = sum(not item.is_defect for item in data.items)
    share = (1 - DEFAULT_FRACTIONS["test"]) * VAL_FRACTIONS["calibration"]  # the smallest slice's share
    needed = max(int(np.ceil(minimum / share)), n_good + 1)
    said = ", ".join(f"{what} would hold {n}" for what, n in short.items())
    raise DataError(
        f"only {n_good} good parts in {data.root}/{GOOD}/: {said}, and a threshold needs at least "
        f"{minimum} good parts; add about {needed - n_good} more (about {needed} in all)"
    )


@dataclass(frozen=True)
class BuiltModel:
    """A trained, exported and calibrated model with its reference set (in `folder`)."""

    export: bundle.ExportChoice
    calibration: calibration_fit.Calibration
    reference_set: object
    embedder: object
    n_trained: int
    rule: str
    held: list  # the threshold slice: parts this model never trained on
    forms: dict = None  # {form: fit/forms.py BuiltForm}, every form in the bundle; the fields above: the headline's
    train_seconds: float = 0.0

    def summary(self) -> dict:
        return {
            "metric": self.reference_set.metric,
            "threshold": self.reference_set.threshold,
            "threshold_rule": self.rule,
            "export_mode": self.export.mode,
            "n_trained": self.n_trained,
            "n_threshold_good": self.reference_set.n_good,
        }


def build_model(
    candidate, items: list, groups: list, folder: Path, options: FitOptions, data: DataCheck, what: str
) -> BuiltModel:
    """Train `candidate` on `items` less a 15 % threshold slice (near-duplicates kept whole), export it
    (never dead-ending) and calibrate it on the slice: parts this model never trained on."""
    parts = split_parts(items, np.asarray(groups), options.seed, threshold_fractions(items))
    trained, held = select(items, parts, "train"), select(items, parts, "calibration")
    if tiles.is_tiled(candidate):
        return tiles.build(candidate, items, folder, options, data, 0, what)  # frozen: every photo is unseen
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / bundle.CHECKPOINT
    trained_in = train_final(candidate, trained, held, checkpoint, options, data.root, what).train_seconds
    # The gates' sample and static int8's calibration: the train part, never the threshold slice.
    sample = bundle.link_folder(trained, Path(tempfile.mkdtemp(prefix=".fit-sample-", dir=folder)))
    try:
        exports = bundle.export_forms(checkpoint, folder, sample, candidate.arch, options.say)
    finally:
        shutil.rmtree(sample, ignore_errors=True)
    built = model_forms.calibrate_forms(exports, folder, held, options, data, _threshold_rule)
    first = built[model_forms.headline(built)]
    return BuiltModel(
        first.export,
        first.calibration,
        first.reference_set,
        first.embedder,
        len(trained),
        first.rule,
        held,
        built,
        trained_in,
    )


def train_final(
    candidate, trained: list, held: list, checkpoint: Path, options: FitOptions, data_root: Path, what: str
):
    """The chosen recipe as an ensemble, its epochs chosen on `held`."""
    from export import train
    from export.train import TORCH_THREADS
    import torch

    config = train.TrainConfig(
        arch=candidate.arch,
        loss=candidate.loss,
        seed=candidate.seed,
        epochs=options.epochs,
        input_size=candidate.input_size,
        members=options.members if options.members is not None else train.default_members(candidate.arch),
    )
    options.say(
        f"{what}: {candidate.name}, {config.members} trunk{'s' if config.members > 1 else ''} from "
        f"consecutive seeds, on {len(trained)} photos ({len(held)} held out for its threshold)"
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        return train.train_split(trained, held, checkpoint, config, progress=options.progress, data_root=data_root)
    finally:
        torch.set_num_threads(previous)


def _threshold_rule(calibration, options: FitOptions) -> str:
    chosen = calibration.fits[calibration.metric]
    if chosen.expected_cost is not None:
        return (
            f"least expected cost on parts the final model never saw: (1-p) FRR + p c ER with defect rate p "
            f"{options.defect_rate:g} and escape cost c {options.escape_cost:g} false rejects, each class's scores "
            "smoothed in log space by Silverman's rule with its own count and the good parts' spread"
        )
    return f"false-reject target on good parts the final model never saw (out of fold); requested {options.target_false_reject:g}"


def _test_warnings(figures: dict, options: FitOptions) -> list[str]:
    needed = calibration_fit.goods_needed(options.target_false_reject)
    if figures["n_good"] >= needed:
        return []
    return [
        f"the test part has {figures['n_good']} good parts: its false-reject rate is measured to about "
        f"1/{figures['n_good']}; {needed} would measure a {options.target_false_reject:.2%} rate"
    ]


def _fit_json(data, parts, options, search, audit: BuiltModel, final: BuiltModel, figures, warnings) -> dict:
    chosen, saved, export, calibration = search.chosen, final.reference_set, final.export, final.calibration
    relative = {item.path: name for item, name in zip(data.items, data.relative_paths)}
    return {
        "auroc": figures["auroc"],
        "escape_rate": figures["escape_rate"],
        "escape_rate_ci": figures["escape_rate_ci"],
        "false_reject_rate": figures["false_reject_rate"],
        "false_reject_rate_ci": figures["false_reject_rate_ci"],
        "n_good": figures["n_good"],
        "n_defect": figures["n_defect"],
        "warnings": warnings,
        "figures_from": "the test part, judged by the audit model: the bundle's recipe and threshold rule, trained "
        "and thresholded without the test part (cross-fitting); the bundle's model is then trained "
        "on every photo but its own threshold slice",
        "audit_model": audit.summary(),
        "escapes_by_class": figures["escapes_by_class"],
        "confusion": figures["confusion"],
        "metric": saved.metric,
        "threshold": saved.threshold,
        "threshold_rule": final.rule,
        "n_trained": final.n_trained,
        "per_metric_auroc": figures["per_metric_auroc"],
        "chosen_candidate": chosen.candidate.name,
        "candidates": [o.row() for o in search.outcomes],
        "skipped_candidates": search.skipped,
        "choice_rule": search.choice.rule,
        "choice": search.choice.summary(),
        "export": {"mode": export.mode, "why": export.why, "attempts": export.attempts},
        "calibration": {
            "n_good": saved.n_good,
            "n_defect": saved.statistics["n_defect"],
            "defect_rate": options.defect_rate,
            "escape_cost": options.escape_cost,
            "target_false_reject": options.target_false_reject,
            "metrics": {n: f.summary() for n, f in calibration.fits.items()},
        },
        "split": {
            "seed": options.seed,
            "fractions": DEFAULT_FRACTIONS,
            "counts": split_table(data.items, parts),
            "files": dict(zip(data.relative_paths, parts)),
            "threshold_slices": {
                name: sorted(relative[item.path] for item in built.held)
                for name, built in (("audit_model", audit), ("bundle_model", final))
            },
        },
        "data": {
            "path": str(data.root.resolve()),
            "fingerprint": data.fingerprint,
            "images": len(data.items),
            "classes": data.class_counts,
            "native_size": list(data.native_size),
            "near_duplicate_groups": int(np.sum(np.bincount(data.groups) > 1)),
        },
        "bundle": {
            "model": bundle.MODEL,
            "reference": bundle.REFERENCE,
            "reference_version": saved.version,
            "report": bundle.REPORT,
            "station_yaml": bundle.STATION_YAML,
            "checkpoint": bundle.CHECKPOINT if (Path(options.out) / bundle.CHECKPOINT).is_file() else None,
        },
        "product": saved.product,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "station_version": __version__,
    }
