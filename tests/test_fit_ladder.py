"""`station fit`'s input sizes and budget: the pretrained ladder, the cost measured before training,
what the list leaves of the budget (fit/sizes.py, fit/candidates.py, fit/budget.py)."""
import numpy as np
import pytest

from fit import candidates
from fit.budget import MAX_MEMBERS, plan_members
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
    assert names[:4] == ["cnn/center/36x26/seed0", "lite0/center/96x96/seed0",
                         "positions/frozen-s8/160x160/seed0", "positions/frozen-s16/160x160/seed0"]
    assert names[-5:] == ["lite0/center/160x160/seed0", "lite0/center/288x288/seed0", "cnn/contrastive/36x26/seed0",
                          "mlp/contrastive/36x26/seed0", "cnn/triplet/36x26/seed0"]
    assert names.index("cnn/center/72x52/seed0") < names.index("lite0/center/160x160/seed0")
    assert [c.name for c in candidate_list((36, 26))][-1] == "cnn/triplet/36x26/seed0"


def _fake(seconds_per_kilopixel):
    def fake(candidate, train, val, calibration, checkpoint, options):
        good, defect = np.random.default_rng(0).normal(size=100), np.random.default_rng(1).normal(size=30) + 2
        return Outcome(candidate, seconds=seconds_per_kilopixel * candidate.size[0] * candidate.size[1] / 1000,
                       checkpoint=checkpoint, metric="minkowski", threshold=1.0, escape_rate=0.1, auroc=0.9,
                       false_reject_rate=0.01, good_scores=good, defect_scores=defect, ms_per_part=1.0)
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
    order = [Candidate("lite0", "center", 0, (96, 96)), Candidate("lite0", "center", 0, (160, 160)),
             Candidate("lite0", "center", 0, (288, 288))]
    # 96x96 costs ~92 s on the fake clock, 160x160 ~256 s, 288x288 ~829 s: 400 s hold the first two only.
    search = run_candidates(order, list(range(10)), [], [], tmp_path, SearchOptions(
        budget_minutes=400 / 60, epochs=1, say=lambda line: None))
    assert [o.candidate for o in search.outcomes] == order[:2] and not search.complete
    assert search.skipped == ["lite0/center/288x288/seed0: budget (52 s left, ~829 s estimated)"]
    assert clock[0] <= 400 * 1.1  # the budget is kept
    clock[0] = 0.0
    search = run_candidates(order, list(range(10)), [], [], tmp_path, SearchOptions(
        budget_minutes=30, epochs=1, say=lambda line: None))
    assert len(search.outcomes) == 3 and search.complete


def test_a_candidate_over_the_time_per_part_is_never_trained_nor_a_larger_input_of_it(sim_dataset, tmp_path,
                                                                                         monkeypatch):
    """The cost is measured with onnxruntime on the untrained graph (the same operations) before training."""
    from export import train
    from station.core.imagefolder import scan_dataset

    def never(*args, **kwargs):
        raise AssertionError("a candidate over --max-ms-per-part was trained")

    monkeypatch.setattr(train, "train_split", never)
    items = scan_dataset(sim_dataset)
    order = [Candidate("mlp", "center"), Candidate("mlp", "center", 0, (72, 52))]
    with pytest.raises(DataError, match="no candidate could be trained") as refused:
        run_candidates(order, items[::2], [], items[1::2], tmp_path,
                       SearchOptions(epochs=1, max_ms_per_part=1e-6, say=lambda line: None))
    assert "measured here before training" in str(refused.value) and "not trained" in str(refused.value)
    assert "mlp/center/72x52" not in str(refused.value)  # never measured: a smaller input was already over
    assert 0 < candidates.cost_per_part(tmp_path / "c0.untrained.pt") < 50


def test_the_budget_a_small_dataset_leaves_adds_trunks_within_time_and_cost():
    chosen = Outcome(Candidate("cnn", "center"), seconds=10.0, ms_per_part=0.6)  # 3 trunks of 0.2 ms
    # one more trunk: 10 s x 0.85 x 2000 / 500 = 34 s for both final models.
    plan = plan_members(chosen, 3, None, 600.0, 500.0, 500, 2000, 10.0)
    assert plan.members == 5 and plan.added == 2 and plan.seconds_per_member == pytest.approx(34.0)
    assert plan.summary(70.0)["spent_seconds"] == 570.0 and plan.summary(70.0)["spent_share"] == 0.95
    assert plan_members(chosen, 3, None, 600.0, 100.0, 500, 2000, 10.0).members == MAX_MEMBERS
    assert plan_members(chosen, 3, None, 600.0, 100.0, 500, 2000, 0.9).members == 4  # 4 x 0.2 ms fit 0.9 ms
    for plan in (plan_members(chosen, 3, None, 600.0, 590.0, 500, 2000, 10.0),  # 10 s left: no trunk fits
                 plan_members(chosen, 3, 2, 600.0, 100.0, 500, 2000, 10.0),  # --members decides
                 plan_members(chosen, 3, None, 600.0, 100.0, 500, 2000, 10.0, complete=False),
                 plan_members(Outcome(Candidate("lite0", "center"), seconds=10.0, ms_per_part=2.0), 1, None,
                              600.0, 100.0, 500, 2000, 10.0)):
        assert plan.added == 0 and plan.why


def test_estimates_follow_how_far_off_the_earlier_ones_were_and_a_skipped_one_leaves_room_for_cheaper(tmp_path,
                                                                                                      monkeypatch):
    from export import train  # noqa: F401

    clock = [0.0]
    monkeypatch.setattr(candidates.time, "perf_counter", lambda: clock[0])
    order = [Candidate("mlp", "center"), Candidate("mlp", "center", 0, (72, 52)), Candidate("cnn", "center", 0, (72, 52)),
             Candidate("mlp", "center", 1)]
    took = {order[0]: 10.0, order[1]: 80.0, order[2]: 120.0, order[3]: 10.0}  # the 72x52 mlp: twice its estimate

    def timed(candidate, *args):
        outcome = _fake(0.0)(candidate, *args)
        outcome.seconds = took[candidate]
        clock[0] += outcome.seconds
        return outcome

    monkeypatch.setattr(candidates, "_train_and_measure", timed)
    search = run_candidates(order, list(range(10)), [], [], tmp_path, SearchOptions(
        budget_minutes=5, epochs=1, say=lambda line: None))
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
