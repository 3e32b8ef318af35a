"""`station fit` end to end on small simulated folders: real files, torch, onnxruntime."""

import json
import os
import shutil

import cv2
import numpy as np
import pytest

from calibration import thresholds as calibration_fit
from fit import bundle
from fit.data_check import check_data, difference_hash, near_duplicate_groups
from fit.pipeline import FitOptions, run_fit
from fit.split import split_parts
from export.trunk import load_checkpoint
from station.cli import main
from station.core import reference_set
from station.core.embedder import Embedder
from station.core.errors import DataError, ExportGateError
from station.core.imagefolder import GOOD, image_digest, read_image
from station.runtime.config.station import parse_config
from station.tools.simulate import write_dataset

TOP_KEYS = {
    "auroc",
    "escape_rate",
    "escape_rate_ci",
    "false_reject_rate",
    "false_reject_rate_ci",
    "n_good",
    "n_defect",
    "warnings",
    "chosen_candidate",
    "candidates",
    "escapes_by_class",
    "split",
    "data",
    "export",
}
QUICK = {"epochs": 2, "max_candidates": 1}


def simulated(root, count=150, seed=3):
    write_dataset(root, count, seed)
    return root


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    base = tmp_path_factory.mktemp("fit")
    data = simulated(base / "parts")
    result = run_fit(FitOptions(data=data, out=base / "bundle", seed=4, say=lambda line: None, **QUICK))
    return data, base / "bundle", result


def test_the_bundle_is_complete_and_fit_json_holds_the_test_figures(fitted):
    data, out, result = fitted
    for name in ("model.onnx", "model.export.json", "trunk.pt", "station.yaml", "fit.json"):
        assert (out / name).is_file(), name
    assert {p.name for p in (out / "report").iterdir()} == {"roc.png", "histogram.png", "worst_parts.png"}
    on_disk = json.loads((out / "fit.json").read_text())
    assert TOP_KEYS <= set(on_disk) and on_disk["split"]["seed"] == 4
    assert len(on_disk["data"]["fingerprint"]) == 64 and not list(out.glob(".fit-*"))
    # Every figure from the test part only.
    files = on_disk["split"]["files"]
    test_files = [path for path, part in files.items() if part == "test"]
    assert len(files) == 150 and on_disk["n_good"] + on_disk["n_defect"] == len(test_files)
    assert on_disk["n_defect"] > 0 and 0 <= on_disk["escape_rate"] <= 1
    low, high = on_disk["escape_rate_ci"]
    assert low <= on_disk["escape_rate"] <= high
    assert on_disk["export"]["mode"] in ("int8-dynamic", "int8-static", "fp32") and on_disk["export"]["why"]
    # The reference set belongs to the exported model.
    ref = reference_set.load(out / "reference")
    reference_set.verify_for_model(ref, Embedder(out / "model.onnx").info.sha256, ref.embedding_dim)
    assert ref.metric == on_disk["metric"]


def test_cross_fitting_the_audit_model_never_saw_the_test_part_the_bundle_never_trained_on_its_threshold_parts(fitted):
    """fit.json's figures come from the audit model, which neither trained on nor was thresholded with the
    test part; the bundle's model trains on every photo but its own threshold slice, which sets its threshold."""
    data, out, _ = fitted
    on_disk = json.loads((out / "fit.json").read_text())
    split = on_disk["split"]
    test = {path for path, part in split["files"].items() if part == "test"}
    audit_slice, bundle_slice = (set(split["threshold_slices"][k]) for k in ("audit_model", "bundle_model"))
    assert audit_slice and not audit_slice & test
    bundle_trained = set(load_checkpoint(out / "trunk.pt")[1]["trained_on"])
    digest = {path: image_digest(data / path) for path in split["files"]}
    assert not {digest[p] for p in bundle_slice} & bundle_trained  # the threshold comes from unseen parts
    # The bundle's model learnt from every photo but its slice (the test part too, where the slice leaves it).
    assert {digest[p] for p in split["files"] if p not in bundle_slice} == bundle_trained
    assert len(bundle_trained) == on_disk["n_trained"] > on_disk["audit_model"]["n_trained"]
    assert reference_set.load(out / "reference").n_good == sum(1 for p in bundle_slice if p.startswith("good/"))


def test_station_yaml_parses_once_camera_and_roi_are_filled(fitted):
    _, out, _ = fitted
    text = (out / "station.yaml").read_text()
    with pytest.raises(Exception, match="camera"):
        parse_config(text, base=out)  # the placeholders are comments until someone fills them in
    filled = text.replace("# camera:", "camera:").replace("#   source: /dev/video0", "  source: 0")
    filled = filled.replace("# roi:", "roi:")
    config = parse_config(filled, base=out)
    forms = json.loads((out / "fit.json").read_text())["forms"]
    assert config.for_form(None if list(forms) == ["fp32"] else "fp32").model == out / "model.onnx"
    assert config.for_form(None if list(forms) == ["fp32"] else "fp32").reference_for()[1] == out / "reference"
    assert sorted(config.model_paths) == (sorted(forms) if len(forms) > 1 else [None])
    assert config.model_form == "auto" and config.roi.width == 36 and config.roi.height == 26


def test_the_bundle_carries_each_form_that_passed_with_its_own_reference_set_from_the_same_slice(fitted):
    """fp32 always, int8 when a mode passed its gate; each form's reference set is bound to its own model and
    calibrated on the same threshold slice; a form whose gate refused is not in the bundle."""
    _, out, result = fitted
    forms = result["forms"]
    assert "fp32" in forms and forms["fp32"]["export_mode"] == "fp32"
    passed_int8 = [a for a in result["export"]["attempts"] if a["passed"] and a["mode"].startswith("int8")]
    assert ("int8" in forms) == (result["export"]["mode"].startswith("int8"))
    slices = set()
    for form, item in forms.items():
        model, ref = out / item["model"], reference_set.load(out / item["reference"])
        reference_set.verify_for_model(ref, Embedder(model).info.sha256, ref.embedding_dim)
        assert Embedder(model).info.quantization == item["export_mode"] and ref.statistics["model_form"] == form
        assert set(item["test"]) == {"auroc", "escape_rate", "false_reject_rate"}
        slices.add(ref.n_good)
    assert len(slices) == 1  # the same good parts set each form's threshold
    if "int8" in forms:
        assert passed_int8 and (out / "model.int8.export.json").is_file()
        assert Embedder(out / "model.int8.onnx").info.sha256 != Embedder(out / "model.onnx").info.sha256
    else:
        assert not (out / "model.int8.onnx").exists() and not (out / "reference.int8").exists()


def test_the_conv_backbone_tries_static_int8_first_and_a_refused_int8_leaves_fp32_alone(tmp_path, monkeypatch):
    from export import onnx_export

    calls = []

    def gate(checkpoint, out, options):
        calls.append("fp32" if options.fp32 else options.int8)
        if not options.fp32:
            onnx_export.report_path(out).write_text(json.dumps({"failures": [f"{options.int8} drifted"]}))
            raise ExportGateError("refused")
        return {"quantization": "fp32"}

    monkeypatch.setattr(onnx_export, "export_model", gate)
    said = []
    exports = bundle.export_forms(tmp_path / "t.pt", tmp_path, tmp_path, "lite0", say=said.append)
    assert list(exports) == ["fp32"] and calls == ["fp32", "static", "dynamic"]
    assert any("no int8 form" in line for line in said)
    calls.clear()
    for arch in ("cnn", "mlp"):  # the small from-scratch trunks: dynamic first
        calls.clear()
        bundle.export_forms(tmp_path / "t.pt", tmp_path, tmp_path, arch, say=said.append)
        assert calls == ["fp32", "dynamic", "static"]


def test_duplicates_across_classes_are_refused_naming_both_files(tmp_path):
    data = simulated(tmp_path / "parts", count=80)
    good = sorted((data / GOOD).iterdir())[0]
    defect_dir = next(p for p in sorted(data.iterdir()) if p.name != GOOD)
    copy = defect_dir / "copied.png"
    shutil.copyfile(good, copy)
    with pytest.raises(DataError) as caught:
        check_data(data)
    assert str(good) in str(caught.value) and str(copy) in str(caught.value)


def test_near_duplicates_share_a_group_and_one_side_of_the_split(tmp_path):
    data = simulated(tmp_path / "parts", count=120)
    originals = sorted((data / GOOD).iterdir())[:6]
    for path in originals:  # the same part shot again: one grey level brighter, a little noise
        image = read_image(path).astype(np.int16) + 1
        image[::7, ::5] += 2
        cv2.imwrite(str(path.with_name("again_" + path.name)), np.clip(image, 0, 255).astype(np.uint8))
    check = check_data(data)
    index = {item.path: i for i, item in enumerate(check.items)}
    pairs = [(index[p], index[p.with_name("again_" + p.name)]) for p in originals]
    assert all(check.groups[a] == check.groups[b] for a, b in pairs)
    assert any("near-duplicates" in w for w in check.warnings)
    for seed in range(5):
        parts = split_parts(check.items, check.groups, seed)
        assert all(parts[a] == parts[b] for a, b in pairs)
    hashes = [difference_hash(read_image(item.path)) for item in check.items]
    assert len(set(near_duplicate_groups(hashes, [str(i) for i in range(len(hashes))]))) < len(hashes)


def test_goods_only_data_fits_with_null_escape_figures(tmp_path):
    data = simulated(tmp_path / "parts")
    for folder in data.iterdir():
        if folder.name != GOOD:
            shutil.rmtree(folder)
    result = run_fit(FitOptions(data=data, out=tmp_path / "bundle", say=lambda line: None, **QUICK))
    assert result["n_defect"] == 0 and result["escape_rate"] is None and result["escape_rate_ci"] is None
    assert result["auroc"] is None and result["escapes_by_class"] == {}
    assert result["false_reject_rate_ci"] is not None
    assert any("needs at least 600" in w for w in result["warnings"])  # ~20 calibration goods for 0.5 %
    assert (tmp_path / "bundle" / "model.onnx").is_file()


def test_export_falls_back_and_says_why(tmp_path, monkeypatch):
    from export import onnx_export

    calls = []

    def gate(checkpoint, out, options):
        calls.append(options)
        if not options.fp32:
            onnx_export.report_path(out).write_text(json.dumps({"failures": [f"{options.int8} drifted"]}))
            raise ExportGateError("refused")
        return {"quantization": "fp32"}

    monkeypatch.setattr(onnx_export, "export_model", gate)
    choice = bundle.export_with_fallback(tmp_path / "t.pt", tmp_path / "m.onnx", tmp_path, say=lambda line: None)
    assert choice.mode == "fp32" and [c.int8 for c in calls[:2]] == ["dynamic", "static"]
    assert "dynamic drifted" in choice.why and "static drifted" in choice.why
    assert [a["passed"] for a in choice.attempts] == [False, False, True]


@pytest.mark.parametrize(
    "kind, said",
    [
        ("damaged", "cannot be decoded"),
        ("link to nothing", "which does not exist"),
        ("named pipe", "not a file but a named pipe"),
    ],
)
def test_station_fit_names_an_unreadable_image(tmp_path, capsys, kind, said):
    data = simulated(tmp_path / "parts", count=80)
    broken = data / GOOD / "broken.png"
    if kind == "damaged":
        broken.write_bytes(b"not a png")
    elif kind == "link to nothing":
        broken.symlink_to(tmp_path / "elsewhere.png")
    else:
        os.mkfifo(broken)  # a read would wait forever
    assert main(["fit", "--data", str(data), "--out", str(tmp_path / "bundle")]) == 65
    err = capsys.readouterr().err
    assert str(broken) in err and said in err, err
    assert not (tmp_path / "bundle" / "fit.json").exists()


def test_fit_refuses_to_overwrite_a_bundle_and_bad_options(fitted, capsys):
    data, out, _ = fitted
    assert main(["fit", "--data", str(data), "--out", str(out)]) == 78
    assert "already holds a fitted bundle" in capsys.readouterr().err
    assert main(["fit", "--data", str(data), "--out", str(out.parent / "x"), "--defect-rate", "1.5"]) == 78
    assert calibration_fit.goods_needed(0.005) == 600


def test_fit_refuses_an_out_it_cannot_or_should_not_write_before_training(tmp_path, capsys):
    """--out a file, under a file, a non-empty folder, the data folder or inside it: exit 78 naming it,
    nothing trained (a file or unwritable --out ended in a FileExistsError traceback)."""
    data = simulated(tmp_path / "parts", count=150)  # good parts enough for every threshold slice
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "station.yaml").write_text("station: mine\n")
    (tmp_path / "empty").mkdir()
    for out, said in (
        (tmp_path / "afile", "is a file"),
        (tmp_path / "afile" / "bundle", "cannot write there"),
        (tmp_path / "full", "already exists and is not empty"),
        (data, "lies inside --data"),
        (data / "bundle", "lies inside --data"),
    ):
        assert main(["fit", "--data", str(data), "--out", str(out)]) == 78, out
        err = capsys.readouterr().err
        assert err.startswith("station fit: ") and str(out.name) in err and said in err, err
        assert "Traceback" not in err
    assert (tmp_path / "full" / "station.yaml").read_text() == "station: mine\n" and not (data / "bundle").exists()
    assert FitOptions(data=data, out=tmp_path / "empty").check() is None  # an empty folder is fine


def test_tiny_defect_classes_and_too_few_goods_are_named_with_the_numbers_needed(tmp_path):
    data = simulated(tmp_path / "parts", count=80)
    small = next(p for p in sorted(data.iterdir()) if p.name != GOOD)
    for extra in sorted(small.iterdir())[3:]:
        extra.unlink()
    warnings = check_data(data).warnings
    assert any(repr(small.name) in w and "only 3 images" in w and "add at least 2 more" in w for w in warnings)
    for extra in sorted((data / GOOD).iterdir())[20:]:
        extra.unlink()
    with pytest.raises(DataError, match="only 20 good parts: fit needs at least 50.*add 30 more"):
        check_data(data)


def test_files_fit_passes_over_are_said_not_silently_dropped(tmp_path):
    """A class of .webp photos, an empty class folder, stray files and images beside the class folders:
    nothing fit reads, each named in a warning (a class must not vanish without a word)."""
    data = simulated(tmp_path / "parts", count=80)
    (data / "dent").mkdir()
    cv2.imwrite(str(data / "dent" / "a.webp"), np.full((26, 36), 90, np.uint8))
    (data / "empty").mkdir()
    (data / GOOD / "Thumbs.db").write_bytes(b"\0" * 64)
    cv2.imwrite(str(data / "loose.png"), np.full((26, 36), 90, np.uint8))
    (data / ".DS_Store").write_bytes(b"\0" * 8)  # hidden: never a part, not worth a word
    (data / "README.md").write_text("the dataset's own notes")  # beside the classes, not a photo: no word
    warnings = check_data(data).warnings
    assert f"class folder {data / 'dent'}/ holds no images: ignored" in warnings
    assert f"class folder {data / 'empty'}/ holds no images: ignored" in warnings
    unread = [w for w in warnings if "not read" in w]
    assert len(unread) == 1 and "3 file(s)" in unread[0] and ".webp 1" in unread[0] and ".png 1" in unread[0]
    assert ".db 1" in unread[0] and ".png .ppm .tif" in unread[0]


def test_a_small_dataset_gets_larger_threshold_slices_and_too_few_goods_are_refused_before_anything_trains(tmp_path):
    """60 good parts once passed the data check (50), trained for three minutes, then the audit model's 15 %
    threshold slice held 8 and calibration refused. Slices now take up to 40 % of a small pool, so 60 good parts
    give every slice its 10; the data check's floor (min_good) is what refuses fewer."""
    from fit.pipeline import THRESHOLD_GOODS, require_threshold_goods, threshold_fractions

    data = simulated(tmp_path / "parts", count=150)
    for extra in sorted((data / GOOD).iterdir())[60:]:
        extra.unlink()
    check = check_data(data)
    parts = split_parts(check.items, check.groups, 0)
    assert require_threshold_goods(check, parts, 0) is None
    assert threshold_fractions(check.items)["calibration"] == 0.4  # 60 good parts: the share's cap
    many = [type("Item", (), {"is_defect": False})() for _ in range(4 * THRESHOLD_GOODS)]
    assert threshold_fractions(many)["calibration"] == 0.25 and threshold_fractions(many * 3)["calibration"] == 0.15
    with pytest.raises(DataError, match=r"good"):
        check_data(data, min_good=80)


def test_good_parts_chained_into_one_near_duplicate_group_are_split_as_separate_parts(tmp_path):
    """A uniform product under a fixed camera: 200 good parts differing by sensor noise chain into one
    near-duplicate group. Kept whole it starved the split (151 of 200 in one part) or made fit refuse;
    a group that large is not one part photographed again: it is split as separate parts, said aloud."""
    from fit.pipeline import require_threshold_goods

    data = simulated(tmp_path / "parts", count=150)
    base = read_image(sorted((data / GOOD).iterdir())[0]).astype(float)
    shutil.rmtree(data / GOOD)
    (data / GOOD).mkdir()
    rng = np.random.default_rng(0)
    for i in range(200):
        noisy = base + rng.normal(0, 2, base.shape) + rng.normal(0, 1)
        cv2.imwrite(str(data / GOOD / f"g{i:03d}.png"), np.clip(noisy, 0, 255).astype(np.uint8))
    check = check_data(data)
    goods = [g for item, g in zip(check.items, check.groups) if not item.is_defect]
    assert max(np.bincount(goods)) <= 5  # no group larger than a part photographed a few times
    assert any(
        "of the 200 'good' images chained into one near-duplicate group" in w and "optimistic" in w
        for w in check.warnings
    )
    for seed in range(6):
        parts = split_parts(check.items, check.groups, seed)
        good_parts = [part for item, part in zip(check.items, parts) if not item.is_defect]
        assert 110 <= good_parts.count("train") <= 130 and good_parts.count("test") >= 35
        assert require_threshold_goods(check, parts, seed) is None


def test_a_part_photographed_a_few_times_stays_one_group():
    from fit.data_check import dissolve_chained_groups
    from station.core.imagefolder import LabeledImage

    items = [LabeledImage(tmp, "good") for tmp in (f"g{i}.png" for i in range(100))]
    groups = np.array([0, 0, 0] + [1] * 20 + list(range(2, 79)))  # a part shot 3 times; 20 chained
    dissolved, warnings = dissolve_chained_groups(items, groups)
    assert dissolved[0] == dissolved[1] == dissolved[2] and len(set(dissolved[3:23])) == 20
    assert len(set(dissolved)) == 1 + 20 + 77 and len(warnings) == 1 and warnings[0].startswith("20 of the 100 'good'")
    kept, none = dissolve_chained_groups(items, np.array([0] * 5 + list(range(1, 96))))  # 5: at most MIN_GROUP_CAP
    assert len(set(kept[:5])) == 1 and none == []


def test_the_data_check_never_holds_every_decoded_photo_at_once(tmp_path, monkeypatch):
    """It kept every decoded image until the end: 300 colour photos of 3 MP peaked at 2.7 GB, a thousand
    from a 12 MP camera would need 36 GB. Here 80 photos decode to 9 MB each (720 MB if all were held)."""
    import tracemalloc

    from fit import data_check

    data = simulated(tmp_path / "parts", count=80)
    served = []

    def large(path):
        served.append(path)
        return np.full((1500, 2000, 3), len(served), np.uint8)  # a 3 MP colour photo, different each time

    monkeypatch.setattr(data_check, "read_image", large)
    tracemalloc.start()
    try:
        check = check_data(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(served) == len(check.items) == 80 and check.native_size == (2000, 1500)
    assert peak < 100e6, f"{peak / 1e6:.0f} MB"


def test_16_bit_photos_filled_to_12_bits_are_warned_about(tmp_path):
    """A 12-bit camera's frames stored in 16-bit PNGs: the station keeps the top 8 bits, the parts reach grey
    level 15 of 255; the test AUROC fell from 1.000 to 0.948 (simulated parts) without a word."""
    data = simulated(tmp_path / "parts", count=80)
    paths = sorted(data.rglob("*.png"))
    for path in paths:
        cv2.imwrite(str(path), read_image(path).astype(np.uint16) << 4)  # 8 -> 12 bits, in a 16-bit file
    warnings = [w for w in check_data(data).warnings if "16-bit" in w]
    assert len(warnings) == 1 and warnings[0].startswith(f"{len(paths)} 16-bit image(s) use only the lowest 12 bits")
    assert "grey level 15 of 255" in warnings[0] and "scale them to the full 16-bit range" in warnings[0]
    for path in paths:
        cv2.imwrite(str(path), read_image(path) << 4)  # the full 16-bit range: nothing to say
    assert not [w for w in check_data(data).warnings if "16-bit" in w]


def test_candidates_stop_when_the_next_estimate_would_overrun_the_budget(tmp_path, monkeypatch):
    import export.train  # noqa: F401  (imported before the clock starts, as in a real run)
    from fit import candidates

    def fake(candidate, train, val, calibration, checkpoint, options):
        rng = np.random.default_rng(0)  # the same parts for every candidate; the cnn separates them better
        shift = 1.0 if candidate.arch == "mlp" else 3.0
        good, defect = rng.normal(size=150), rng.normal(size=40) + shift
        return candidates.Outcome(
            candidate,
            seconds=2.0,
            checkpoint=checkpoint,
            metric="kissme",
            threshold=1.0,
            escape_rate=0.1 if candidate.arch == "mlp" else 0.05,
            auroc=0.76 if shift == 1 else 0.98,
            false_reject_rate=0.01,
            good_scores=good,
            defect_scores=defect,
        )

    monkeypatch.setattr(candidates, "_train_and_measure", fake)
    items = list(range(10))
    order = [
        candidates.Candidate("mlp", "center"),
        candidates.Candidate("mlp", "center", 1),
        candidates.Candidate("cnn", "center"),
        candidates.Candidate("cnn", "triplet"),
    ]
    # 5 s: the second mlp (~2 s) fits, the cnn (~6 s, three times the mlp's cost) does not.
    search = candidates.run_candidates(
        order, items, [], [], tmp_path, candidates.SearchOptions(budget_minutes=5 / 60, epochs=3, say=lambda line: None)
    )
    assert [o.candidate for o in search.outcomes] == order[:2]
    assert len(search.skipped) == 2 and "budget" in search.skipped[0]
    # Chosen on the calibration part, never by order or training loss.
    search = candidates.run_candidates(
        order, items, [], [], tmp_path, candidates.SearchOptions(budget_minutes=60, epochs=3, say=lambda line: None)
    )
    assert search.chosen.candidate.arch == "cnn"


def test_photos_that_only_share_gradient_signs_are_not_near_duplicates():
    """Smooth surfaces give different photos the same difference hash; the thumbnail tells them apart."""
    from fit.data_check import thumbnail

    ramp = np.tile(np.linspace(60, 200, 40, dtype=np.float32), (30, 1))
    darker, copy = (ramp * 0.8).astype(np.uint8), (ramp + 1).astype(np.uint8)
    images = [ramp.astype(np.uint8), darker, copy]
    hashes = [difference_hash(image) for image in images]
    assert len(set(hashes)) == 1  # the hash alone would merge all three
    groups = near_duplicate_groups(hashes, ["a", "b", "c"], np.stack([thumbnail(image) for image in images]))
    assert groups[0] == groups[2] != groups[1]


def test_the_choice_is_not_noise_and_says_how_sure_it_is():
    """Few defects: a higher AUROC wins over one escape fewer, and the default holds against noise."""
    from fit.candidates import DEFAULT_CANDIDATE, Candidate, Outcome
    from fit.choice import CONFIDENT, choose

    rng = np.random.default_rng(1)
    good = rng.normal(size=150)

    def outcome(candidate, shift, escaped, n_defect=10, own_noise=0.0):
        defect = np.random.default_rng(2).normal(size=n_defect) + shift
        defect += own_noise * np.random.default_rng(4).normal(size=n_defect)  # where this candidate differs
        from calibration.thresholds import auroc

        return Outcome(
            candidate,
            escape_rate=escaped / n_defect,
            auroc=auroc(good, defect),
            false_reject_rate=0.01,
            n_good=150,
            n_defect=n_defect,
            good_scores=good,
            defect_scores=defect,
        )

    # The commutators' case: AUROC 0.95 against 0.82, but one escape more of ten.
    strong, weak = (
        outcome(Candidate("cnn", "center", 0, (72, 52)), 2.6, 2),
        outcome(Candidate("cnn", "triplet"), 1.3, 1),
    )
    choice = choose([weak, strong], DEFAULT_CANDIDATE)
    assert choice.chosen is strong and choice.runner_up is weak and choice.confidence > CONFIDENT
    assert "paired resamples" in choice.line() and choice.summary()["confidence"] == round(choice.confidence, 3)
    # The default holds against a candidate whose lead the resamples do not confirm...
    # (AUROC 0.932 against 0.917, ahead in 77 % of the resamples.)
    default, close = outcome(DEFAULT_CANDIDATE, 2.0, 2), outcome(Candidate("mlp", "center"), 2.05, 2, own_noise=0.5)
    assert close.auroc > default.auroc
    held = choose([default, close], DEFAULT_CANDIDATE)
    assert held.chosen is default and "beat the default in only 77%" in held.note
    # ...and gives way to one that is clearly better.
    assert choose([default, strong], DEFAULT_CANDIDATE).chosen is strong
    # Without defects the false-reject rate decides; nothing is claimed about confidence.
    goods_only = [
        Outcome(DEFAULT_CANDIDATE, false_reject_rate=0.02),
        Outcome(Candidate("mlp", "center"), false_reject_rate=0.01),
    ]
    choice = choose(goods_only, DEFAULT_CANDIDATE)
    assert choice.chosen is goods_only[1] and choice.confidence is None


def test_the_pretrained_candidate_keeps_the_photos_aspect_ratio():
    from fit.candidates import PRETRAINED_AREA, candidate_list, pretrained_size

    for native in ((300, 300), (500, 1250), (36, 26), (632, 222)):
        width, height = pretrained_size(native)
        assert width % 16 == 0 and height % 16 == 0 and min(width, height) >= 32
        assert abs(width / height - native[0] / native[1]) / (native[0] / native[1]) < 0.35  # not squeezed
        assert 0.4 * PRETRAINED_AREA <= width * height <= 2.0 * PRETRAINED_AREA
    names = [c.name for c in candidate_list((300, 300))]
    assert names[:2] == ["cnn/center/36x26/seed0", "lite0/center/96x96/seed0"]


def test_a_candidate_over_the_time_per_part_is_measured_and_never_chosen(sim_dataset, tmp_path):
    from fit import candidates
    from station.core.imagefolder import scan_dataset

    items = scan_dataset(sim_dataset)
    train_items, calibration = items[::2], items[1::2]
    options = candidates.SearchOptions(epochs=1, max_ms_per_part=1e-6, say=lambda line: None)
    with pytest.raises(DataError, match="no candidate could be trained") as refused:
        candidates.run_candidates(
            [candidates.Candidate("mlp", "center")], train_items, [], calibration, tmp_path, options
        )
    assert "ms a part" in str(refused.value) and "--max-ms-per-part" in str(refused.value)
    assert 0 < candidates.cost_per_part(tmp_path / "c0.untrained.pt") < 50  # measured before training
