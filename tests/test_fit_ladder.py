"""`station fit`'s input sizes and budget: the pretrained ladder, the cost measured before training,
what the list leaves of the budget (fit/sizes.py, fit/candidates.py, fit/budget.py)."""

import numpy as np
import pytest

from fit import candidates
from fit.budget import Budget, Pools, after_audit, final_seconds, plan_members
from fit.candidates import Candidate, Outcome, SearchOptions, candidate_list, run_candidates
from fit.sizes import MIN_GAIN, PRETRAINED_STEP, larger_pretrained_sizes, native_ceiling, pretrained_size
from station.core.errors import DataError

NATIVES = ((300, 300), (500, 1250), (1250, 500), (632, 222), (140, 140), (4000, 3000), (36, 26), (96, 96))


@pytest.mark.parametrize("native", NATIVES)
def test_the_ladder_keeps_the_aspect_never_passes_the_photos_size_and_grows_by_a_real_step(native):
    sizes = [pretrained_size(native)] + larger_pretrained_sizes(native)
    top = native_ceiling(native)
    ratio = native[0] / native[1]
    for width, height in sizes[1:]:
        assert width % PRETRAINED_STEP == 0 and height % PRETRAINED_STEP == 0
        assert width <= native[0] and height <= native[1]  # never above the photos' own size
        assert abs(width / height - ratio) / ratio < 0.25, (width, height)  # not squeezed
    areas = [w * h for w, h in sizes]
    assert all(b >= MIN_GAIN * a for a, b in zip(areas, areas[1:]))  # each rung adds real pixels
    if areas[-1] * MIN_GAIN <= top[0] * top[1]:
        pytest.fail(f"{native}: the photos' own size {top} is missing from the ladder {sizes}")
    if len(sizes) > 1:
        assert sizes[-1] == top


def test_square_photos_get_about_160_and_their_own_size_small_photos_no_ladder():
    assert larger_pretrained_sizes((300, 300)) == [(160, 160), (288, 288)]
    assert larger_pretrained_sizes((36, 26)) == [] and larger_pretrained_sizes((100, 100)) == []


def test_the_list_measures_the_cheap_pretrained_input_early_and_climbs_the_ladder_last():
    names = [c.name for c in candidate_list((300, 300))]
    assert names[:4] == [
        "cnn/center/36x26/seed0",
        "lite0/center/96x96/seed0",
        "positions/frozen-s8/160x160/seed0",
        "positions/frozen-s16/160x160/seed0",
    ]
    assert names[-7:] == [
        "lite0/center/160x160/seed0",
        "lite0/center/288x288/seed0",
        "lite0ft/center/96x96/seed0",
        "lite0ft/center/160x160/seed0",
        "cnn/contrastive/36x26/seed0",
        "mlp/contrastive/36x26/seed0",
        "cnn/triplet/36x26/seed0",
    ]
    small = [c.name for c in candidate_list((36, 26))]
    assert [n for n in small if n.startswith("lite0")] == ["lite0/center/112x80/seed0", "lite0ft/center/112x80/seed0"]
    assert names.index("cnn/center/72x52/seed0") < names.index("lite0/center/160x160/seed0")
    assert [c.name for c in candidate_list((36, 26))][-1] == "cnn/triplet/36x26/seed0"


def _fake(seconds_per_kilopixel):
    def fake(candidate, train, val, calibration, checkpoint, options):
        good, defect = np.random.default_rng(0).normal(size=100), np.random.default_rng(1).normal(size=30) + 2
        return Outcome(
            candidate,
            seconds=seconds_per_kilopixel * candidate.size[0] * candidate.size[1] / 1000,
            checkpoint=checkpoint,
            metric="minkowski",
            threshold=1.0,
            escape_rate=0.1,
            auroc=0.9,
            false_reject_rate=0.01,
            good_scores=good,
            defect_scores=defect,
            ms_per_part=1.0,
        )

    return fake


def test_the_budget_left_after_the_list_climbs_the_ladder_while_the_estimate_fits(tmp_path, monkeypatch):
    from export import train  # noqa: F401  (imported before the clock starts, as in a real run)

    clock = [0.0]
    monkeypatch.setattr(candidates.time, "perf_counter", lambda: clock[0])

    def timed(candidate, *args):
        outcome = _fake(10.0)(candidate, *args)
        clock[0] += outcome.seconds
        return outcome

    monkeypatch.setattr(candidates, "_train_and_measure", timed)
    order = [
        Candidate("lite0", "center", 0, (96, 96)),
        Candidate("lite0", "center", 0, (160, 160)),
        Candidate("lite0", "center", 0, (288, 288)),
    ]
    # 96x96 costs ~92 s on the fake clock, 160x160 ~256 s, 288x288 ~829 s: 400 s hold the first two only.
    search = run_candidates(
        order,
        list(range(10)),
        [],
        [],
        tmp_path,
        SearchOptions(budget_minutes=400 / 60, epochs=1, say=lambda line: None),
    )
    assert [o.candidate for o in search.outcomes] == order[:2] and not search.complete
    assert search.skipped == ["lite0/center/288x288/seed0: budget (52 s left, ~829 s estimated)"]
    assert clock[0] <= 400 * 1.1  # the budget is kept
    clock[0] = 0.0
    search = run_candidates(
        order, list(range(10)), [], [], tmp_path, SearchOptions(budget_minutes=30, epochs=1, say=lambda line: None)
    )
    assert len(search.outcomes) == 3 and search.complete


def test_a_candidate_over_the_time_per_part_is_never_trained_nor_a_larger_input_of_it(
    sim_dataset, tmp_path, monkeypatch
):
    """The cost is measured with onnxruntime on the untrained graph (the same operations) before training."""
    from export import train
    from station.core.imagefolder import scan_dataset

    def never(*args, **kwargs):
        raise AssertionError("a candidate over --max-ms-per-part was trained")

    monkeypatch.setattr(train, "train_split", never)
    items = scan_dataset(sim_dataset)
    order = [Candidate("mlp", "center"), Candidate("mlp", "center", 0, (72, 52))]
    with pytest.raises(DataError, match="no candidate could be trained") as refused:
        run_candidates(
            order,
            items[::2],
            [],
            items[1::2],
            tmp_path,
            SearchOptions(epochs=1, max_ms_per_part=1e-6, say=lambda line: None),
        )
    assert "measured here before training" in str(refused.value) and "not trained" in str(refused.value)
    assert "mlp/center/72x52" not in str(refused.value)  # never measured: a smaller input was already over
    assert 0 < candidates.cost_per_part(tmp_path / "c0.untrained.pt") < 50


def _budget(seconds, elapsed, pools=None):
    """A Budget `elapsed` seconds into its `seconds` (pools: 500 search photos, 2,000 final ones)."""
    pools = pools or Pools(
        n_search_train=500, n_calibration=250, n_final_train=2000, n_final_held=400, n_final_all=2400, n_test=250
    )
    return Budget(seconds, pools, started=candidates.time.perf_counter() - elapsed)


def test_the_budget_a_small_dataset_leaves_adds_trunks_after_reserving_the_final_models():
    chosen = Outcome(Candidate("cnn", "center"), seconds=10.0, ms_per_part=0.6)  # 3 trunks of 0.2 ms
    # one trunk for both final models: 10 s x 2,000 / 500 = 40 s; the default three: 120 s, reserved first.
    plan = plan_members(chosen, 3, None, _budget(600.0, 350.0), 10.0)  # 250 s left
    assert plan.members == 6 and plan.added == 3 and plan.seconds_per_member == pytest.approx(40.0, rel=1e-3)
    assert plan.final_estimated == pytest.approx(240.0, rel=1e-3) and plan.over is None
    plan = plan_members(chosen, 3, None, _budget(600.0, 390.0), 10.0)  # 210 s left: 120 s reserved, 2 more fit
    assert plan.members == 5 and plan.added == 2
    summary = plan.summary(190.0, 590.0, 70.0)
    assert summary["spent_seconds"] == 590.0 and summary["spent_share"] == pytest.approx(0.983) and summary["within"]
    assert summary["final_seconds_estimated"] == pytest.approx(200.0, rel=1e-3) and "whole" in summary["rule"]
    assert plan_members(chosen, 3, None, _budget(600.0, 100.0), 0.9).members == 4  # 4 x 0.2 ms fit 0.9 ms
    for plan in (
        plan_members(chosen, 3, None, _budget(600.0, 470.0), 10.0),  # 130 s left: the default's 120 s only
        plan_members(chosen, 3, 2, _budget(600.0, 100.0), 10.0),  # --members decides
        plan_members(chosen, 3, None, _budget(600.0, 100.0), 10.0, complete=False),
        plan_members(
            Outcome(Candidate("lite0", "center"), seconds=10.0, ms_per_part=2.0), 1, None, _budget(600.0, 100.0), 10.0
        ),
    ):
        assert plan.added == 0 and plan.why and plan.over is None


def test_a_chosen_recipe_whose_final_models_cannot_fit_is_said_never_a_silent_overrun():
    chosen = Outcome(Candidate("cnn", "center"), seconds=100.0, ms_per_part=0.6)  # final models: 3 x 400 s
    plan = plan_members(chosen, 3, None, _budget(600.0, 300.0), 10.0)
    assert plan.added == 0 and "overrun" in plan.over and "1200 s" in plan.over
    summary = plan.summary(1200.0, 1500.0)
    assert summary["over"] == plan.over and summary["within"] is False


def test_the_final_models_scale_by_their_photos_trunks_forms_and_a_frozen_model_by_what_it_embeds():
    pools = Pools(
        n_search_train=500, n_calibration=250, n_final_train=2000, n_final_held=400, n_final_all=2400, n_test=250
    )
    trained = final_seconds(pools, Candidate("cnn", "center"), 3, 10.0, embed_seconds=1.0, export_seconds=0.5)
    # training 3 x 10 x 4; embedding 1 s a calibration part, (400 + 250) photos in 2 forms; 2 models x 3 exports x 3.
    assert trained == pytest.approx(120.0 + 1.0 * 2 * 650 / 250 + 2 * 3 * 3 * 0.5)
    frozen = final_seconds(pools, Candidate("positions", "frozen-s8"), 1, 5.0)
    assert frozen == pytest.approx(5.0 * (2400 + 250) / 250)
    gated = Pools(**{**pools.__dict__, "n_final_gate": 1500})  # the export gates embed their samples too
    assert final_seconds(gated, Candidate("cnn", "center"), 3, 10.0, 1.0, 0.5) == pytest.approx(
        trained + 1.0 * 3 * 3 * 1500 / 250
    )


def test_an_audit_model_slower_than_estimated_says_the_bundle_model_will_overrun():
    budget = _budget(600.0, 400.0)  # 200 s left when the audit model is done
    assert after_audit(budget, 100.0, 100.0, 0.5) is None  # the bundle's ~100 s fit
    said = after_audit(budget, 300.0, 100.0, 0.5)
    assert "took 300 s (~100 s estimated, x3.00)" in said and "~100 s over --budget 10 min" in said


def test_a_candidate_starts_only_while_it_and_the_final_models_fit(tmp_path, monkeypatch):
    """The first candidate's final models are kept aside: a second one that fits the budget alone but not
    beside them is skipped, a cheaper third still runs (fit/budget.py)."""
    from export import train  # noqa: F401

    clock = [0.0]
    monkeypatch.setattr(candidates.time, "perf_counter", lambda: clock[0])
    order = [Candidate("mlp", "center"), Candidate("mlp", "center", 0, (72, 52)), Candidate("mlp", "center", 1)]
    took = {order[0]: 10.0, order[1]: 40.0, order[2]: 10.0}

    def timed(candidate, *args):
        outcome = _fake(0.0)(candidate, *args)
        outcome.seconds = took[candidate]
        clock[0] += outcome.seconds
        return outcome

    monkeypatch.setattr(candidates, "_train_and_measure", timed)
    pools = Pools(n_search_train=10, n_calibration=10, n_final_train=30, n_final_held=6, n_final_all=36, n_test=4)
    # mlp, 3 trunks: 3 x 10 s x 30 / 10 = 90 s of final models for the first; 120 s budget.
    budget = Budget(120.0, pools, started=0.0)
    search = run_candidates(
        order,
        list(range(10)),
        [],
        [],
        tmp_path,
        SearchOptions(budget_minutes=2, epochs=1, say=lambda line: None, budget=budget),
    )
    # The 72x52 mlp (~40 s) alone fits the 110 s left, not beside 4 x its own 40 s x 3 trunks reserved.
    assert [o.candidate for o in search.outcomes] == [order[0], order[2]]
    assert search.skipped[0].startswith("mlp/center/72x52/seed0: budget (110 s left, ~40 s estimated, ~")
    assert "kept for the final models" in search.skipped[0] and not search.complete
    # The third: 10 s, with the first's 90 s reserved, fits the 110 s left.


def test_estimates_follow_how_far_off_the_earlier_ones_were_and_a_skipped_one_leaves_room_for_cheaper(
    tmp_path, monkeypatch
):
    from export import train  # noqa: F401

    clock = [0.0]
    monkeypatch.setattr(candidates.time, "perf_counter", lambda: clock[0])
    order = [
        Candidate("mlp", "center"),
        Candidate("mlp", "center", 0, (72, 52)),
        Candidate("cnn", "center", 0, (72, 52)),
        Candidate("mlp", "center", 1),
    ]
    took = {order[0]: 10.0, order[1]: 80.0, order[2]: 120.0, order[3]: 10.0}  # the 72x52 mlp: twice its estimate

    def timed(candidate, *args):
        outcome = _fake(0.0)(candidate, *args)
        outcome.seconds = took[candidate]
        clock[0] += outcome.seconds
        return outcome

    monkeypatch.setattr(candidates, "_train_and_measure", timed)
    search = run_candidates(
        order, list(range(10)), [], [], tmp_path, SearchOptions(budget_minutes=5, epochs=1, say=lambda line: None)
    )
    # The cnn's 120 s (3 x the mlp's per pixel) doubled to 240 s does not fit the 210 s left; the second mlp does.
    assert [o.candidate for o in search.outcomes] == [order[0], order[1], order[3]]
    assert search.skipped == ["cnn/center/72x52/seed0: budget (210 s left, ~240 s estimated)"] and not search.complete


def test_a_cost_over_the_limit_is_measured_again_and_the_lowest_median_kept(tmp_path, monkeypatch):
    """A busy machine slows a measurement, never speeds it up (one lite0 measured 16.5 ms under other work)."""
    from export.positions import export_position_model
    from station.core import embedder

    export_position_model(8, (36, 26), tmp_path / "m.onnx")
    alone = candidates.onnx_ms(tmp_path / "m.onnx", (1, 26, 36))
    real = embedder.build_session
    runs = []

    class Busy:  # the first of three measurements runs beside other work
        def __init__(self, path):
            self.session = real(path)

        def run(self, names, feed):
            runs.append(1)
            if len(runs) <= candidates.COST_WARMUP + candidates.COST_RUNS:
                candidates.time.sleep(0.02)
            return self.session.run(names, feed)

    monkeypatch.setattr(embedder, "build_session", Busy)
    limit = alone * 3 + 1.0
    measured = candidates.onnx_ms(tmp_path / "m.onnx", (1, 26, 36), limit)
    assert measured <= limit and len(runs) == 2 * (candidates.COST_WARMUP + candidates.COST_RUNS)
    runs.clear()
    assert candidates.onnx_ms(tmp_path / "m.onnx", (1, 26, 36), 1e-6) > 0  # never under: three tries, then the lowest
    assert len(runs) == candidates.COST_TRIES * (candidates.COST_WARMUP + candidates.COST_RUNS)


def test_the_command_line_states_the_budget_default_fit_uses():
    """The parser must not import fit/ (the daemon's process loads the CLI): its help restates the default."""
    from station.cli import build_parser
    from fit.candidates import DEFAULT_BUDGET_MINUTES

    fit_parser = next(
        a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith(" fit")
    )
    budget = next(a for a in fit_parser._actions if "--budget" in a.option_strings)
    assert f"(default {DEFAULT_BUDGET_MINUTES:g})" in budget.help
