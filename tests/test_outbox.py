import json
import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from station.core.errors import OutboxDiskError, OutboxFullError
from station.runtime.mqtt.outbox import Outbox


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "outbox.db", max_messages=50)
    yield box
    box.close()


def test_pending_is_in_insertion_order_and_ack_removes(outbox):
    ids = [outbox.put(f"t/{i}", f"m{i}".encode(), qos=1) for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert [m.payload for m in outbox.pending(10)] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert outbox.depth() == 5
    assert outbox.ack(ids[1], ids[3]) == 2
    assert [m.payload for m in outbox.pending(10)] == [b"m0", b"m2", b"m4"]
    assert [m.payload for m in outbox.pending(10, after_id=ids[2])] == [b"m4"]
    assert [m.payload for m in outbox.pending(2)] == [b"m0", b"m2"]
    assert outbox.ack(ids[1]) == 0  # acking twice is harmless
    assert outbox.depth() == 3


def test_message_fields_round_trip(outbox):
    outbox.put("inspection/st/state", b"\x00\xffbinary", qos=0, retain=True)
    (message,) = outbox.pending(1)
    assert (message.topic, message.payload, message.qos, message.retain) == (
        "inspection/st/state",
        b"\x00\xffbinary",
        0,
        True,
    )
    with pytest.raises(TypeError):
        outbox.put("t", "text is not bytes")


def test_ids_are_never_reused_after_acking_the_newest(outbox):
    first = outbox.put("t", b"a")
    outbox.ack(first)
    assert outbox.put("t", b"b") > first


def test_put_many_is_one_all_or_nothing_batch(outbox):
    ids = outbox.put_many([("t", str(i).encode(), 1, False) for i in range(40)])
    assert len(ids) == 40 and outbox.depth() == 40
    with pytest.raises(OutboxFullError):
        outbox.put_many([("t", b"x", 1, False)] * 11)  # 51 > 50: refused whole
    assert outbox.depth() == 40


def test_full_outbox_refuses_with_one_rate_limited_error_log(outbox, caplog):
    outbox.put_many([("t", b"x", 1, False)] * 50)
    with caplog.at_level(logging.ERROR, logger="station.runtime.mqtt.outbox"):
        for _ in range(5):
            with pytest.raises(OutboxFullError, match="full.*refused, not dropped"):
                outbox.put("t", b"late")
    assert len(caplog.records) == 1 and "50 undelivered" in caplog.records[0].getMessage()
    assert outbox.depth() == 50
    outbox.ack(outbox.pending(1)[0].id)
    outbox.put("t", b"room again")
    assert outbox.depth() == 50


def test_seq_and_message_commit_together_or_not_at_all(outbox):
    with outbox.transaction() as tx:
        seq = tx.next_seq()
        tx.put("t", json.dumps({"seq": seq}).encode())
    with pytest.raises(RuntimeError):
        with outbox.transaction() as tx:
            tx.next_seq()
            tx.put("t", b"never")
            raise RuntimeError("scoring failed half way")
    assert outbox.last_seq() == seq
    assert [m.payload for m in outbox.pending(10)] == [json.dumps({"seq": seq}).encode()]


def test_seq_persists_across_reopen_and_never_repeats(tmp_path):
    path = tmp_path / "outbox.db"
    seen = []
    for _ in range(3):
        with Outbox(path) as box:
            seen += [box.next_seq() for _ in range(4)]
    assert seen == list(range(1, 13))


def test_disk_full_raises_a_specific_error(outbox):
    outbox.put("t", b"fits")
    # SQLite's own page limit gives the same SQLITE_FULL a full filesystem does.
    pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
    outbox._db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(OutboxDiskError, match="disk is full"):
        outbox.put_many([("t", b"x" * 4096, 1, False)] * 20)
    assert outbox.depth() == 1  # the failed batch left nothing behind
    assert [m.payload for m in outbox.pending(5)] == [b"fits"]


WRITER = textwrap.dedent("""
    import sys
    from station.runtime.mqtt.outbox import Outbox
    box = Outbox(sys.argv[1], max_messages=10**9)
    while True:
        with box.transaction() as tx:
            seq = tx.next_seq()
            tx.put("t", str(seq).encode())
            tx.put("t", str(seq).encode())  # two rows per seq: a torn transaction would show
        print(seq, flush=True)
""")


def test_a_killed_writer_leaves_a_consistent_database(tmp_path):
    path = tmp_path / "outbox.db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        committed = [int(writer.stdout.readline()) for _ in range(150)]
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
    assert writer.returncode == -signal.SIGKILL
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Outbox(path) as box:
        payloads = [int(m.payload) for m in box.pending(10**6)]
        last = box.last_seq()
        assert last >= committed[-1]  # nothing reported as committed was lost
        assert payloads == [seq for seq in range(1, last + 1) for _ in (0, 1)]  # whole transactions only
        assert box.depth() == len(payloads)
        assert box.next_seq() == last + 1


def test_the_file_shrinks_after_a_backlog_and_old_outboxes_are_migrated(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    from station.runtime.mqtt.outbox import SCHEMA

    with sqlite3.connect(path) as db:  # an outbox made before incremental auto-vacuum
        db.executescript(SCHEMA)
        db.execute("INSERT INTO messages (topic, payload, qos, retain, created) VALUES ('t', x'00', 1, 0, 0)")
    with Outbox(path) as box:
        assert box._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert [m.payload for m in box.pending()] == [b"\0"]  # the message survived the migration
        box.ack(*[m.id for m in box.pending()])
        for _ in range(20):  # 20,000 messages
            box.put_many([("t", bytes(1024), 1, False)] * 1000)
        backlog = path.stat().st_size + (tmp_path / "old.sqlite3-wal").stat().st_size
        while pending := box.pending(2000):
            box.ack(*[m.id for m in pending])
        assert box.depth() == 0
        after = path.stat().st_size + (tmp_path / "old.sqlite3-wal").stat().st_size
    assert backlog > 20_000_000 and after < backlog / 10, (backlog, after)


# -- the seq mark (STATE/seq): seq never goes back when the outbox is lost


def test_the_seq_mark_is_reserved_ahead_and_exact_after_a_clean_stop(tmp_path):
    from station.runtime.mqtt.seq_mark import RESERVE

    mark = tmp_path / "seq"
    with Outbox(tmp_path / "outbox.sqlite3", seq_mark=mark) as outbox:
        assert mark.read_text() == f"{RESERVE} reserved\n"  # before the first seq is used
        for _ in range(3):
            with outbox.transaction() as tx:
                tx.next_seqs(RESERVE // 2)
        assert mark.read_text() == f"{RESERVE + RESERVE * 3 // 2} reserved\n"  # one write per block, ahead of use
    assert mark.read_text() == f"{RESERVE * 3 // 2} last\n"
    (tmp_path / "outbox.sqlite3").unlink()
    with Outbox(tmp_path / "outbox.sqlite3", seq_mark=mark) as outbox:
        assert outbox.next_seq() == RESERVE * 3 // 2 + 1


def test_a_damaged_or_unwritable_seq_mark_is_said_and_verdicts_are_still_stored(tmp_path, caplog):
    mark = tmp_path / "seq"
    mark.write_bytes(b"\xff\x00 garbage")
    with Outbox(tmp_path / "outbox.sqlite3", seq_mark=mark) as outbox:
        assert "seq: ignored: " in caplog.text and "is not UTF-8 text" in caplog.text
        assert "holds no seq: seq starts at 1" in caplog.text
        assert outbox.next_seq() == 1 and mark.read_text().endswith(" reserved\n")  # rewritten
    mark.unlink()
    mark.mkdir()  # a folder in its place: the mark cannot be written
    with Outbox(tmp_path / "outbox.sqlite3", seq_mark=mark) as outbox:
        with outbox.transaction() as tx:
            assert list(tx.next_seqs(2)) == [2, 3]
            tx.put("t", b"stored all the same")
        assert outbox.depth() == 1
        assert "cannot be written" in outbox.seq_mark.problem and "used again" in outbox.seq_mark.problem
