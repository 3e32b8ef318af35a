import numpy as np

from station.runtime.crops import CropKeeper


def test_ng_crops_are_kept_by_verdict_id_and_the_folder_stays_bounded(tmp_path):
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (26, 36), dtype=np.uint8) for _ in range(60)]  # noise: ~1 KiB as PNG
    keeper = CropKeeper(tmp_path / "crops", keep_ng=True, ok_sample_rate=0.0, max_bytes=20_000)
    assert keeper.wants("NG") and not keeper.wants("OK")
    for index, crop in enumerate(crops):
        keeper.keep(crop, "NG", f"id-{index:03d}")
    keeper.close()
    kept = sorted(p.name for p in (tmp_path / "crops" / "NG").iterdir())
    total = sum(p.stat().st_size for p in (tmp_path / "crops" / "NG").iterdir())
    assert total <= 20_000 and 5 < len(kept) < 60
    assert kept[-1] == "id-059.png" and "id-000.png" not in kept  # the oldest went first
    # A restart counts what is already there against the bound.
    keeper = CropKeeper(tmp_path / "crops", keep_ng=True, ok_sample_rate=0.0, max_bytes=20_000)
    keeper.keep(crops[0], "NG", "id-new")
    keeper.close()
    assert sum(p.stat().st_size for p in (tmp_path / "crops" / "NG").iterdir()) <= 20_000


def test_a_sample_of_ok_crops_and_nothing_when_the_bound_is_zero(tmp_path):
    sampled = CropKeeper(tmp_path / "a", keep_ng=False, ok_sample_rate=0.25, max_bytes=10**6, seed=1)
    share = np.mean([sampled.wants("OK") for _ in range(4000)])
    assert 0.22 < share < 0.28 and not sampled.wants("NG")
    assert not CropKeeper(tmp_path / "b", keep_ng=True, ok_sample_rate=1.0, max_bytes=0).wants("NG")


def test_crops_never_take_the_outbox_s_reserve_of_free_disk(tmp_path, monkeypatch, caplog):
    """The state folder's disk is shared with the outbox: a crop that would leave less than the reserve
    free is not written, counted and logged once, and writing resumes when there is room."""
    import shutil

    from station.runtime import crops

    crop = np.random.default_rng(1).integers(0, 256, (26, 36), dtype=np.uint8)
    free = shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(crops, "FREE_SPACE_RESERVE", free + (1 << 30))  # more than this disk has free
    keeper = CropKeeper(tmp_path / "crops", keep_ng=True, ok_sample_rate=0.0, max_bytes=10**9)
    for index in range(5):
        keeper.keep(crop, "NG", f"id-{index}")
    keeper.close()
    assert keeper.failed == 5 and not list((tmp_path / "crops").glob("*/*.png"))
    assert sum("free for the outbox" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(crops, "FREE_SPACE_RESERVE", 0)
    keeper = CropKeeper(tmp_path / "crops", keep_ng=True, ok_sample_rate=0.0, max_bytes=10**9)
    keeper.keep(crop, "NG", "id-later")
    keeper.close()
    assert [p.name for p in (tmp_path / "crops" / "NG").iterdir()] == ["id-later.png"]
