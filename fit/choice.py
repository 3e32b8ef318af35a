"""Which candidate `station fit` keeps: a criterion its sample can carry, and how sure the choice is.

With defects, candidates are compared by AUROC on the calibration part. It ranks every good part
against every defect, so ten defects give over a thousand comparisons where the escapes at one
threshold give ten outcomes: by escapes, a candidate of AUROC 0.946 lost to one of 0.823 for one
more escape of ten. How sure a comparison is: the share of paired bootstrap resamples of the
calibration part (goods and defects resampled apart, the same parts for every candidate) in which
one candidate's AUROC is above the other's. The default candidate keeps its place unless another
beats it in at least CONFIDENT of the resamples.

Without defects: the lowest false-reject rate on the calibration part, the validation AUROC on
synthetic anomalies breaking ties; no resampling can say more about defects that were never seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibration.thresholds import auroc

RESAMPLES = 400
CONFIDENT = 0.9
RULE_WITH_DEFECTS = (
    "highest AUROC on the calibration part (every good part ranked against every defect), "
    f"escapes at the threshold breaking ties; the default stays unless another beats it in "
    f"{CONFIDENT:.0%} of {RESAMPLES} paired resamples"
)
RULE_GOODS_ONLY = "lowest false-reject rate on the calibration part, validation AUROC breaking ties"


@dataclass(frozen=True)
class Choice:
    chosen: object  # candidates.Outcome
    rule: str
    runner_up: object | None = None
    confidence: float | None = None  # share of resamples in which the chosen beats the runner-up
    note: str = ""

    def summary(self) -> dict:
        return {
            "chosen": self.chosen.candidate.name,
            "rule": self.rule,
            "runner_up": self.runner_up.candidate.name if self.runner_up else None,
            "confidence": None if self.confidence is None else round(self.confidence, 3),
            "resamples": RESAMPLES if self.confidence is not None else None,
            "note": self.note,
            "text": self.line(),
        }

    def line(self) -> str:
        text = f"chose {self.chosen.candidate.name}"
        if self.runner_up is not None and self.runner_up.auroc == self.chosen.auroc:
            text += (
                f": tied on calibration AUROC ({self.chosen.auroc:.4f}) with {self.runner_up.candidate.name}; "
                "fewer escapes at the threshold, then the list's order, decided"
            )
        elif self.runner_up is not None and self.confidence is not None:
            text += (
                f": AUROC above the runner-up {self.runner_up.candidate.name} in {self.confidence:.0%} of "
                f"{RESAMPLES} paired resamples of the calibration part"
            )
        return text + (f" ({self.note})" if self.note else "")


def choose(usable: list, default_candidate) -> Choice:
    """usable: the candidates' Outcomes in search order, the default first when it ran."""
    if any(o.defect_scores is None or not len(o.defect_scores) for o in usable):
        best = min(usable, key=lambda o: (round(o.false_reject_rate, 9), -(o.val_auroc or 0.0)))
        return Choice(best, RULE_GOODS_ONLY)
    wins = paired_wins(usable)
    order = sorted(range(len(usable)), key=lambda i: (-usable[i].auroc, usable[i].escape_rate, i))
    best, note = order[0], ""
    if usable[0].candidate == default_candidate and best != 0 and wins[best, 0] < CONFIDENT:
        note = (
            f"{usable[best].candidate.name} had the higher AUROC, {usable[best].auroc:.4f} against "
            f"{usable[0].auroc:.4f}, but beat the default in only {wins[best, 0]:.0%} of the resamples"
        )
        best = 0
    others = [i for i in order if i != best]
    if not others:
        return Choice(usable[best], RULE_WITH_DEFECTS, note=note)
    return Choice(usable[best], RULE_WITH_DEFECTS, usable[others[0]], float(wins[best, others[0]]), note)


def paired_wins(outcomes: list, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """wins[i, j]: share of resamples in which outcome i's AUROC is above j's (ties count half)."""
    rng = np.random.default_rng(seed)
    n_good, n_defect = len(outcomes[0].good_scores), len(outcomes[0].defect_scores)
    aurocs = np.empty((resamples, len(outcomes)))
    for r in range(resamples):
        goods, defects = rng.integers(0, n_good, n_good), rng.integers(0, n_defect, n_defect)
        aurocs[r] = [auroc(o.good_scores[goods], o.defect_scores[defects]) for o in outcomes]
    above = (aurocs[:, :, None] > aurocs[:, None, :]).mean(axis=0)
    tied = (aurocs[:, :, None] == aurocs[:, None, :]).mean(axis=0)
    return above + tied / 2.0
