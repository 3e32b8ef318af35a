import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml

from calibration import thresholds
from station.core import reference_set
from station.core.reference_set import ReferenceSet, ReferenceSetError
from station.cli import main
from station.core.embedder import Embedder
from station.core.errors import ConfigError
from station.core.scoring import SCORES, score
from tests.onnx_models import projection_model


def gaussian_parts(n, d=16, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    parts = rng.normal(1.0, 0.2, (n, d))
    parts[:, :2] += shift  # a partial defect: two dimensions off
    return parts


# -- fitting -----------------------------------------------------------------


def test_auroc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(3)
    good = np.round(rng.normal(0, 1, 60), 1)
    bad = np.round(rng.normal(1, 1, 40), 1)
    pairwise = np.mean([(b > g) + 0.5 * (b == g) for g in good for b in bad])
    assert thresholds.auroc(good, bad) == pytest.approx(pairwise, abs=1e-12)
    assert thresholds.auroc(good, np.array([np.nan])) == 1.0  # a NaN score is NG


def correlated_parts(n, d, seed, mixing_seed=1):
    """Embedding-like parts: positive mean, strongly correlated dimensions."""
    mixing = np.random.default_rng(mixing_seed).normal(size=(d, d)) * np.linspace(0.05, 1, d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mixing + 20.0


@pytest.mark.parametrize("metric", SCORES)
def test_out_of_fold_threshold_holds_on_new_good_parts(metric):
    train, fresh = correlated_parts(60, 64, seed=1), correlated_parts(4000, 64, seed=2)
    calibration = thresholds.calibrate(train, target_false_reject=0.05, metric=metric)
    fresh_false_reject = np.mean(score(fresh, calibration.model, metric) > calibration.threshold)
    assert fresh_false_reject < 0.12  # target 5 %, estimated from 60 parts


def test_an_in_sample_mahalanobis_threshold_would_reject_most_new_good_parts():
    """Why thresholds are estimated out of fold: the known failure, measured."""
    train, fresh = correlated_parts(30, 128, seed=1), correlated_parts(4000, 128, seed=2)
    calibration = thresholds.calibrate(train, target_false_reject=0.05, metric="mahalanobis")
    in_sample_threshold = np.quantile(score(train, calibration.model, "mahalanobis"), 0.95)
    fresh_scores = score(fresh, calibration.model, "mahalanobis")
    assert np.mean(fresh_scores > in_sample_threshold) > 0.5
    assert np.mean(fresh_scores > calibration.threshold) < 0.1


def test_auto_picks_the_metric_with_the_best_auroc_and_reports_escapes():
    good, defects = gaussian_parts(200, seed=4), gaussian_parts(60, seed=5, shift=1.5)
    calibration = thresholds.calibrate(good, defects, metric="auto")
    aurocs = {name: f.auroc for name, f in calibration.fits.items()}
    assert calibration.metric == max(aurocs, key=aurocs.get)
    assert aurocs[calibration.metric] > 0.95
    chosen = calibration.fits[calibration.metric]
    assert chosen.escape_rate == pytest.approx(np.mean(chosen.defect_scores <= chosen.threshold))
    assert thresholds.calibrate(good, metric="auto").metric == "mahalanobis"  # no defects: the default


def test_too_few_parts_and_bad_targets_are_refused():
    with pytest.raises(thresholds.CalibrationError, match="too few"):
        thresholds.calibrate(gaussian_parts(5))
    with pytest.raises(thresholds.CalibrationError, match="between 0 and 0.5"):
        thresholds.calibrate(gaussian_parts(40), target_false_reject=0.7)


def test_a_threshold_that_flags_most_good_parts_is_refused():
    scores = np.array([np.inf] * 8 + [1.0, 2.0])  # most good parts score not-finite
    refused = thresholds.fit_metric(scores, None, 0.005)
    assert refused.problem and "not-finite" in refused.problem
    usable = thresholds.fit_metric(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), None, 0.4)  # 0.6 quantile of 5 parts: 4
    assert usable.problem is None and usable.threshold == 4.0 and usable.false_reject_rate == 0.2
    away = np.vstack([correlated_parts(40, 8, seed=3), -correlated_parts(40, 8, seed=4)])
    with pytest.raises(thresholds.CalibrationError, match="soart3: .*refusing this threshold"):
        thresholds.calibrate(away, metric="soart3")


# -- reference sets on disk --------------------------------------------------


def make_reference_set(seed=0, d=16, product="A", model_sha="ab" * 32) -> ReferenceSet:
    calibration = thresholds.calibrate(gaussian_parts(60, d, seed=seed), metric="minkowski")
    return ReferenceSet(
        model=calibration.model,
        metric=calibration.metric,
        thresholds={n: f.threshold for n, f in calibration.fits.items()},
        product=product,
        model_sha256=model_sha,
        n_good=60,
        statistics={"seed": seed},
    )


def test_save_load_round_trip_keeps_versions_and_rolls_back(tmp_path):
    root = tmp_path / "refs" / "A"
    first = reference_set.save(root, make_reference_set(seed=1))
    second = reference_set.save(root, make_reference_set(seed=2))
    assert (first.version, second.version) == (1, 2)
    assert (root / "v0001").stat().st_mode & 0o777 == 0o777 & ~reference_set._umask()  # not mkdtemp's 0700
    loaded = reference_set.load(root)
    assert loaded.version == 2
    np.testing.assert_array_equal(loaded.model.reference, second.model.reference)
    assert loaded.thresholds == second.thresholds and loaded.metric == "minkowski"
    summary = yaml.safe_load((root / "v0002" / "reference.yaml").read_text())
    assert summary["product"] == "A" and summary["n_good"] == 60 and set(summary["thresholds"]) == set(SCORES)
    assert reference_set.rollback(root) == 1
    np.testing.assert_array_equal(reference_set.load(root).model.reference, first.model.reference)
    assert reference_set.rollback(root, 2) == 2
    with pytest.raises(ReferenceSetError, match="no version before"):
        reference_set.rollback(root, 1) and reference_set.rollback(root)


def test_hand_edits_and_corruption_are_detected(tmp_path):
    root = tmp_path / "A"
    reference_set.save(root, make_reference_set())
    summary_path = root / "v0001" / "reference.yaml"
    original = summary_path.read_text()
    summary_path.write_text(original.replace("metric: minkowski", "metric: soart3"))
    with pytest.raises(ReferenceSetError, match="checksum mismatch"):
        reference_set.load(root)
    summary_path.write_text(original)
    arrays = root / "v0001" / "arrays.npz"
    data = bytearray(arrays.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrays.write_bytes(bytes(data))
    with pytest.raises(ReferenceSetError, match="arrays.npz: checksum mismatch"):
        reference_set.load(root)
    with pytest.raises(ReferenceSetError, match="not a reference set"):
        reference_set.load(tmp_path / "nothing")


def test_an_interrupted_write_leaves_the_previous_set_current_and_intact(tmp_path, monkeypatch):
    root = tmp_path / "A"
    first = reference_set.save(root, make_reference_set(seed=1))
    real_write = reference_set._write_synced
    calls = []

    def disk_full_on_second_file(path, content):
        calls.append(path)
        if len(calls) == 2:
            real_write(path, content[: len(content) // 2])
            raise OSError(28, "No space left on device")
        real_write(path, content)

    monkeypatch.setattr(reference_set, "_write_synced", disk_full_on_second_file)
    with pytest.raises(ConfigError, match=f"{root}: cannot write a reference set there .No space"):
        reference_set.save(root, make_reference_set(seed=2))
    monkeypatch.undo()
    loaded = reference_set.load(root)
    assert loaded.version == 1
    np.testing.assert_array_equal(loaded.model.reference, first.model.reference)
    # no staging left behind (the writers' lock file stays: removing an flock file races a waiting writer)
    assert sorted(p.name for p in root.iterdir()) == [".writing.lock", "CURRENT", "v0001"]


def test_a_writer_killed_at_random_moments_never_leaves_a_broken_current_set(tmp_path):
    root = tmp_path / "A"
    reference_set.save(root, make_reference_set(seed=0))
    writer = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(os.getcwd())!r})
        from tests.test_calibration import make_reference_set
        from station.core import reference_set
        i = 0
        while True:
            i += 1
            reference_set.save({str(root)!r}, make_reference_set(seed=i))
    """)
    rng = np.random.default_rng(0)
    for _ in range(4):
        before = len(reference_set.versions(root))
        process = subprocess.Popen([sys.executable, "-c", writer])
        deadline = time.monotonic() + 30
        # Kill only once this writer is saving, at a random moment within its next saves.
        while len(reference_set.versions(root)) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        loaded = reference_set.load(root)  # verifies checksums
        assert loaded.version in reference_set.versions(root)
        assert loaded.model.reference.shape == (16,)
    assert len(reference_set.versions(root)) >= 5  # every writer made progress before it was killed


def test_a_reference_set_for_another_model_is_refused(tmp_path):
    ref = make_reference_set(d=16)
    reference_set.verify_for_model(ref, "ab" * 32, 16)
    with pytest.raises(ReferenceSetError, match="16-d embeddings, the model gives 32-d"):
        reference_set.verify_for_model(ref, "ab" * 32, 32)
    with pytest.raises(ReferenceSetError, match="calibrated for model abababababab"):
        reference_set.verify_for_model(ref, "cd" * 32, 16)


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "", ".hidden", "a\\b", "x" * 80])
def test_product_names_that_could_escape_the_folder_are_refused(tmp_path, name):
    with pytest.raises(ReferenceSetError, match="not allowed"):
        reference_set.save(tmp_path / "refs", make_reference_set(product=name))


# -- the commands, end to end ------------------------------------------------


@pytest.fixture(scope="module")
def projection(tmp_path_factory):
    return projection_model(tmp_path_factory.mktemp("model") / "model.onnx", embedding_dim=32)


def _defect_dirs(dataset):
    return [str(p) for p in sorted(dataset.iterdir()) if p.is_dir() and p.name != "good"]


def test_calibrate_then_evaluate_from_the_command_line(tmp_path, sim_dataset, projection, capsys):
    out = tmp_path / "refs" / "A"
    args = ["calibrate", "--model", str(projection), "--good", str(sim_dataset / "good"), "--out", str(out)]
    for folder in _defect_dirs(sim_dataset):
        args += ["--defects", folder]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "AUROC" in printed and "<- chosen" in printed
    saved = reference_set.load(out)
    assert saved.product == "A" and saved.n_good == len(list((sim_dataset / "good").iterdir()))
    assert saved.model_sha256 == Embedder(projection).info.sha256
    assert (out / "v0001" / "report" / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "v0001" / "report" / "roc.png").exists()

    report = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(projection),
                "--reference",
                str(out),
                "--data",
                str(sim_dataset),
                "--json",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    figures = json.loads(capsys.readouterr().out)
    for key in (
        "auroc",
        "accuracy",
        "false_reject_rate",
        "escape_rate",
        "n_good",
        "n_defect",
        "confusion",
        "per_metric_auroc",
    ):
        assert key in figures
    assert figures["n_good"] + figures["n_defect"] == 240
    assert sum(figures["confusion"].values()) == 240
    assert figures["auroc"] > 0.5  # a random projection still sees some defects
    for name in ("histogram.png", "roc.png", "worst_parts.png"):
        assert (report / name).read_bytes()[:4] == b"\x89PNG"


def test_calibrate_names_unreadable_images_and_empty_folders(tmp_path, sim_dataset, projection, capsys):
    good = tmp_path / "good"
    good.mkdir()
    for path in sorted((sim_dataset / "good").iterdir())[:40]:
        (good / path.name).write_bytes(path.read_bytes())
    (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code = main(["calibrate", "--model", str(projection), "--good", str(good), "--out", str(tmp_path / "r")])
    assert code == 65 and "broken.png: cannot be decoded as an image" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["calibrate", "--model", str(projection), "--good", str(empty), "--out", str(tmp_path / "r")]) == 65
    assert "no images of good parts" in capsys.readouterr().err
    (good / "broken.png").unlink()
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(projection),
                "--good",
                str(good),
                "--out",
                str(tmp_path / "r"),
                "--min-good",
                "50",
            ]
        )
        == 65
    )
    assert "40 good parts are too few" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or reference_set.versions(tmp_path / "r") == []


def test_evaluate_refuses_a_reference_set_of_another_model(tmp_path, sim_dataset, projection, capsys):
    other = projection_model(tmp_path / "other.onnx", seed=9, embedding_dim=32)
    out = tmp_path / "A"
    assert main(["calibrate", "--model", str(projection), "--good", str(sim_dataset / "good"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(other), "--reference", str(out), "--data", str(sim_dataset)]) == 65
    assert "recalibrate" in capsys.readouterr().err


def test_rollback_from_the_command_line(tmp_path, sim_dataset, projection, capsys):
    out = tmp_path / "A"
    base = ["calibrate", "--model", str(projection), "--good", str(sim_dataset / "good"), "--out", str(out)]
    assert main(base) == 0 and main(base + ["--metric", "soart3"]) == 0
    assert reference_set.load(out).metric == "soart3"
    assert main(["calibrate", "--out", str(out), "--rollback"]) == 0
    assert reference_set.load(out).version == 1
    assert "v0001 is current again" in capsys.readouterr().out


def test_calibrate_refuses_an_out_it_cannot_write_by_name(tmp_path, sim_dataset, projection, capsys, monkeypatch):
    """--out under a file, or a disk that fills while the set is written: exit 78 naming the folder, the
    current version untouched (both ended in an OSError traceback)."""
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "A"):
        assert (
            main(
                [
                    "calibrate",
                    "--model",
                    str(projection),
                    "--good",
                    str(sim_dataset / "good"),
                    "--out",
                    str(out),
                    "--product",
                    "A",
                ]
            )
            == 78
        )
        err = capsys.readouterr().err
        assert (
            err.startswith(f"station calibrate: {out}: cannot write a reference set there") and "Traceback" not in err
        )
    out = tmp_path / "A"
    base = ["calibrate", "--model", str(projection), "--good", str(sim_dataset / "good"), "--out", str(out)]
    assert main(base) == 0

    def full(path, content):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reference_set, "_write_synced", full)
    assert main(base) == 78
    assert "No space left on device" in capsys.readouterr().err
    assert reference_set.versions(out) == [1] and reference_set.load(out).version == 1
    assert not list(out.glob(".staging-*"))


def test_calibrate_refuses_good_parts_given_as_defects_and_a_dataset_root_as_good(
    tmp_path, sim_dataset, projection, capsys
):
    """--defects DIR (the whole dataset) counted DIR/good's parts as defects; --good DIR counted every defect
    as a good part: both calibrated without a word. Refused, exit 65, saying which folders to give."""
    good = str(sim_dataset / "good")
    base = ["calibrate", "--model", str(projection), "--out", str(tmp_path / "A")]
    assert main(base + ["--good", good, "--defects", str(sim_dataset)]) == 65
    err = capsys.readouterr().err
    assert f"--defects {sim_dataset} holds" in err and "would count as defects" in err
    assert f"--defects {sim_dataset / 'CLASS'}" in err
    assert main(base + ["--good", good, "--defects", good]) == 65
    assert "would count as defects" in capsys.readouterr().err
    assert main(base + ["--good", str(sim_dataset)]) == 65
    assert f"give --good {sim_dataset / 'good'}" in capsys.readouterr().err
    assert not (tmp_path / "A").exists()


def test_evaluate_refuses_a_report_folder_it_cannot_make_before_judging(tmp_path, sim_dataset, projection, capsys):
    """--report under a file ended in a NotADirectoryError traceback after every part was judged."""
    out = tmp_path / "A"
    assert main(["calibrate", "--model", str(projection), "--good", str(sim_dataset / "good"), "--out", str(out)]) == 0
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    report = tmp_path / "afile" / "report"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(projection),
                "--reference",
                str(out),
                "--data",
                str(sim_dataset),
                "--report",
                str(report),
            ]
        )
        == 78
    )
    err = capsys.readouterr().err
    assert err.startswith(f"station evaluate: --report {report}: cannot make that folder") and "Traceback" not in err


def test_a_near_miss_for_a_reference_set_says_which_folder_was_meant(tmp_path):
    """A fit bundle or a version folder given as --reference (or reference: in station.yaml)."""
    reference_set.save(tmp_path / "bundle" / "reference", make_reference_set(seed=1))
    with pytest.raises(ReferenceSetError, match="a station fit bundle. its reference set is .*bundle/reference$"):
        reference_set.load(tmp_path / "bundle")
    with pytest.raises(
        ReferenceSetError, match="v0001 is one version of the reference set .*bundle/reference: give that"
    ):
        reference_set.load(tmp_path / "bundle" / "reference" / "v0001")
    with pytest.raises(ReferenceSetError, match=r"no readable CURRENT: No such file or directory\)$"):
        reference_set.load(tmp_path / "elsewhere")


def test_the_worst_parts_sheet_stays_a_picture_whatever_the_photo_size():
    """24 photos of 2000x1500 enlarged 4x made a 203 MB worst_parts.png of 1.2 gigapixels (OpenCV itself
    refuses to open it) and took gigabytes to draw; crops are still enlarged 4x, pixel for pixel."""
    import cv2

    from calibration.report import MAX_TILE_SIDE, native_sheet

    large = [np.full((1500, 2000, 3), 40 + i, np.uint8) for i in range(24)]
    sheet = cv2.imdecode(np.frombuffer(native_sheet(large, ["good 1.0\nx.jpg"] * 24), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert sheet.shape[0] <= 4 * (MAX_TILE_SIDE + 40) and sheet.shape[1] <= 6 * (MAX_TILE_SIDE + 6)
    crop = np.arange(36 * 26, dtype=np.uint8).reshape(26, 36)
    small = cv2.imdecode(np.frombuffer(native_sheet([crop], ["good"]), np.uint8), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(small[3 : 3 + 104, 3 : 3 + 144], np.kron(crop, np.ones((4, 4), np.uint8)))
