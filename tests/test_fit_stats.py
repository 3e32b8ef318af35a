"""`station fit`'s statistics: exact intervals, expected-cost thresholds, KISSME, reference-set formats."""

import numpy as np
import pytest
import yaml
from scipy.stats import binomtest

from calibration import cost_rule, thresholds
from station.core import metrics, reference_set
from station.core.reference_set import ReferenceSet
from station.core.scoring import ALL_SCORES, SCORES, distances, score


def parts(n, d=8, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    out = rng.normal(0.0, 1.0, (n, d))
    out[:, :2] += shift
    return out


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (3, 57), (10, 10), (0, 600), (12, 400)])
def test_clopper_pearson_matches_scipy(k, n):
    exact = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    low, high = thresholds.clopper_pearson(k, n)
    assert low == pytest.approx(exact.low, abs=1e-9) and high == pytest.approx(exact.high, abs=1e-9)
    assert thresholds.clopper_pearson(0, 0) == (None, None)


def empirical_cost(good, defect, threshold, defect_rate, escape_cost):
    return (1 - defect_rate) * np.mean(good > threshold) + defect_rate * escape_cost * np.mean(defect <= threshold)


def test_the_cost_threshold_is_near_the_empirical_optimum_where_classes_overlap():
    rng = np.random.default_rng(1)
    good, defect = rng.lognormal(0, 0.3, 3000), rng.lognormal(1.2, 0.3, 600)
    threshold, _ = thresholds.cost_threshold(good, defect, defect_rate=0.05, escape_cost=20)
    cuts = np.exp(np.linspace(-1, 3, 4001))
    best = min(empirical_cost(good, defect, t, 0.05, 20) for t in cuts)
    assert empirical_cost(good, defect, threshold, 0.05, 20) <= best * 1.15  # smoothing widens the tails a little
    # Dearer escapes move the threshold down (more false rejects, fewer escapes).
    cheap, _ = thresholds.cost_threshold(good, defect, 0.05, 1)
    assert cheap > threshold


def test_between_separated_classes_the_cut_follows_their_tails_not_their_extremes():
    rng = np.random.default_rng(2)
    good = rng.lognormal(np.log(0.07), 0.15, 160)  # tight, like unit-length embeddings of good parts
    defect = rng.lognormal(np.log(1.0), 0.6, 60)
    defect = defect[defect > good.max() * 2.5]  # no overlap on the sample: every cut between costs nothing
    threshold, cost = thresholds.cost_threshold(good, defect, 0.05, 20)
    midpoint = (good.max() + defect.min()) / 2
    assert good.max() < threshold < midpoint  # nearer the tight good tail than the sample's midpoint
    assert empirical_cost(good, defect, threshold, 0.05, 20) == 0 and cost > 0
    # A new sample from the same parts: fewer escapes than at the midpoint, no more false rejects than 1 %.
    new_good, new_defect = rng.lognormal(np.log(0.07), 0.15, 5000), rng.lognormal(np.log(1.0), 0.6, 5000)
    assert np.mean(new_defect <= threshold) < np.mean(new_defect <= midpoint)
    assert np.mean(new_good > threshold) < 0.01


def test_kissme_matrix_is_symmetric_psd_and_separates_a_partial_defect():
    good, defect = parts(200, seed=1), parts(40, seed=2, shift=3.0)
    matrix = metrics.kissme_matrix(good, defect)
    assert np.allclose(matrix, matrix.T)
    assert np.linalg.eigvalsh(matrix).min() >= -1e-10
    reference = good.mean(axis=0)
    new_good, new_defect = parts(100, seed=3), parts(100, seed=4, shift=3.0)
    auroc = thresholds.auroc(
        metrics.mahalanobis(new_good, reference, matrix), metrics.mahalanobis(new_defect, reference, matrix)
    )
    assert auroc > 0.95


def test_held_out_calibration_learns_kissme_and_picks_by_cost():
    good, defect = parts(120, seed=5), parts(30, seed=6, shift=2.5)
    calibration = thresholds.calibrate_held_out(good, defect)
    assert set(calibration.fits) == set(ALL_SCORES) and calibration.model.kissme is not None
    chosen = calibration.fits[calibration.metric]
    assert chosen.expected_cost == min(f.expected_cost for f in calibration.fits.values())
    assert set(distances(good[:3], calibration.model)) >= set(ALL_SCORES)
    assert score(good[:3], calibration.model, "kissme").shape == (3,)


def test_goods_only_calibration_never_uses_a_target_the_sample_cannot_support():
    calibration = thresholds.calibrate_held_out(parts(60, seed=7), None, target_false_reject=0.005)
    assert "needs at least 600" in calibration.warnings[0] and "5.00%" in calibration.warnings[0]
    assert calibration.model.kissme is None and set(calibration.fits) == set(SCORES)
    assert calibration.fits[calibration.metric].defect_scores is None
    assert thresholds.goods_needed(0.005) == 600 and thresholds.too_few_goods_warning(600, 0.005) is None


def test_station_calibrate_warns_when_too_few_goods_for_its_target():
    calibration = thresholds.calibrate(parts(100, seed=8), target_false_reject=0.005)
    assert any("needs at least 600" in w for w in calibration.warnings)
    assert not thresholds.calibrate(parts(100, seed=8), target_false_reject=0.05).warnings


def _reference_set(model, metric="minkowski"):
    return ReferenceSet(
        model=model,
        metric=metric,
        thresholds={n: 1.0 for n in model.scores},
        product="A",
        model_sha256="ab" * 32,
        n_good=60,
    )


def test_kissme_sets_get_a_new_format_and_older_sets_still_load_and_roll_back(tmp_path):
    root = tmp_path / "A"
    old = thresholds.calibrate(parts(60, seed=9)).model
    learned = thresholds.calibrate_held_out(parts(60, seed=9), parts(20, seed=10, shift=3.0)).model
    reference_set.save(root, _reference_set(old))
    reference_set.save(root, _reference_set(learned, "kissme"))
    formats = [yaml.safe_load((root / v / "reference.yaml").read_text())["format"] for v in ("v0001", "v0002")]
    assert formats == [reference_set.FORMAT, reference_set.FORMAT_KISSME]
    with np.load(root / "v0001" / "arrays.npz") as arrays:
        assert "kissme" not in arrays.files  # an older station reads version 1 as before
    current = reference_set.load(root)
    assert current.metric == "kissme" and np.allclose(current.model.kissme, learned.kissme)
    assert reference_set.rollback(root) == 1
    rolled = reference_set.load(root)
    assert rolled.model.kissme is None and "kissme" not in distances(parts(2), rolled.model)
    with pytest.raises(reference_set.ReferenceSetError, match="unknown metric"):
        reference_set.save(root, _reference_set(old, "kissme"))


def test_the_camera_default_count_supports_the_default_target():
    assert thresholds.DEFAULT_CAMERA_COUNT == thresholds.goods_needed(thresholds.DEFAULT_TARGET_FALSE_REJECT) == 600
    assert (
        thresholds.too_few_goods_warning(thresholds.DEFAULT_CAMERA_COUNT, thresholds.DEFAULT_TARGET_FALSE_REJECT)
        is None
    )


def test_the_shipped_demo_reference_set_written_before_kissme_still_loads(tmp_path):
    import shutil

    from station.tools.demo import DEMO_REFERENCE

    loaded = reference_set.load(DEMO_REFERENCE)
    assert loaded.model.kissme is None and set(loaded.thresholds) == set(SCORES)
    copy = tmp_path / "demo"
    shutil.copytree(DEMO_REFERENCE, copy)
    learned = thresholds.calibrate_held_out(
        parts(60, d=loaded.embedding_dim, seed=1), parts(20, d=loaded.embedding_dim, seed=2, shift=3.0)
    ).model
    reference_set.save(copy, _reference_set(learned, "kissme"))
    assert reference_set.rollback(copy) == 1
    np.testing.assert_array_equal(reference_set.load(copy).model.reference, loaded.model.reference)


def test_infinite_scores_count_as_highest_and_never_crash_the_cut():
    good = np.array([0.10, 0.12, 0.15, 0.11])
    threshold, _ = thresholds.cost_threshold(good, np.array([np.inf, np.inf, np.nan]), 0.05, 20)
    assert threshold > good.max()  # every defect is above any finite cut
    threshold, _ = thresholds.cost_threshold(good, np.array([np.inf, 0.5, 0.6]), 0.05, 20)
    assert good.max() < threshold < 0.5


def test_defects_that_score_among_the_good_parts_do_not_drag_the_cut_into_the_good_tail():
    # 82 good parts and 11 defects the metric sees, as on a small threshold slice; then 3 defects that
    # score like good parts (no threshold catches them). With each class's kernel as wide as its own
    # spread, those 3 made the defect kernel several times the goods' and smeared them into the cut.
    rng = np.random.default_rng(3)
    good = rng.lognormal(np.log(0.1), 0.25, 82)
    seen = rng.lognormal(np.log(0.3), 0.4, 11)
    hidden = np.quantile(good, [0.55, 0.6, 0.8])
    alone, _ = thresholds.cost_threshold(good, seen, 0.05, 20)
    mixed, _ = thresholds.cost_threshold(good, np.concatenate([seen, hidden]), 0.05, 20)
    new_good = rng.lognormal(np.log(0.1), 0.25, 20000)
    # (each class on its own spread: 3.5 % -> 5.1 % of new good parts rejected; the goods' spread: 3.2 % -> 2.8 %)
    assert np.mean(new_good > mixed) <= np.mean(new_good > alone) + 0.005
    # Both kernels take the good parts' spread; the smaller class's kernel is wider (Silverman's n ** -0.2).
    g, d = np.log(good), np.log(np.concatenate([seen, hidden]))
    width_g, width_d = cost_rule.class_widths(g, d)
    assert width_d / width_g == pytest.approx((82 / 14) ** 0.2)
    # fit.json records the widths the cut was smoothed with, per metric.
    summary = thresholds.cost_fit(good, np.concatenate([seen, hidden]), 0.05, 20).summary()
    assert summary["kernel_widths_log"] == {
        "good": pytest.approx(width_g, abs=1e-6),
        "defect": pytest.approx(width_d, abs=1e-6),
    }
