"""What `station fit` does with the budget the candidate list leaves (docs/fit.md, "The budget").

1. After the from-scratch trunks the list climbs the pretrained trunk's inputs, cheapest first, up to
   the photos' own size (fit/sizes.py): a larger input helped it. Each candidate starts only while
   its estimate fits what is left, a skipped one leaving room for later cheaper ones
   (fit/candidates.py), and only after its cost per part was measured within --max-ms-per-part.
2. What is left after the whole list goes to more trunks in the chosen recipe's ensemble, both final
   models (audit and bundle), up to MAX_MEMBERS: an ensemble evens out its seeds' lottery (tiles, one
   trunk 0.958-0.993 by seed, three 0.983, four 0.988; docs/fit.md). Added only while their estimated training
   time fits what is left of --budget and their cost per part stays within --max-ms-per-part; not for
   a recipe of one member (the pretrained trunk's members would share one backbone; the per-position
   model trains nothing), nor when --members is given or the list did not finish.
The budget then holds the search and the added trunks; the default ensemble's training comes on top,
as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_MEMBERS = 6  # twice export/train.py's DEFAULT_MEMBERS
THRESHOLD_SHARE = 0.85  # each final model trains on its pool less a 15 % threshold slice (fit/pipeline.py)
RULE = ("candidates in order while each one's estimate fits what is left, the pretrained trunk at larger inputs "
        "after the from-scratch ones (cheapest first); what the whole list leaves adds trunks to the chosen ensemble, "
        f"up to {MAX_MEMBERS}, while their estimated training fits it and the cost per part --max-ms-per-part")


@dataclass(frozen=True)
class MemberPlan:
    budget_seconds: float
    search_seconds: float
    members: int | None  # the final models' trunks; None: the recipe's default (nothing added)
    added: int = 0
    seconds_per_member: float | None = None  # estimated, both final models together
    why: str = ""

    @property
    def left_seconds(self) -> float:
        return self.budget_seconds - self.search_seconds

    def summary(self, measured_added_seconds: float | None = None) -> dict:
        estimated = None if self.seconds_per_member is None else self.added * self.seconds_per_member
        spent = self.search_seconds + (measured_added_seconds or 0.0)
        return {"budget_seconds": round(self.budget_seconds, 1), "search_seconds": round(self.search_seconds, 1),
                "added_members": self.added, "members": self.members,
                "added_seconds_estimated": None if estimated is None else round(estimated, 1),
                "added_seconds_measured": None if measured_added_seconds is None else round(measured_added_seconds, 1),
                "spent_seconds": round(spent, 1), "spent_share": round(spent / self.budget_seconds, 3),
                "why": self.why, "rule": RULE}


def plan_members(chosen, default_members: int, fixed_members: int | None, budget_seconds: float,
                 search_seconds: float, n_search_train: int, n_pools: int, max_ms_per_part: float,
                 complete: bool = True) -> MemberPlan:
    """How many trunks the final models get. `chosen`: the chosen candidate's Outcome (one trunk trained
    on `n_search_train` photos in `seconds`; `ms_per_part` for `default_members`); `n_pools`: the photos
    of the audit and bundle models' pools together; `complete`: the whole candidate list ran."""
    plan = dict(budget_seconds=budget_seconds, search_seconds=search_seconds, members=fixed_members)
    if fixed_members is not None:
        return MemberPlan(**plan, why="--members was given")
    if not complete:
        return MemberPlan(**plan, why="the budget or --max-candidates skipped some of the list: nothing left to add")
    if default_members < 2:
        return MemberPlan(**plan, why=f"{chosen.candidate.arch} is one member: nothing to add")
    per_member = chosen.seconds * THRESHOLD_SHARE * n_pools / max(n_search_train, 1)
    left = budget_seconds - search_seconds
    by_time = math.floor(left / per_member) if per_member > 0 else MAX_MEMBERS
    trunk_ms = (chosen.ms_per_part or 0.0) / default_members
    by_cost = math.floor(max_ms_per_part / trunk_ms) if trunk_ms > 0 else MAX_MEMBERS
    members = max(default_members, min(MAX_MEMBERS, default_members + max(by_time, 0), by_cost))
    added = members - default_members
    if not added:
        why = (f"{left:.0f} s left, one more trunk ~{per_member:.0f} s" if by_time < 1 else
               f"one more trunk would cost over --max-ms-per-part ({trunk_ms:.2f} ms each)")
        return MemberPlan(**plan, seconds_per_member=per_member, why=why)
    return MemberPlan(budget_seconds, search_seconds, members, added, per_member,
                      f"{left:.0f} s of the budget left after the list, ~{per_member:.0f} s per added trunk")
