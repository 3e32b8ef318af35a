import logging
import os
import shutil
import threading
import time

import cv2
import numpy as np
import pytest

from station.core.backoff import Backoff
from station.core.simulated_line import FRAME_HEIGHT, FRAME_WIDTH, render_frame, render_part
from station.runtime.frame_feed import LatestFrame
from station.runtime.sources import CaptureSource, FolderSource, SimSource, open_source
from station.tools.simulate import write_video


def take(source, n: int, timeout: float = 10.0):
    frames = []
    deadline = time.monotonic() + timeout
    for frame in source:
        frames.append(frame)
        if len(frames) == n or time.monotonic() > deadline:
            break
    return frames


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "b").mkdir(parents=True)
    for name, value in (("a1.png", 10), ("b/c2.png", 20), ("z3.png", 30)):
        cv2.imwrite(str(root / name), np.full((8, 8), value, np.uint8))
    return root


def test_folder_source_is_sorted_recursive_and_ends(folder):
    source = open_source(str(folder))
    assert isinstance(source, FolderSource)
    frames = list(source)
    assert [f.source for f in frames] == ["a1.png", "b/c2.png", "z3.png"]
    assert [int(f.image[0, 0]) for f in frames] == [10, 20, 30]
    assert [f.frame_no for f in frames] == [0, 1, 2]
    assert source.state == "ended"


def test_folder_source_loops(folder):
    frames = take(open_source(str(folder), loop=True), 7)
    assert [f.source for f in frames] == ["a1.png", "b/c2.png", "z3.png"] * 2 + ["a1.png"]
    assert [f.frame_no for f in frames] == list(range(7))


def test_an_unreadable_image_is_named_and_passed_on_as_a_part_without_pixels(folder, caplog):
    (folder / "b" / "broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="station.runtime.sources"):
        source = open_source(folder)
        frames = list(source)
    # In its place in the order, so that the daemon gives that part a no_verdict rather than losing it.
    assert [f.source for f in frames] == ["a1.png", "b/broken.png", "b/c2.png", "z3.png"]
    assert [f.problem is None for f in frames] == [True, False, True, True]
    assert "broken.png" in frames[1].problem and "cannot be decoded" in frames[1].problem
    assert frames[1].image.size == 0
    assert source.skipped == 1
    assert any("broken.png" in r.getMessage() for r in caplog.records)


def test_sim_source_renders_the_simulated_line():
    source = open_source("sim://?seed=5&count=4")
    assert isinstance(source, SimSource)
    frames = list(source)
    assert len(frames) == 4 and source.state == "ended"
    assert frames[0].image.shape == (FRAME_HEIGHT, FRAME_WIDTH, 3)
    assert np.array_equal(frames[2].image, render_frame(render_part(5, 2), 5))
    assert [f.source for f in frames] == [f"sim:5:{i}" for i in range(4)]
    assert len(take(open_source("sim://?seed=1"), 30)) == 30  # endless without count


def test_fps_cap_holds_the_rate():
    started = time.monotonic()
    frames = list(open_source("sim://?count=11", fps=25))
    elapsed = time.monotonic() - started
    assert len(frames) == 11
    # 10 intervals of 40 ms: never faster; the upper bound only catches a cap that sleeps whole seconds
    # (a busy machine may stretch the intervals, which is no fault of the cap).
    assert 0.38 <= elapsed < 10
    gaps = np.diff([f.grabbed_at for f in frames])
    assert gaps.min() >= 0.035


@pytest.fixture
def video(tmp_path):
    path = tmp_path / "line.avi"
    write_video(path, tmp_path / "line.csv", count=12, seed=7)
    return path


def test_video_file_frames_are_numbered_and_end(video):
    source = open_source(str(video))
    assert isinstance(source, CaptureSource)
    frames = list(source)
    assert [f.source for f in frames] == [str(i) for i in range(12)]
    assert frames[0].image.shape == (FRAME_HEIGHT, FRAME_WIDTH, 3)
    # MJPG is lossy: compare with the rendered frame loosely.
    expected = render_frame(render_part(7, 3), 7).astype(np.int16)
    assert np.abs(frames[3].image.astype(np.int16) - expected).mean() < 6
    assert source.state == "ended" and source.reconnects == 0


def test_video_file_loops(video):
    frames = take(open_source(str(video), loop=True), 30)
    assert [f.source for f in frames] == [str(i % 12) for i in range(30)]


def test_removed_video_reconnects_when_restored(video, tmp_path):
    source = CaptureSource(str(video), "file", loop=True, fps=100, backoff=Backoff(first=0.05, ceiling=0.1))
    frames, states = [], []
    reader = threading.Thread(target=lambda: [frames.append(f) for f in source], daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 5
        while len(frames) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert source.state == "ok" and len(frames) >= 5
        moved = tmp_path / "away.avi"
        shutil.move(video, moved)
        deadline = time.monotonic() + 5
        while source.state != "reconnecting" and time.monotonic() < deadline:
            time.sleep(0.01)
        states.append(source.state)
        count_while_gone = len(frames)
        time.sleep(0.3)
        assert len(frames) == count_while_gone  # nothing delivered while the file is gone
        shutil.move(moved, video)
        deadline = time.monotonic() + 5
        while not (source.state == "ok" and len(frames) > count_while_gone) and time.monotonic() < deadline:
            time.sleep(0.01)
        states.append(source.state)
    finally:
        source.close()
        reader.join(5)
    assert states == ["reconnecting", "ok"]
    assert source.reconnects == 1
    assert not reader.is_alive() and source.state == "ended"


def test_a_missing_looping_video_keeps_retrying_without_crashing(tmp_path):
    source = CaptureSource(str(tmp_path / "absent.avi"), "file", loop=True, backoff=Backoff(first=0.05, ceiling=0.1))
    latest = LatestFrame(source)
    try:
        assert latest.get(timeout=0.5) is None
        assert source.state == "reconnecting" and not latest.ended
        assert "absent.avi does not exist" in source.problem
    finally:
        latest.close()
    assert latest.ended


def test_latest_frame_returns_only_fresh_frames():
    latest = LatestFrame(open_source("sim://?seed=2&count=40", fps=100))
    try:
        first = latest.get(timeout=2)
        time.sleep(0.1)  # frames arrive meanwhile; only the newest is kept
        second = latest.get(timeout=2)
        assert second.frame_no > first.frame_no + 1
        while latest.get(timeout=2) is not None:
            pass
        assert latest.ended
    finally:
        latest.close()


def test_url_credentials_are_not_in_the_description():
    source = open_source("rtsp://admin:pa55@10.1.2.3/stream1")
    assert source.description == "rtsp://10.1.2.3/stream1"
    assert open_source(0).description == "0" and open_source("/dev/video3").kind == "device"


def test_the_frame_feed_bounds_queued_pixels_and_drops_only_for_live_cameras():
    from station.runtime.frame_feed import FrameFeed
    from station.runtime.sources import FrameSource

    class Burst(FrameSource):
        """A source that delivers 50 large frames as fast as it can."""

        def _frames(self):
            for _ in range(50):
                yield self._frame(np.zeros((480, 640, 3), np.uint8), "burst")

    lossless = FrameFeed(Burst("burst"), lossless=True, max_bytes=5 * 640 * 480 * 3)
    time.sleep(0.5)  # the loop is busy: capture must wait, not pile up
    assert len(lossless._frames) == 5 and lossless.dropped == 0
    taken = []
    while not lossless.ended:
        taken += lossless.get_batch(8, timeout=0.5)
    assert len(taken) == 50 and lossless.dropped == 0  # nothing lost from stored media

    live = FrameFeed(Burst("camera"), lossless=False)
    deadline = time.monotonic() + 5
    while live.captured < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(live.get_batch(50, timeout=0.5)) == FrameFeed.LIVE_DEPTH  # only the freshest frames
    assert live.dropped == 50 - FrameFeed.LIVE_DEPTH


def mixed_size_video(path, sizes):
    """A motion-JPEG video (JPEGs encoded by OpenCV, one after another, as an MJPEG camera sends them)
    whose frame size changes: sizes is a list of (width, height), one per frame."""
    with open(path, "wb") as video:
        for index, (width, height) in enumerate(sizes):
            frame = cv2.resize(render_frame(render_part(3, index), 3), (width, height), interpolation=cv2.INTER_AREA)
            video.write(cv2.imencode(".jpg", frame)[1].tobytes())
    return path


def test_a_video_whose_frame_size_changes_gives_each_frame_at_its_own_size(tmp_path):
    """OpenCV's FFmpeg backend scales every frame to the first one's size: the daemon could never see the change."""
    sizes = [(320, 240)] * 4 + [(160, 120)] * 3 + [(320, 240)] * 2
    source = open_source(str(mixed_size_video(tmp_path / "line.mjpg", sizes)))
    frames = list(source)
    assert [(f.image.shape[1], f.image.shape[0]) for f in frames] == sizes
    assert source.problem is None and [f.source for f in frames] == [str(i) for i in range(len(sizes))]


def folder_of(root, files: dict[str, bytes]):
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def file_of(path, data: bytes):
    path.write_bytes(data)
    return path


def symlink_loop(path):
    path.symlink_to(path)
    return path


NO_FRAME = {  # a finite source that never gives a frame: (make it, what its problem says)
    "empty folder": (lambda p: folder_of(p / "images", {}), "holds no images (the station reads .bmp"),
    "folder of other files": (lambda p: folder_of(p / "images", {"notes.txt": b"x"}), "holds no images"),
    "all unreadable": (
        lambda p: folder_of(p / "images", {"a.png": b"not a png", "b.jpg": b""}),
        "none of its 2 images can be read (e.g. ",
    ),
    "not a video": (
        lambda p: file_of(p / "line.avi", b"plain text"),
        "line.avi cannot be opened as a video (not a video file",
    ),
    "empty video": (lambda p: file_of(p / "line.avi", b""), "cannot be opened as a video"),
    "missing video": (lambda p: p / "line.avi", "line.avi does not exist"),
    "symlink loop": (lambda p: symlink_loop(p / "loop"), "loop does not exist"),
}


@pytest.mark.parametrize("case", sorted(NO_FRAME))
def test_a_finite_source_without_a_frame_ends_saying_why(tmp_path, case):
    make, says = NO_FRAME[case]
    source = open_source(str(make(tmp_path)))
    started = time.monotonic()
    assert [frame for frame in source if frame.problem is None] == []  # unreadable files come as parts without pixels
    assert source.state == "ended" and says in source.problem, source.problem
    assert time.monotonic() - started < 10  # ends: no retrying on a finite source


def run_in_thread(source):
    frames = []
    thread = threading.Thread(target=lambda: [frames.append(f) for f in source], daemon=True)
    thread.start()
    return frames, thread


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_looping_folder_renamed_away_reconnects_and_says_why(folder, tmp_path):
    source = FolderSource(folder, loop=True, fps=100, backoff=Backoff(first=0.05, ceiling=0.1))
    frames, thread = run_in_thread(source)
    try:
        wait_for(lambda: len(frames) >= 5)
        folder.rename(tmp_path / "away")
        wait_for(lambda: source.state == "reconnecting")
        assert f"image folder {folder} does not exist" == source.problem
        count_while_gone = len(frames)
        time.sleep(0.3)
        assert len(frames) <= count_while_gone + 3  # at most the pass under way, from images read before
        (tmp_path / "away").rename(folder)
        wait_for(lambda: source.state == "ok" and len(frames) > count_while_gone + 3)
        assert source.problem is None and source.reconnects == 1
    finally:
        source.close()
        thread.join(5)
    assert not thread.is_alive() and source.state == "ended"


def test_a_looping_folder_that_fills_slowly_waits_then_reads_what_arrives(tmp_path):
    root = tmp_path / "incoming"
    root.mkdir()
    source = FolderSource(root, loop=True, backoff=Backoff(first=0.05, ceiling=0.1))
    frames, thread = run_in_thread(source)
    try:
        wait_for(lambda: source.state == "reconnecting")
        assert "holds no images" in source.problem
        partial = cv2.imencode(".jpg", render_frame(render_part(1, 0), 1))[1].tobytes()
        (root / "part_1.jpg").write_bytes(partial[: len(partial) // 2])  # still being written
        time.sleep(0.3)
        # The half-written file is named as a part without pixels (the daemon's no_verdict), never judged.
        assert frames and all(f.problem and "part_1.jpg" in f.problem for f in frames)
        assert "none of its 1 images can be read" in source.problem
        (root / "part_1.jpg").write_bytes(partial)
        wait_for(lambda: sum(f.problem is None for f in frames) >= 2)
        assert source.state == "ok" and source.problem is None and source.reconnects == 1
        assert {f.source for f in frames} == {"part_1.jpg"}
    finally:
        source.close()
        thread.join(5)


def test_a_looping_video_emptied_reconnects_instead_of_spinning(video, tmp_path):
    source = CaptureSource(str(video), "file", loop=True, fps=200, backoff=Backoff(first=0.2, ceiling=0.2))
    frames, thread = run_in_thread(source)
    try:
        wait_for(lambda: len(frames) >= 3)
        saved = video.read_bytes()
        video.write_bytes(b"")
        wait_for(lambda: source.state == "reconnecting")
        assert "cannot be opened as a video" in source.problem or "no frame that can be decoded" in source.problem
        video.write_bytes(saved)
        count = len(frames)
        wait_for(lambda: source.state == "ok" and len(frames) > count)
    finally:
        source.close()
        thread.join(5)


def test_a_finite_video_renamed_away_mid_way_is_read_to_its_end_once(tmp_path):
    path = tmp_path / "line.avi"
    write_video(path, tmp_path / "line.csv", count=120, seed=2)
    source = CaptureSource(str(path), "file", fps=100, backoff=Backoff(first=0.05, ceiling=0.1))
    frames, thread = run_in_thread(source)
    try:
        wait_for(lambda: len(frames) >= 5)
        path.rename(tmp_path / "away.avi")
        thread.join(30)
    finally:
        source.close()
    assert not thread.is_alive() and source.state == "ended"
    assert [int(f.source) for f in frames] == list(range(120))  # every frame once, never from frame 0 again
    assert source.problem is None and source.reconnects == 0


def test_a_file_too_large_for_any_image_is_refused_before_it_is_read(tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), render_frame(render_part(1, 0), 1))
    with open(folder / "b.png", "wb") as huge:  # sparse: 3 GB on paper, nothing on disk
        huge.truncate(3_000_000_000)
    started = time.monotonic()
    frames = list(FolderSource(folder))
    assert [f.source for f in frames] == ["a.png", "b.png"]
    assert frames[0].problem is None
    assert "b.png: is 3000 MB, more than an image of 50 MP can be: refused before reading" in frames[1].problem
    assert time.monotonic() - started < 5  # refused from its size, not after reading 3 GB


def test_a_link_to_nothing_and_a_named_pipe_are_parts_without_pixels_not_lost_or_waited_on(folder):
    (folder / "b" / "gone.png").symlink_to(folder / "on-the-nas" / "gone.png")  # the share went away
    os.mkfifo(folder / "b" / "pipe.png")  # reading it would wait for a writer forever
    started = time.monotonic()
    frames = take(open_source(folder), 6)
    assert time.monotonic() - started < 5
    assert [f.source for f in frames] == ["a1.png", "b/c2.png", "b/gone.png", "b/pipe.png", "z3.png"]
    problems = {f.source: f.problem for f in frames}
    assert "is a link to" in problems["b/gone.png"] and "which does not exist" in problems["b/gone.png"]
    assert "is not a file but a named pipe" in problems["b/pipe.png"]
    assert problems["a1.png"] is None and problems["z3.png"] is None
