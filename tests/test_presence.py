"""trigger: presence on a stop-and-go belt video: one verdict per part, on a settled frame."""

from __future__ import annotations

import csv

import jsonschema
import pytest

from station.runtime.presence import PresenceGate
from station.tools.simulate import write_dwell_video
from tests.mqtt_helpers import Recorder

ROI = "{x: 142, y: 107, width: 36, height: 26}"


def belt(tmp_path, count: int, dwell: int):
    video, truth = tmp_path / f"belt-{dwell}.avi", tmp_path / f"belt-{dwell}.csv"
    write_dwell_video(video, truth, count=count, seed=3, dwell=dwell)
    with open(truth) as handle:
        return video, list(csv.DictReader(handle))


def run_belt(tmp_path, station_files, broker, count: int, dwell: int, **extra):
    """The station over a belt video to its end (exit 0): (recorder with what it published, the truth rows)."""
    video, frames = belt(tmp_path, count=count, dwell=dwell)
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(tmp_path, station_files, broker, f"{{source: {video}}}", roi=ROI, trigger="presence", **extra)
    code, output = finish(start_station(config), timeout=60)
    assert code == 0, output
    return recorder, frames


def test_each_part_is_judged_once_on_a_settled_frame(tmp_path, station_files, broker):
    recorder, frames = run_belt(tmp_path, station_files, broker, count=12, dwell=5)
    recorder.wait_for(lambda: len(recorder.on("/verdict")) >= 12, what="12 verdicts")
    verdicts = recorder.json_on("/verdict")
    judged = [frames[int(v["source"])] for v in verdicts]
    assert [row["part"] for row in judged] == [str(i) for i in range(12)]  # each part once, in order
    assert {row["phase"] for row in judged} == {"settled"}
    assert not recorder.on("/no_verdict")
    stats = recorder.json_on("/stats")[-1]
    assert stats["parts"] == 12 and stats["no_verdicts"] == 0
    assert stats["skipped_frames"] == len(frames) - 12
    jsonschema.validate(recorder.json_on("/state")[-1], schema("state"))
    recorder.close()


def test_a_part_that_never_settles_gets_a_no_verdict_message(tmp_path, station_files, broker):
    recorder, _ = run_belt(tmp_path, station_files, broker, count=4, dwell=1)  # one still frame: not enough to settle
    recorder.wait_for(lambda: len(recorder.on("/no_verdict")) >= 4, what="4 no_verdict messages")
    missed = recorder.json_on("/no_verdict")
    for message in missed:
        jsonschema.validate(message, schema("no_verdict"))
    assert not recorder.on("/verdict")
    assert [m["seq"] for m in missed] == [1, 2, 3, 4]  # the verdicts' seq: every part accounted for
    recorder.close()


def test_the_gate_waits_for_the_region_to_empty_before_the_next_part():
    import numpy as np

    gate = PresenceGate()
    empty, part = np.full((26, 36), 55, np.uint8), np.full((26, 36), 185, np.uint8)
    decisions = [gate.feed(frame) for frame in [empty] * 5 + [part] * 6 + [empty] * 2 + [part] * 4]
    assert decisions.count("judge") == 2 and gate.parts == 2 and gate.state == "judged"


def test_on_a_belt_that_never_stops_each_part_is_judged_once_when_centred(tmp_path, station_files, broker):
    """`station simulate --dwell 0`: parts pass without stopping, one frame at the region's centre.
    judge_on: still never sees them settle (no_verdict each); judge_on: centred judges that frame."""
    recorder, frames = run_belt(tmp_path, station_files, broker, count=10, dwell=0, presence="{judge_on: centred}")
    recorder.wait_for(lambda: len(recorder.on("/verdict")) >= 10, what="10 verdicts")
    judged = [frames[int(v["source"])] for v in recorder.json_on("/verdict")]
    assert [row["part"] for row in judged] == [str(i) for i in range(10)]  # each part once, in order
    assert {row["phase"] for row in judged} == {"passing"}  # the centred frame, not one beside it
    assert not recorder.on("/no_verdict")
    recorder.close()


def test_the_centre_offset_follows_a_part_across_the_region_in_either_direction():
    import numpy as np

    from station.runtime.config.presence import PresenceSettings
    from station.runtime.presence import centre_offset

    belt_crop = np.full((26, 36), 55, np.uint8)

    def part_at(shift):  # a 12-pixel-wide part whose centre is `shift` pixels right of the region's
        crop = belt_crop.copy()
        left = 12 + shift
        crop[:, max(left, 0) : max(left + 12, 0)] = 185
        return crop

    assert [round(centre_offset(part_at(s), belt_crop.astype(np.float32))) for s in (-6, 0, 6)] == [-6, 0, 6]
    for shifts in ((-20, -10, -1, 9, 19), (20, 10, 1, -9, -19)):  # left to right, right to left
        gate = PresenceGate(PresenceSettings(judge_on="centred"))
        crops = [belt_crop] * 5 + [part_at(s) for s in shifts] + [belt_crop] * 2
        judged, _, missed = gate.select(list(range(len(crops))), crops)
        assert judged == [5 + 2] and not missed  # the frame 1 px from the centre, not the one 9 px past it


# -- the gate must never be silent (issue 23): belts rendered here, frame by frame, through the real daemon

import signal  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from station.core.simulated_line import FRAME_HEIGHT, FRAME_WIDTH, render_frame, render_part  # noqa: E402
from station.runtime.config.presence import PresenceSettings  # noqa: E402
from station.tools.simulate import SLIDE_STEP, dwell_frames  # noqa: E402
from tests.daemon_helpers import Output, finish, schema, start_station, write_config  # noqa: E402

SEED = 3


def cycle(index: int, dwell: int = 5) -> list:
    """One part's frames on a stop-and-go belt, then the empty gap: (part or None, x offset, phase)."""
    return [(None if phase == "empty" else index, offset, phase) for phase, offset in dwell_frames(dwell)]


def write_belt(path, script: list, light=lambda n: 0.0, fps: float = 25.0):
    """An MJPG video of the script, `light(n)` grey levels added to frame n; returns the script (frame n = row n)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (FRAME_WIDTH, FRAME_HEIGHT))
    assert writer.isOpened()
    parts, travel = {}, 0
    for n, (index, offset, phase) in enumerate(script):
        travel += SLIDE_STEP if phase in ("entering", "passing", "leaving") else 0
        part = None if index is None else parts.setdefault(index, render_part(SEED, index, 3))
        frame = render_frame(part, SEED, index=0, x_offset=offset, travel=travel, frame_no=n).astype(np.float32)
        writer.write(np.clip(np.round(frame + light(n)), 0, 255).astype(np.uint8))
    writer.release()
    return script


def empty(frames: int) -> list:
    return [(None, 0, "empty")] * frames


def run_script(tmp_path, station_files, broker, script, light=lambda n: 0.0, presence=None, camera_extra=""):
    """The station over the rendered belt to its end: (recorder, its output)."""
    video = tmp_path / "belt.avi"
    write_belt(video, script, light)
    recorder = Recorder(broker.host, broker.port, "plant/#")
    extra = {"presence": presence} if presence else {}
    config = write_config(
        tmp_path, station_files, broker, f"{{source: {video}{camera_extra}}}", roi=ROI, trigger="presence", **extra
    )
    code, output = finish(start_station(config), timeout=120)
    assert code == 0, output
    return recorder, output


def accounted(recorder, script, expected: int) -> tuple[list, list]:
    """Wait for a verdict or a no_verdict for each of `expected` parts; (verdicts, no_verdicts), no more than that."""
    count = lambda: len(recorder.on("/verdict")) + len(recorder.on("/no_verdict"))  # noqa: E731
    recorder.wait_for(lambda: count() >= expected, timeout=30, what=f"{expected} verdicts and no_verdicts")
    verdicts, missed = recorder.json_on("/verdict"), recorder.json_on("/no_verdict")
    assert len(verdicts) + len(missed) == expected, (verdicts, missed)
    seqs = sorted(m["seq"] for m in verdicts + missed)
    assert seqs == list(range(1, expected + 1))  # every seq a verdict or a no_verdict
    return verdicts, missed


def judged_parts(verdicts, script) -> list:
    return [script[int(v["source"])][0] for v in verdicts]


def test_a_part_standing_in_the_region_at_start_is_found_out_and_every_later_part_judged(
    tmp_path, station_files, broker
):
    script = [(0, 0, "settled")] * 10 + cycle(0)[-12:]  # part 0 stands there at start, then leaves
    for index in range(1, 9):
        script += cycle(index)
    recorder, output = run_script(tmp_path, station_files, broker, script)
    verdicts, missed = accounted(recorder, script, 9)
    later = [p for p in judged_parts(verdicts, script) if p not in (None, 0)]
    assert later == list(range(1, 9))  # each later part once, in order
    assert output.count("presence: relearned the empty belt") == 1, output  # said once (the state: while it lasts)
    recorder.wait_for(lambda: any(m.get("belt_relearned") == 1 for m in recorder.json_on("/stats")), what="stats")
    assert recorder.json_on("/state")[-1]["problems"] == []  # cleared once a part came and went
    recorder.close()


def test_light_drifting_a_quarter_grey_level_a_frame_loses_no_part(tmp_path, station_files, broker):
    script = empty(6) + [row for index in range(8) for row in cycle(index)]
    recorder, _ = run_script(tmp_path, station_files, broker, script, light=lambda n: 0.25 * n)
    verdicts, missed = accounted(recorder, script, 8)
    assert judged_parts(verdicts, script) == list(range(8)) and not missed
    assert {s["problems"] == [] for s in recorder.json_on("/state")} == {True}
    recorder.close()


def test_a_six_second_belt_stop_with_the_light_drifting_loses_no_part(tmp_path, station_files, broker):
    script = empty(6)
    for index in range(8):
        script += cycle(index, dwell=150 if index == 3 else 5)  # 6 s at 25 fps with part 3 in the region
    recorder, _ = run_script(tmp_path, station_files, broker, script, light=lambda n: 0.07 * n)
    verdicts, missed = accounted(recorder, script, 8)
    assert judged_parts(verdicts, script) == list(range(8)) and not missed
    recorder.close()


def test_a_video_ending_with_a_part_in_the_region_gives_it_a_no_verdict(tmp_path, station_files, broker):
    script = empty(6) + cycle(0) + cycle(1) + cycle(2)[:6]  # part 2 still entering when the video ends
    recorder, output = run_script(tmp_path, station_files, broker, script)
    verdicts, missed = accounted(recorder, script, 3)
    assert judged_parts(verdicts, script) == [0, 1]
    assert [m["reason"] for m in missed] == ["the source ended while a part was in the region"]
    assert script[int(missed[0]["source"])][0] == 2
    recorder.close()


def jiggling(index: int, frames: int) -> list:
    """A part that never settles: it shakes by 6 pixels every frame."""
    return [(index, 6 * (n % 2), "entering") for n in range(frames)]


def test_sigterm_with_a_part_in_the_region_gives_it_a_no_verdict(tmp_path, station_files, broker):
    script = empty(6) + cycle(0) + cycle(1) + jiggling(2, 600)  # 24 s at 25 fps: part 2 never settles
    video = tmp_path / "belt.avi"
    write_belt(video, script)
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(tmp_path, station_files, broker, f"{{source: {video}, fps: 25}}", roi=ROI, trigger="presence")
    process = start_station(config)
    output = Output(process)
    try:
        recorder.wait_for(
            lambda: any(s.get("parts") == 3 for s in recorder.json_on("/stats")),
            timeout=60,
            what="part 2 in the region",
        )
        process.send_signal(signal.SIGTERM)
        assert output.finish(timeout=30) == 0, output.text
    finally:
        if process.poll() is None:
            process.kill()
    verdicts, missed = accounted(recorder, script, 3)
    assert judged_parts(verdicts, script) == [0, 1]
    assert [m["reason"] for m in missed] == ["the station stopped while a part was in the region"]
    recorder.close()


def test_a_part_that_never_leaves_is_reported_and_the_belt_it_hid_is_recognised(tmp_path, station_files, broker):
    """Adversarial: part 1 stays 20 s (past relearn_frames): relearned, said; when it goes the old belt is back."""
    script = empty(6) + cycle(0) + cycle(1, dwell=500) + cycle(2) + cycle(3)
    recorder, output = run_script(tmp_path, station_files, broker, script, presence="{relearn_frames: 100}")
    verdicts, missed = accounted(recorder, script, 4)
    assert judged_parts(verdicts, script) == [0, 1, 2, 3] and not missed
    problems = [p for s in recorder.json_on("/state") for p in s["problems"]]
    assert any("had not looked like the learned empty belt for 100 frames" in p for p in problems), problems
    assert recorder.json_on("/state")[-1]["problems"] == []
    recorder.close()


def test_flicker_of_the_light_neither_hides_parts_nor_keeps_them_from_settling(tmp_path, station_files, broker):
    """Adversarial: the whole picture brightens and darkens by up to 6 grey levels from frame to frame."""
    flicker = np.random.default_rng(5).uniform(-6, 6, 400)
    script = empty(6) + [row for index in range(6) for row in cycle(index)]
    recorder, _ = run_script(tmp_path, station_files, broker, script, light=lambda n: flicker[n])
    verdicts, missed = accounted(recorder, script, 6)
    assert judged_parts(verdicts, script) == list(range(6)) and not missed
    recorder.close()


def test_a_camera_that_goes_black_with_a_part_in_the_region_loses_nothing(tmp_path, station_files, broker):
    """Adversarial: the picture goes black for 4 s while part 1 stands there; the camera comes back, parts go on."""
    script = empty(6) + cycle(0) + cycle(1, dwell=8)[:9] + [("black", 0, "black")] * 100 + cycle(1)[9:]
    script += cycle(2) + cycle(3)
    black = {n for n, row in enumerate(script) if row[0] == "black"}
    script = [(None, 0, "empty") if n in black else row for n, row in enumerate(script)]
    recorder, _ = run_script(tmp_path, station_files, broker, script, light=lambda n: -255.0 if n in black else 0.0)
    verdicts, missed = accounted(recorder, script, 4)
    assert judged_parts(verdicts, script) == [0, 1, 2, 3] and not missed
    recorder.close()


@pytest.fixture(scope="module")
def small_input_files(tmp_path_factory, sim_dataset):
    """A model taking 30x20 crops (not 36x26) and product A's reference set for it."""
    from calibration import workflow
    from station.core.embedder import Embedder
    from tests.onnx_models import projection_model

    root = tmp_path_factory.mktemp("small")
    model = projection_model(root / "model.onnx", seed=1, embedding_dim=32, width=30, height=20)
    workflow.calibrate_folders(Embedder(model), sim_dataset / "good", [], root / "refs" / "A", "A")
    return root


@pytest.mark.parametrize("change", ["a second region", "another input size"])
def test_a_reload_that_changes_what_the_gate_sees_relearns_the_belt_and_loses_no_part(
    tmp_path, station_files, small_input_files, broker, change
):
    script = empty(6) + cycle(0) + cycle(1) + cycle(2) + empty(300) + cycle(3) + cycle(4) + cycle(5)
    video = tmp_path / "belt.avi"
    write_belt(video, script)
    recorder = Recorder(broker.host, broker.port, "plant/#")
    camera = f"{{source: {video}, fps: 25}}"
    config = write_config(tmp_path, station_files, broker, camera, roi=ROI, trigger="presence")
    process = start_station(config)
    output = Output(process)
    try:
        recorder.wait_for(lambda: len(recorder.on("/verdict")) >= 3, timeout=60, what="3 verdicts")
        if change == "a second region":
            rois = (
                "[{name: a, x: 142, y: 107, width: 36, height: 26}, {name: b, x: 150, y: 107, width: 20, height: 26}]"
            )
            write_config(tmp_path, station_files, broker, camera, rois=rois, trigger="presence")
        else:
            small = small_input_files
            write_config(
                tmp_path,
                station_files,
                broker,
                camera,
                roi=ROI,
                trigger="presence",
                model=str(small / "model.onnx"),
                products=f"{{A: {small / 'refs' / 'A'}}}",
            )
        process.send_signal(signal.SIGHUP)
        output.wait_for("learns the empty belt again", timeout=30)
        assert output.finish(timeout=90) == 0, output.text
    finally:
        if process.poll() is None:
            process.kill()
    verdicts, missed = accounted(recorder, script, 6)
    assert judged_parts(verdicts, script) == list(range(6)) and not missed, output.text
    assert "Traceback" not in output.text
    after = verdicts[3:]
    assert all(len(v.get("rois", [])) == 2 for v in after) if change == "a second region" else True
    problems = [p for s in recorder.json_on("/state") for p in s["problems"]]
    assert any(p.startswith("presence: learning the empty belt again") for p in problems), problems
    assert recorder.json_on("/state")[-1]["problems"] == []
    recorder.close()


def test_the_gate_relearns_on_its_own_when_the_crop_changes_size_and_never_crashes():
    gate = PresenceGate()
    for shape, level in (((26, 36), 55), ((20, 30), 60), ((26, 72), 50)):
        empty_crop, part = np.full(shape, level, np.uint8), np.full(shape, 185, np.uint8)
        judged, _, missed = gate.select(list(range(13)), [empty_crop] * 5 + [part] * 6 + [empty_crop] * 2)
        assert judged == [7] and not missed  # learned the new size, then one part judged
    assert gate.parts == 3


def test_a_gate_reset_with_a_part_in_the_region_says_so_and_learns_only_after_it_moved_away():
    rng = np.random.default_rng(0)
    belt_crop = rng.integers(40, 70, (26, 36)).astype(np.uint8)
    part = rng.integers(150, 220, (26, 36)).astype(np.uint8)
    gate = PresenceGate()
    gate.select(list(range(8)), [belt_crop] * 5 + [part] * 3)  # part judged, still there
    assert gate.reset("reloaded") == []  # judged already: nothing owed
    assert gate.problem.startswith("learning the empty belt again")
    judged, _, _ = gate.select(list(range(20)), [part] * 8 + [belt_crop] * 8 + [part] * 4)
    assert judged == [18] and gate.problem is None  # the belt learned after the part left, the next one judged
    gate.select([20, 21, 22], [belt_crop, belt_crop, np.full((26, 36), 120, np.uint8)])  # a part enters, a reset
    missed = gate.reset("reloaded")
    assert [why for _, why in missed] == ["the station reloaded while a part was in the region"]


def test_unit_a_part_at_start_and_the_light_drifting_are_recovered_from():
    rng = np.random.default_rng(1)
    belt_crop = rng.integers(40, 70, (26, 36)).astype(np.float32)
    parts = [rng.integers(120, 230, (26, 36)).astype(np.float32) for _ in range(6)]
    frames = [parts[0]] * 8 + [belt_crop] * 6
    for part in parts[1:]:
        frames += [part] * 6 + [belt_crop] * 6
    lit = [np.clip(f + 0.3 * n, 0, 255).astype(np.uint8) for n, f in enumerate(frames)]
    gate = PresenceGate(PresenceSettings())
    judged, _, missed = gate.select(list(range(len(lit))), lit)
    assert len(judged) + len(missed) == 6 and gate.relearned == 1 and gate.problem is None
