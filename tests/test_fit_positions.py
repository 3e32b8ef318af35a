"""The frozen per-position model as a `station fit` candidate (fit/positions.py): real files, the
exported graph in onnxruntime, small simulated folders."""

import numpy as np
import pytest

from calibration.thresholds import auroc
from calibration.positions import fit_position_model
from fit import pipeline
from fit.candidates import Candidate, SearchOptions, run_candidates
from fit.pipeline import FitOptions, run_fit
from station.core import reference_set
from station.core.embedder import Embedder
from station.core.imagefolder import scan_dataset
from station.core.scoring import position_scores
from station.tools.simulate import write_dataset

S8 = Candidate("positions", "frozen-s8", 0, (36, 26))


def test_its_calibration_figures_are_out_of_fold_and_comparable_with_the_trained_ones(sim_dataset, tmp_path):
    items = scan_dataset(sim_dataset)
    search = run_candidates([S8], items[::2], [], items[1::2], tmp_path, SearchOptions(say=lambda line: None))
    (outcome,) = search.outcomes
    assert outcome.error is None and outcome.metric == "position" and 0 < outcome.ms_per_part < 10
    calibration = [item for item in items[1::2]]
    goods = [item for item in calibration if not item.is_defect]
    assert outcome.n_good == len(goods) == len(outcome.good_scores)
    assert outcome.n_defect == sum(item.is_defect for item in calibration) == len(outcome.defect_scores)
    assert outcome.auroc == auroc(outcome.good_scores, outcome.defect_scores) > 0.9  # visible simulated defects
    # Out of fold: each good part scored by Gaussians fitted without it scores higher than in sample.
    embedder = Embedder(tmp_path / "c0.onnx")
    from calibration.workflow import embed_items

    good = embed_items(embedder, goods).embeddings
    in_sample = position_scores(good, fit_position_model(good, embedder.info.positions)[0]).score
    assert np.all(outcome.good_scores > in_sample)
    assert search.chosen is outcome and outcome.row()["ms_per_part"] > 0


def test_without_defects_it_is_held_to_the_false_reject_target_and_over_the_time_limit_it_is_refused(
    sim_dataset, tmp_path
):
    goods = [item for item in scan_dataset(sim_dataset) if not item.is_defect]
    search = run_candidates([S8], goods[::2], [], goods[1::2], tmp_path, SearchOptions(say=lambda line: None))
    (outcome,) = search.outcomes
    assert outcome.defect_scores is None and outcome.auroc is None and 0 <= outcome.false_reject_rate < 0.2
    large = Candidate("positions", "frozen-s8", 0, (128, 128))  # ~1.3 ms a part; one mlp trunk ~0.05 ms
    over = run_candidates(
        [large, Candidate("mlp", "center")],
        goods[::2],
        [],
        goods[1::2],
        tmp_path / "over",
        SearchOptions(epochs=1, members=1, max_ms_per_part=0.5, say=lambda line: None),
    )
    assert over.outcomes[0].over_limit and "--max-ms-per-part 0.5" in over.outcomes[0].error
    assert over.chosen.candidate.arch == "mlp"


@pytest.fixture(scope="module")
def positions_bundle(tmp_path_factory):
    base = tmp_path_factory.mktemp("fit-positions")
    write_dataset(base / "parts", 150, 3)
    listed = []

    def only_positions(native):
        listed.append(native)
        return [S8, Candidate("positions", "frozen-s16", 0, (36, 26))]

    patch = pytest.MonkeyPatch()
    patch.setattr(pipeline, "candidate_list", only_positions)
    try:
        result = run_fit(FitOptions(data=base / "parts", out=base / "bundle", seed=4, say=lambda line: None))
    finally:
        patch.undo()
    return base / "parts", base / "bundle", result


def test_chosen_it_makes_a_complete_bundle_with_a_format_3_reference_set(positions_bundle):
    data, out, result = positions_bundle
    assert result["chosen_candidate"].startswith("positions/")
    for name in ("model.onnx", "model.export.json", "station.yaml", "fit.json"):
        assert (out / name).is_file(), name
    assert not (out / "trunk.pt").exists() and result["bundle"]["checkpoint"] is None
    assert {p.name for p in (out / "report").iterdir()} == {"roc.png", "histogram.png", "worst_parts.png"}
    embedder = Embedder(out / "model.onnx")
    ref = reference_set.load(out / "reference")
    reference_set.verify_for_model(ref, embedder.info.sha256, embedder.info.embedding_dim)
    assert ref.version == result["bundle"]["reference_version"] and ref.metric == result["metric"] == "position"
    assert (
        reference_set.FORMAT_POSITIONS
        in (out / "reference").joinpath(f"v{ref.version:04d}", "reference.yaml").read_text()
    )
    rows = result["candidates"]
    assert [r["arch"] for r in rows] == ["positions", "positions"] and all(r["ms_per_part"] > 0 for r in rows)
    assert result["export"]["mode"] == "fp32" and result["n_trained"] == 0
    assert result["budget"]["added_members"] == 0  # nothing trains: nothing to add


def test_its_test_figures_come_from_parts_that_neither_fitted_its_gaussians_nor_its_threshold(positions_bundle):
    data, out, result = positions_bundle
    files = result["split"]["files"]
    test = sorted(path for path, part in files.items() if part == "test")
    audit_slice = set(result["split"]["threshold_slices"]["audit_model"])
    assert audit_slice and not audit_slice & set(test)
    assert set(result["split"]["threshold_slices"]["bundle_model"]) == set(files)  # nothing trained: every photo
    assert result["n_good"] + result["n_defect"] == len(test)
    # Nothing trains, so each model's Gaussians are fitted on every good part of its pool: the audit
    # model's on the train and calibration parts' (never the test part's), the bundle's on all of them.
    goods = [path for path in files if path.startswith("good/")]
    assert result["audit_model"]["n_threshold_good"] == sum(files[p] != "test" for p in goods)
    assert reference_set.load(out / "reference").n_good == len(goods)
    assert 0.9 < result["auroc"] <= 1.0 and result["escape_rate"] is not None
