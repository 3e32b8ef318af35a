"""`station fit`'s budget: `--budget` bounds the whole run (docs/fit.md, "The budget").

The clock starts when `station fit` starts: the data check, the tiled candidates' measurements, the
search, both final models (audit and bundle: training, exports, calibration, test) and the report all
count. The rule, owned here and restated in fit.json's `budget`:

1. Before the search, and before each candidate, the final models are reserved: what the chosen
   recipe's two final models are estimated to cost (`final_seconds`: the candidate's own measured
   search training time scaled by the photos both final models train on, fit/pipeline.py's
   threshold_fractions owning their threshold slices, times their trunks; its measured calibration
   embedding scaled by the photos they embed, per form, and by their export gates' samples; its
   measured export times the final models' exports; a frozen candidate's measured seconds scaled by
   the photos both final models embed).
   A candidate starts only while its own estimate plus that reserve (for the likely winner so far:
   a candidate's own final models are known only once it ran) fits what is left; a skipped one leaves room for later
   cheaper ones (fit/candidates.py), and only after its cost per part was measured within
   --max-ms-per-part. After the from-scratch trunks the list climbs the pretrained trunk's inputs,
   cheapest first, up to the photos' own size (fit/sizes.py): a larger input helped it.
2. What is left after the list AND the chosen recipe's final models goes to more trunks in its
   ensemble, both final models, up to MAX_MEMBERS: an ensemble evens out its seeds' lottery (tiles, one
   trunk 0.958-0.993 by seed, three 0.983, four 0.988; docs/fit.md). Added only while their estimated
   training time fits what is left and their cost per part stays within --max-ms-per-part; not for a
   recipe of one member (the pretrained trunk's members would share one backbone; the per-position
   model trains nothing), nor when --members is given or the list did not finish.
3. When the chosen recipe's final models are estimated not to fit what is left (the first candidate
   always runs; an estimate can be off), fit says so on screen and in fit.json (`budget.over`, a
   warning) and goes on: never a silent overrun. So does the audit model, once measured, when the
   bundle model at its pace would end the fit over --budget (after_audit).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

MAX_MEMBERS = 6  # twice export/train.py's DEFAULT_MEMBERS
# Each final model of a trained recipe calibrates and is tested in each form (fp32, int8: fit/forms.py).
FORMS = 2
# Exports per final model, each priced at the candidate's measured fp32 export and timing: fp32, then
# int8 modes until one passes (fit/bundle.py), each gated against torch and timed.
EXPORTS = 3
# Each export's gate embeds its sample (the model's trained photos, up to export/onnx_export.py's
# MAX_GATE_IMAGES) in torch, fp32 and int8: priced at the candidate's calibration embedding per photo.
GATE_PASSES = 3
TOLERANCE = 0.10  # the bound: the whole fit within --budget plus 10 %
FROZEN = ("positions", "lite0-tiles")  # nothing trains: their cost is embedding photos
RULE = (
    "--budget bounds the whole station fit from its start: a candidate starts only while its estimate plus "
    "the estimated final models (audit + bundle) of the best so far, or of itself if it would win, fit what "
    "is left; the pretrained trunk at larger inputs after the from-scratch ones (cheapest first); what is left "
    f"after the list and the chosen recipe's final models adds trunks to its ensemble, up to {MAX_MEMBERS}, "
    "while their estimated training fits and the cost per part --max-ms-per-part; a chosen recipe whose final "
    "models are estimated not to fit is said, on screen and here"
)


@dataclass(frozen=True)
class Pools:
    """Photo counts the estimates scale by; fit/pipeline.py counts them (its threshold_fractions owns the
    threshold slices, so nothing here restates their share)."""

    n_search_train: int  # a candidate's training photos
    n_calibration: int  # the calibration part a candidate is embedded and measured on
    n_final_train: int  # photos the audit and bundle models train on, together
    n_final_held: int  # their threshold slices, together (each form embeds them)
    n_final_all: int  # both pools, together (a frozen model embeds every photo of its pool)
    n_test: int  # the test part, judged by the audit model in each form
    n_final_gate: int = 0  # photos the final models' export gates embed, together (each model's up to MAX_GATE_IMAGES)


def is_frozen(candidate) -> bool:
    return candidate.arch in FROZEN


def final_seconds(
    pools: Pools, candidate, members: int, train_seconds: float, embed_seconds: float = 0.0, export_seconds: float = 0.0
) -> float:
    """Estimated seconds of the two final models of `candidate` with `members` trunks: from ONE trunk's
    measured search training (`train_seconds`, on pools.n_search_train photos), its calibration part's
    embedding (`embed_seconds`) and its export and timing (`export_seconds`). A frozen candidate's
    `train_seconds` is its whole measurement (export, the calibration part embedded)."""
    per_calibration_photo = 1.0 / max(pools.n_calibration, 1)
    if is_frozen(candidate):
        return train_seconds * (pools.n_final_all + pools.n_test) * per_calibration_photo
    train = train_seconds * members * pools.n_final_train / max(pools.n_search_train, 1)
    embed = embed_seconds * FORMS * (pools.n_final_held + pools.n_test) * per_calibration_photo
    gates = embed_seconds * EXPORTS * GATE_PASSES * pools.n_final_gate * per_calibration_photo
    return train + embed + gates + 2 * EXPORTS * members * export_seconds


class Budget:
    """The one clock and the one rule: started at `station fit`'s start, `seconds` long."""

    def __init__(self, seconds: float, pools: Pools | None = None, started: float | None = None):
        self.seconds = float(seconds)
        self.pools = pools  # None: nothing reserved (the search alone, as in tests of the list)
        self.started = time.perf_counter() if started is None else started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def final(self, outcome, members: int) -> float:
        """The final models' estimate for a measured candidate (fit/candidates.py: Outcome)."""
        if self.pools is None:
            return 0.0
        return final_seconds(
            self.pools, outcome.candidate, members, outcome.train_seconds, outcome.embed_seconds, outcome.export_seconds
        )

    def starts(self, estimate: float | None, reserve: float) -> tuple[bool, float]:
        """(whether a candidate of `estimate` seconds starts with `reserve` kept for the final models, left)."""
        left = self.left()
        return estimate is None or estimate + reserve <= left, left


def after_audit(budget: Budget, audit_seconds: float, audit_estimate: float, bundle_share: float) -> str | None:
    """Said when the audit model, measured, shows the bundle model will end the fit over --budget (its
    estimate corrected by how far the audit model's was off; `bundle_share`: the bundle's share of both)."""
    ratio = audit_seconds / audit_estimate if audit_estimate > 0 else 1.0
    expected = audit_seconds * bundle_share / max(1.0 - bundle_share, 1e-9)
    left = budget.left()
    if expected <= left * (1 + TOLERANCE):
        return None
    return (
        f"the audit model took {audit_seconds:.0f} s (~{audit_estimate:.0f} s estimated, x{ratio:.2f}); the bundle "
        f"model, ~{expected:.0f} s at that pace, will end the fit ~{expected - left:.0f} s over --budget "
        f"{budget.seconds / 60:g} min"
    )


@dataclass(frozen=True)
class MemberPlan:
    budget_seconds: float
    search_seconds: float  # the clock at the end of the search (data check and tile measurements included)
    members: int | None  # the final models' trunks; None: the recipe's default (nothing added)
    added: int = 0
    seconds_per_member: float | None = None  # estimated, both final models together
    why: str = ""
    final_estimated: float | None = None  # the final models at `members` (or the default), both together
    over: str | None = None  # why the final models are estimated not to fit what is left, said on screen

    @property
    def left_seconds(self) -> float:
        return self.budget_seconds - self.search_seconds

    def summary(
        self,
        final_measured: float | None = None,
        total_seconds: float | None = None,
        measured_added_seconds: float | None = None,
    ) -> dict:
        estimated = None if self.seconds_per_member is None else self.added * self.seconds_per_member
        spent = total_seconds if total_seconds is not None else self.search_seconds + (final_measured or 0.0)
        return {
            "budget_seconds": round(self.budget_seconds, 1),
            "search_seconds": round(self.search_seconds, 1),
            "final_seconds_estimated": None if self.final_estimated is None else round(self.final_estimated, 1),
            "final_seconds_measured": None if final_measured is None else round(final_measured, 1),
            "added_members": self.added,
            "members": self.members,
            "added_seconds_estimated": None if estimated is None else round(estimated, 1),
            "added_seconds_measured": None if measured_added_seconds is None else round(measured_added_seconds, 1),
            "spent_seconds": round(spent, 1),
            "spent_share": round(spent / self.budget_seconds, 3),
            "total_seconds": None if total_seconds is None else round(total_seconds, 1),
            "within": None if total_seconds is None else total_seconds <= self.budget_seconds * (1 + TOLERANCE),
            "over": self.over,
            "why": self.why,
            "rule": RULE,
        }


def plan_members(
    chosen,
    default_members: int,
    fixed_members: int | None,
    budget: Budget,
    max_ms_per_part: float,
    complete: bool = True,
) -> MemberPlan:
    """How many trunks the final models get, from what is left of `budget` after the chosen candidate's
    (an Outcome: one trunk measured; `ms_per_part` for `default_members`) final models are reserved."""
    members = fixed_members if fixed_members is not None else default_members
    left, search_seconds = budget.left(), budget.elapsed()
    final = budget.final(chosen, members)
    over = None
    if final > left:
        over = (
            f"the chosen {chosen.candidate.name}'s final models (audit and bundle) are estimated at ~{final:.0f} s "
            f"and {max(left, 0):.0f} s of --budget {budget.seconds / 60:g} min are left: the fit will overrun it "
            f"by ~{final - left:.0f} s"
        )
    plan = dict(budget_seconds=budget.seconds, search_seconds=search_seconds, final_estimated=final, over=over)
    if fixed_members is not None:
        return MemberPlan(**plan, members=fixed_members, why="--members was given")
    if not complete:
        return MemberPlan(
            **plan, members=None, why="the budget or --max-candidates skipped some of the list: nothing left to add"
        )
    if default_members < 2 or is_frozen(chosen.candidate):
        return MemberPlan(**plan, members=None, why=f"{chosen.candidate.arch} is one member: nothing to add")
    per_member = (
        final_seconds(budget.pools, chosen.candidate, 1, chosen.train_seconds, 0.0, chosen.export_seconds)
        if budget.pools
        else 0.0
    )
    spare = left - final
    by_time = math.floor(spare / per_member) if per_member > 0 else MAX_MEMBERS
    trunk_ms = (chosen.ms_per_part or 0.0) / default_members
    by_cost = math.floor(max_ms_per_part / trunk_ms) if trunk_ms > 0 else MAX_MEMBERS
    members = max(default_members, min(MAX_MEMBERS, default_members + max(by_time, 0), by_cost))
    added = members - default_members
    if not added:
        why = (
            f"{max(spare, 0):.0f} s left after the final models (~{final:.0f} s), one more trunk ~{per_member:.0f} s"
            if by_time < 1
            else f"one more trunk would cost over --max-ms-per-part ({trunk_ms:.2f} ms each)"
        )
        return MemberPlan(**plan, members=None, seconds_per_member=per_member, why=why)
    plan["final_estimated"] = final + added * per_member
    return MemberPlan(
        **plan,
        members=members,
        added=added,
        seconds_per_member=per_member,
        why=f"{spare:.0f} s of the budget left after the list and the final models (~{final:.0f} s), "
        f"~{per_member:.0f} s per added trunk",
    )
