"""trigger: presence on a stop-and-go belt video: one verdict per part, on a settled frame."""
from __future__ import annotations

import csv

import jsonschema

from station.runtime.presence import PresenceGate
from station.tools.simulate import write_dwell_video
from tests.mqtt_helpers import Recorder
from tests.test_daemon import broker, finish, schema, start_station, station_files, write_config  # noqa: F401

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

    from station.runtime.presence import PresenceSettings, centre_offset

    belt_crop = np.full((26, 36), 55, np.uint8)
    def part_at(shift):  # a 12-pixel-wide part whose centre is `shift` pixels right of the region's
        crop = belt_crop.copy()
        left = 12 + shift
        crop[:, max(left, 0):max(left + 12, 0)] = 185
        return crop
    assert [round(centre_offset(part_at(s), belt_crop.astype(np.float32))) for s in (-6, 0, 6)] == [-6, 0, 6]
    for shifts in ((-20, -10, -1, 9, 19), (20, 10, 1, -9, -19)):  # left to right, right to left
        gate = PresenceGate(PresenceSettings(judge_on="centred"))
        crops = [belt_crop] * 5 + [part_at(s) for s in shifts] + [belt_crop] * 2
        judged, _, missed = gate.select(list(range(len(crops))), crops)
        assert judged == [5 + 2] and not missed  # the frame 1 px from the centre, not the one 9 px past it
