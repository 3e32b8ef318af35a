"""Quality figures of a model + reference set on a labelled image folder."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibration.thresholds import auroc, clopper_pearson
from station.core.scoring import distances, is_defect


@dataclass(frozen=True)
class Evaluation:
    scores: np.ndarray  # by the reference set's metric
    is_defect_truth: np.ndarray
    classes: list[str]
    threshold: float
    metric: str
    per_metric_scores: dict[str, np.ndarray]

    def figures(self) -> dict:
        truth = self.is_defect_truth
        flagged = is_defect(self.scores, self.threshold)
        n_good, n_defect = int((~truth).sum()), int(truth.sum())
        confusion = {
            "true_ng": int((flagged & truth).sum()),  # defect caught
            "false_ng": int((flagged & ~truth).sum()),  # good part rejected
            "true_ok": int((~flagged & ~truth).sum()),
            "escaped": int((~flagged & truth).sum()),  # defect passed as OK
        }
        both = n_good > 0 and n_defect > 0
        return {
            "metric": self.metric,
            "threshold": self.threshold,
            "n_good": n_good,
            "n_defect": n_defect,
            "auroc": auroc(self.scores[~truth], self.scores[truth]) if both else None,
            "accuracy": float(np.mean(flagged == truth)),
            "false_reject_rate": confusion["false_ng"] / n_good if n_good else None,
            "escape_rate": confusion["escaped"] / n_defect if n_defect else None,
            # 95 % Clopper-Pearson intervals: what the counts can and cannot promise.
            "false_reject_rate_ci": _interval(confusion["false_ng"], n_good),
            "escape_rate_ci": _interval(confusion["escaped"], n_defect),
            "confusion": confusion,
            "per_metric_auroc": {
                name: auroc(values[~truth], values[truth]) if both else None
                for name, values in self.per_metric_scores.items()
            },
            "escape_rate_by_class": self._escapes_by_class(flagged),
            "escapes_by_class": self.escape_counts_by_class(flagged),
        }

    def escape_counts_by_class(self, flagged: np.ndarray) -> dict[str, dict]:
        """Per defect class: parts, escapes, rate and its 95 % interval."""
        classes = np.array(self.classes)
        out = {}
        for name in sorted(set(self.classes) - {"good"}):
            members = classes == name
            escaped = int(np.sum(~flagged[members]))
            out[name] = {
                "n": int(members.sum()),
                "escaped": escaped,
                "escape_rate": escaped / int(members.sum()),
                "escape_rate_ci": _interval(escaped, int(members.sum())),
            }
        return out

    def _escapes_by_class(self, flagged: np.ndarray) -> dict[str, float]:
        classes = np.array(self.classes)
        return {name: float(np.mean(~flagged[classes == name])) for name in sorted(set(self.classes)) if name != "good"}


def _interval(k: int, n: int) -> list[float] | None:
    low, high = clopper_pearson(k, n)
    return None if low is None else [low, high]


def evaluate_embeddings(embeddings: np.ndarray, classes: list[str], reference_set) -> Evaluation:
    all_distances = distances(embeddings, reference_set.model)
    truth = np.array([name != "good" for name in classes])
    return Evaluation(
        scores=all_distances[reference_set.metric],
        is_defect_truth=truth,
        classes=list(classes),
        threshold=reference_set.threshold,
        metric=reference_set.metric,
        per_metric_scores={name: all_distances[name] for name in reference_set.model.scores},
    )
