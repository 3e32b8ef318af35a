"""station.yaml's model forms: `model: {fp32: PATH, int8: PATH}` with a reference set per form, and
`model_form: auto|fp32|int8` (station/runtime/model_forms.py chooses and times them at start).

    model: {fp32: model.onnx, int8: model.int8.onnx}
    reference: {fp32: reference, int8: reference.int8}      # or products: {A: {fp32: ..., int8: ...}}
    model_form: auto                                         # the faster on this CPU; or pin fp32 / int8

A single `model: PATH` with single reference paths is today's station.yaml, unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FORMS = ("fp32", "int8")  # the forms a bundle may carry a model in
MODEL_FORMS = ("auto",) + FORMS  # model_form: auto runs the faster on this CPU, timed at start
KeyPath = tuple[str, ...]


def form_paths(value: Any, info, resolve) -> Path | dict[str, Path]:
    """A path (one model or reference set, as always), or {FORM: PATH} for a bundle that carries a model in
    each form (station/runtime/model_forms.py): fp32 and int8 each need their own reference sets."""
    if isinstance(value, dict):
        unknown = [str(key) for key in value if key not in FORMS]
        if unknown:
            raise ValueError(f"a model form is one of {', '.join(FORMS)}, got {unknown[0]!r}")
        if not value:
            raise ValueError("name at least one form: {fp32: PATH, int8: PATH}")
        return {form: _one_path(path, info, resolve, form) for form, path in value.items()}
    return _one_path(value, info, resolve)


def _one_path(value: Any, info, resolve, form: str | None = None) -> Path:
    if isinstance(value, bool) or not isinstance(value, (str, Path)) or not str(value).strip():
        where = f"{form}: " if form else ""
        raise ValueError(f"{where}must be a path, or {{fp32: PATH, int8: PATH}} for a model in each form")
    return resolve(Path(value), info)


def form_problems(config) -> list[tuple[KeyPath, str]]:
    """A model in several forms needs a reference set for each form of every product (their thresholds differ),
    and a single model the single paths it always had; a pin must name a form the model: has."""
    forms = sorted(config.model) if isinstance(config.model, dict) else None
    wanted = "{" + ", ".join(f"{form}: PATH" for form in forms) + "}" if forms else "PATH"
    found = []
    references = {("products", name): path for name, path in (config.products or {}).items()}
    if config.reference is not None:
        references = {("reference",): config.reference}
    for key, path in references.items():
        have = sorted(path) if isinstance(path, dict) else None
        if have != forms:
            why = (
                f"a reference set for each form of model: ({', '.join(forms)})" if forms else "model: is a single file"
            )
            found.append((key, f"needs {wanted}, {why}; got {_said(path)}"))
    if config.model_form != "auto" and config.model_form not in (forms or ()):
        has = f"has only {', '.join(forms)}" if forms else "is a single file"
        found.append(
            (
                ("model_form",),
                f"pins {config.model_form}, but model: {has}; give "
                f"model: {{{config.model_form}: PATH, ...}} or model_form: auto",
            )
        )
    return found


def _said(path) -> str:
    return "{" + ", ".join(sorted(path)) + "}" if isinstance(path, dict) else "a single path"
