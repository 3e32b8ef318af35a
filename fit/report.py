"""What `station fit` prints: the data, the candidates' table and the held-out test figures."""

from __future__ import annotations

from fit.split import split_table


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _ci(interval) -> str:
    return "" if interval is None else f", 95 % CI {interval[0]:.2%}-{interval[1]:.2%}"


def data_line(data, parts: list[str], n_val: int) -> str:
    counts = ", ".join(f"{name} {n}" for name, n in data.class_counts.items())
    table = split_table(data.items, parts)
    sizes = " / ".join(f"{part} {sum(c.values())}" for part, c in table.items())
    return (
        f"data: {len(data.items)} images ({counts}), fingerprint {data.fingerprint[:12]}\n"
        f"split: {sizes} (of train, {n_val} held out to stop training early)"
    )


def candidate_table(result: dict) -> list[str]:
    lines = [
        f"  {'candidate':28s} {'sec':>6s} {'metric':11s} {'cal escape':>10s} {'cal AUROC':>9s} "
        f"{'cal FRR':>8s} {'val AUROC':>9s} {'ms/part':>7s}"
    ]
    for row in result["candidates"]:
        if row["error"]:
            lines.append(f"  {row['candidate']:28s} {row['seconds']:6.1f} failed: {row['error'][:110]}")
            continue
        auroc = "n/a" if row["calibration_auroc"] is None else f"{row['calibration_auroc']:.4f}"
        val = "n/a" if row["val_auroc"] is None else f"{row['val_auroc']:.4f}"
        mark = "  <- chosen" if row["candidate"] == result["chosen_candidate"] else ""
        cost = "n/a" if row.get("ms_per_part") is None else f"{row['ms_per_part']:.2f}"
        lines.append(
            f"  {row['candidate']:28s} {row['seconds']:6.1f} {row['metric']:11s} "
            f"{_pct(row['calibration_escape_rate']):>10s} {auroc:>9s} "
            f"{_pct(row['calibration_false_reject_rate']):>8s} {val:>9s} {cost:>7s}{mark}"
        )
    lines += [f"  skipped {text}" for text in result["skipped_candidates"]]
    return lines


def summary_lines(result: dict) -> list[str]:
    lines = ["candidates (chosen on the calibration part):"] + candidate_table(result)
    lines.append(result["choice"]["text"])
    if result.get("budget"):
        spent = result["budget"]
        total = spent.get("total_seconds")
        lines.append(
            f"budget: {spent['spent_seconds']:.0f} of {spent['budget_seconds']:.0f} s spent "
            f"({spent['spent_share']:.0%}: search {spent['search_seconds']:.0f} s, final models "
            + ("n/a" if spent.get("final_seconds_measured") is None else f"{spent['final_seconds_measured']:.0f} s")
            + (
                ""
                if spent.get("final_seconds_estimated") is None
                else f" of ~{spent['final_seconds_estimated']:.0f} s estimated"
            )
            + ")"
            + (f", {spent['added_members']} added trunks" if spent["added_members"] else "")
            + f" ({spent['why']})"
            + ("" if total is None or spent.get("within") else " -- over --budget by more than 10 %")
        )
    lines.append(f"export: {result['export']['mode']} ({result['export']['why']})")
    if result.get("forms"):
        from fit.forms import summary_lines as form_lines

        lines += ["model forms in the bundle (test part, audit model):"] + form_lines(result["forms"])
    lines.append(
        f"bundle model: {result['n_trained']} photos; threshold {result['metric']} {result['threshold']:.6g} "
        f"({result['threshold_rule']})"
    )
    audit = result["audit_model"]
    lines.append(
        f"held-out test part ({result['n_good']} good, {result['n_defect']} defective parts), judged by the "
        f"audit model ({audit['n_trained']} photos, {audit['metric']} {audit['threshold']:.6g}): "
        "no test part trained it or set its threshold"
    )
    auroc = "n/a" if result["auroc"] is None else f"{result['auroc']:.4f}"
    confusion = result["confusion"]
    lines.append(f"  AUROC              {auroc}")
    lines.append(
        f"  escape rate        {_pct(result['escape_rate'])} ({confusion['escaped']}/{result['n_defect']})"
        f"{_ci(result['escape_rate_ci'])}"
    )
    lines.append(
        f"  false-reject rate  {_pct(result['false_reject_rate'])} ({confusion['false_ng']}/{result['n_good']})"
        f"{_ci(result['false_reject_rate_ci'])}"
    )
    if result["escapes_by_class"]:
        lines.append(
            "  escapes per class  "
            + ", ".join(f"{name} {c['escaped']}/{c['n']}" for name, c in result["escapes_by_class"].items())
        )
    lines += [f"warning: {text}" for text in result["warnings"]]
    lines.append(
        f"wrote the bundle (model.onnx{', model.int8.onnx' if 'int8' in result.get('forms', {}) else ''}, "
        "their reference sets, report/, station.yaml, fit.json) "
        f"in {result['seconds']:.0f} s"
    )
    return lines
