import csv
import hashlib
import subprocess
import sys
from collections import Counter

import cv2
import numpy as np

from station.core import simulated_line as simulate
from station.tools.simulate import write_dataset, write_video
from station.core.imagefolder import GOOD, scan_dataset
from station.core.preprocess import crop


def _tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_seed_writes_byte_identical_datasets_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "station",
                "simulate",
                "--out",
                str(tmp_path / name),
                "--count",
                "60",
                "--seed",
                str(seed),
            ],
            check=True,
            capture_output=True,
        )
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_about_a_third_defective_and_every_class_present():
    classes = Counter(simulate.part_class(0, i) for i in range(3000))
    assert 0.30 < 1 - classes[GOOD] / 3000 < 0.37
    assert set(classes) == {GOOD, *simulate.DEFECT_CLASSES}
    assert min(classes[c] for c in simulate.DEFECT_CLASSES) > 100


def test_every_defect_is_partial():
    """The same part with and without its defect differs only in a small area."""
    for defect in simulate.DEFECT_CLASSES:
        changed_fractions = []
        for index in range(40):
            good = simulate.render_part(1, index, defect_class=GOOD).crop.astype(int)
            bad = simulate.render_part(1, index, defect_class=defect).crop.astype(int)
            changed_fractions.append(np.mean(np.abs(bad - good) > 25))
        assert 0.004 < np.mean(changed_fractions), f"{defect} is invisible"
        assert max(changed_fractions) < 0.12, f"{defect} changes {max(changed_fractions):.0%} of the crop"


def test_good_parts_jitter_but_stay_alike():
    crops = np.array([simulate.render_part(2, i, defect_class=GOOD).crop for i in range(50)], dtype=float)
    spread = crops.std(axis=0).mean()
    assert 3 < spread < 40  # position, rotation, lighting and noise vary, the part does not
    assert crops.shape[1:] == (26, 36)


def test_dataset_follows_the_image_folder_convention(tmp_path):
    counts = write_dataset(tmp_path, count=90, seed=3)
    items = scan_dataset(tmp_path)
    assert len(items) == 90 == sum(counts.values())
    assert Counter(i.defect_class for i in items) == Counter(counts)
    assert cv2.imread(str(items[0].path), cv2.IMREAD_UNCHANGED).shape == (26, 36)


def test_video_frames_hold_the_part_in_the_roi_and_match_the_ground_truth(tmp_path):
    video, truth = tmp_path / "line.avi", tmp_path / "line.csv"
    write_video(video, truth, count=12, seed=4)
    rows = list(csv.DictReader(open(truth)))
    assert [int(r["frame"]) for r in rows] == list(range(12))
    capture = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 12 and frames[0].shape == (240, 320, 3)
    for row, frame in zip(rows, frames):
        part = simulate.render_part(4, int(row["frame"]))
        assert row["defect_class"] == part.defect_class
        assert row["label"] == ("OK" if part.defect_class == GOOD else "NG")
        seen = cv2.cvtColor(crop(frame, simulate.FRAME_ROI), cv2.COLOR_BGR2GRAY).astype(int)
        assert np.mean(np.abs(seen - part.crop)) < 6  # MJPG is lossy, but it is that part


def test_plates_are_large_parts_whose_defects_are_small_and_local(tmp_path):
    from station.core.simulated_surface import PLATE_HEIGHT, PLATE_WIDTH, SURFACE_DEFECT_CLASSES, render_surface
    from station.tools.simulate import write_plate_dataset

    counts = write_plate_dataset(tmp_path / "a", 60, seed=3)
    write_plate_dataset(tmp_path / "b", 60, seed=3)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert sum(counts.values()) == 60 and 0.15 < 1 - counts[GOOD] / 60 < 0.5
    items = scan_dataset(tmp_path / "a")
    assert cv2.imread(str(items[0].path), cv2.IMREAD_UNCHANGED).shape == (PLATE_HEIGHT, PLATE_WIDTH)
    for defect in SURFACE_DEFECT_CLASSES:
        _, good = render_surface(3, 7, GOOD)
        _, bad = render_surface(3, 7, defect)  # the same plate, light and noise, with the defect drawn
        changed = np.abs(bad.astype(int) - good) > 15
        assert 5 <= changed.sum() and changed.mean() < 0.005, f"{defect}: {changed.sum()} pixels"
        # Shrunk to the default model input the defect changes less than one good plate differs from the
        # next: why native size and tiles matter.
        small = [
            cv2.resize(image, (36, 26), interpolation=cv2.INTER_AREA).astype(int)
            for image in (good, bad, render_surface(3, 8, GOOD)[1])
        ]
        assert np.abs(small[1] - small[0]).max() < np.abs(small[2] - small[0]).max() / 2


def test_plate_photos_refuse_the_terminal_line_s_options(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "station",
            "simulate",
            "--part",
            "plate",
            "--out",
            str(tmp_path / "p"),
            "--count",
            "3",
            "--video",
            str(tmp_path / "v.avi"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "--part plate writes photos only" in done.stderr
    assert not (tmp_path / "p").exists()
