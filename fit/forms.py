"""The bundle's model forms: each exported form that passed the gate, calibrated on the same threshold slice.

An int8 embedding is not the fp32 one (cosine 0.9999, not 1), so a threshold set on one is not the
other's: each form gets its own reference set, from the same parts. Which form the station runs is
decided on the line PC (station/runtime/model_forms.py), so fit.json reports the test figures of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from calibration import thresholds as calibration_fit
from calibration import workflow
from calibration.evaluate import evaluate_embeddings
from fit import bundle

# The form whose figures are fit.json's headline ones: int8 when it passed (what `station fit` shipped
# before the bundle carried both), else fp32. The other form's are beside them under "forms".
HEADLINE_ORDER = ("int8", "fp32")


@dataclass(frozen=True)
class BuiltForm:
    form: str
    export: bundle.ExportChoice
    embedder: object
    calibration: calibration_fit.Calibration
    reference_set: object
    rule: str

    def summary(self) -> dict:
        latency = self.export.report.get("latency", {}) if isinstance(self.export.report, dict) else {}
        key = "fp32_batch1_ms" if self.form == "fp32" else "int8_batch1_ms"
        return {
            "model": bundle.FORM_FILES[self.form][0],
            "reference": bundle.FORM_FILES[self.form][1],
            "export_mode": self.export.mode,
            "metric": self.reference_set.metric,
            "threshold": self.reference_set.threshold,
            "reference_version": self.reference_set.version,
            # Measured on the PC that ran `station fit`; the line PC times its own at start.
            "batch1_ms_on_the_fit_pc": latency.get(key),
        }


def headline(forms: dict) -> str:
    return next(form for form in HEADLINE_ORDER if form in forms)


def calibrate_forms(exports: dict, folder: Path, held: list, options, data, threshold_rule) -> dict[str, BuiltForm]:
    """Each exported form's reference set, calibrated on `held` (parts no form trained on) by the same rule."""
    from station.core.embedder import Embedder

    built = {}
    goods, defects = [i for i in held if not i.is_defect], [i for i in held if i.is_defect]
    for form, export in exports.items():
        model, reference = bundle.FORM_FILES[form]
        embedder = Embedder(folder / model)
        good_set = workflow.embed_items(embedder, goods)
        defect_set = workflow.embed_items(embedder, defects) if defects else None
        calibration = calibration_fit.calibrate_held_out(
            good_set.embeddings,
            None if defect_set is None else defect_set.embeddings,
            target_false_reject=options.target_false_reject,
            defect_rate=options.defect_rate,
            escape_cost=options.escape_cost,
        )
        rule = threshold_rule(calibration, options)
        saved = workflow.save_calibration(
            embedder,
            calibration,
            good_set,
            defect_set,
            folder / reference,
            options.product_name,
            {"fit": rule, "data_fingerprint": data.fingerprint, "model_form": form},
        )
        built[form] = BuiltForm(form, export, embedder, calibration, saved, rule)
    return built


def test_figures(forms: dict[str, BuiltForm], test_items: list) -> dict[str, dict]:
    """Each form of the audit model judged on the test part: {form: figures}, with the embedded parts."""
    figures = {}
    for form, built in forms.items():
        tested = workflow.embed_items(built.embedder, test_items)
        evaluation = evaluate_embeddings(tested.embeddings, tested.classes, built.reference_set)
        figures[form] = (evaluation, tested)
    return figures


def fit_json(final: dict[str, BuiltForm], tested: dict[str, tuple]) -> dict:
    """fit.json's "forms": per form its files, export, threshold and test figures (by the audit model)."""
    out = {}
    for form, built in final.items():
        figures = tested[form][0].figures() if form in tested else {}
        out[form] = {
            **built.summary(),
            "test": {key: figures.get(key) for key in ("auroc", "escape_rate", "false_reject_rate")},
        }
    return out


def summary_lines(forms: dict) -> list[str]:
    """The screen's lines about the forms (fit.json's "forms")."""
    lines = []
    for form, item in forms.items():
        test = item["test"]
        auroc = "n/a" if test["auroc"] is None else f"{test['auroc']:.4f}"
        escapes = "n/a" if test["escape_rate"] is None else f"{test['escape_rate']:.2%}"
        ms = item["batch1_ms_on_the_fit_pc"]
        lines.append(
            f"  form {form:4s} {item['model']} ({item['export_mode']}), {item['reference']}/: test AUROC "
            f"{auroc}, escapes {escapes}, false rejects {test['false_reject_rate']:.2%}"
            + (f", {ms:.3f} ms a part on this PC" if ms is not None else "")
        )
    if len(forms) > 1:
        lines.append("  the station runs the faster form on its own CPU, timed at start (model_form: auto)")
    return lines
