import cv2
import numpy as np
import pytest

from station.core.errors import DataError, ImageReadError
from station.core.imagefolder import dataset_fingerprint, list_images, read_image, scan_dataset


def _write(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)


def test_scan_labels_by_folder_recursively_and_in_order(tmp_path):
    img = np.full((10, 12), 100, np.uint8)
    _write(tmp_path / "good" / "b.png", img)
    _write(tmp_path / "good" / "sub" / "a.jpg", img)
    _write(tmp_path / "crack" / "c.bmp", img)
    (tmp_path / "good" / "notes.txt").write_text("not an image")
    items = scan_dataset(tmp_path)
    assert [(i.path.relative_to(tmp_path).as_posix(), i.defect_class) for i in items] == [
        ("crack/c.bmp", "crack"),
        ("good/b.png", "good"),
        ("good/sub/a.jpg", "good"),
    ]
    assert [i.is_defect for i in items] == [True, False, False]


def test_missing_good_folder_and_empty_folders_are_named(tmp_path):
    _write(tmp_path / "crack" / "c.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="good"):
        scan_dataset(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="not a folder"):
        list_images(tmp_path / "nope")


def test_hidden_files_and_folders_are_neither_parts_nor_classes(tmp_path):
    """A folder copied from a Mac or a notebook: ._* resource forks (not images, were refused as
    unreadable), .thumbnails and .ipynb_checkpoints (were read as a class or as parts), __MACOSX."""
    img = np.full((10, 12), 100, np.uint8)
    _write(tmp_path / "good" / "a.png", img)
    _write(tmp_path / "crack" / "c.png", img)
    resource_fork = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60)
    (tmp_path / "good" / "._a.png").write_bytes(resource_fork)
    (tmp_path / "__MACOSX" / "good").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "good" / "._a.png").write_bytes(resource_fork)
    _write(tmp_path / ".thumbnails" / "a.png", img)
    _write(tmp_path / "good" / ".ipynb_checkpoints" / "b.png", img)
    items = scan_dataset(tmp_path)
    assert [(i.path.relative_to(tmp_path).as_posix(), i.defect_class) for i in items] == [
        ("crack/c.png", "crack"),
        ("good/a.png", "good"),
    ]
    assert list_images(tmp_path / "good") == [tmp_path / "good" / "a.png"]
    hidden_root = tmp_path / ".cache" / "parts"  # a dataset inside a hidden folder is still read
    _write(hidden_root / "good" / "a.png", img)
    assert [i.path for i in scan_dataset(hidden_root)] == [hidden_root / "good" / "a.png"]


def test_a_dataset_without_good_images_is_refused_with_what_to_change(tmp_path):
    img = np.full((10, 12), 100, np.uint8)
    _write(tmp_path / "webp" / "good" / "a.png", img)
    (tmp_path / "webp" / "good" / "a.png").rename(tmp_path / "webp" / "good" / "a.webp")
    _write(tmp_path / "cased" / "Good" / "a.png", img)
    _write(tmp_path / "inside" / "good" / "a.png", img)
    (tmp_path / "empty" / "good").mkdir(parents=True)
    (tmp_path / "afile").write_text("x")
    for data, hint in (
        (tmp_path / "webp", "it holds .webp files, the station reads .bmp"),
        (tmp_path / "cased", "rename " + str(tmp_path / "cased" / "Good") + "/ to good/"),
        (tmp_path / "inside" / "good", "holds images itself: --data takes the folder that holds good/"),
        (tmp_path / "empty", "good/ (known-good parts are required); it is empty"),
        (tmp_path / "nothing", "dataset folder does not exist"),
        (tmp_path / "afile", "not a folder (give the folder that holds good/"),
    ):
        with pytest.raises(DataError) as err:
            scan_dataset(data)
        assert str(data) in str(err.value) and hint in str(err.value), str(err.value)


def test_linked_folders_inside_a_class_are_read_once_and_a_link_back_up_does_not_loop(tmp_path):
    """good/batch2 -> elsewhere was skipped without a word (Path.rglob does not follow links), while a
    linked class folder was read."""
    img = np.full((10, 12), 100, np.uint8)
    _write(tmp_path / "data" / "good" / "a.png", img)
    _write(tmp_path / "elsewhere" / "b.png", img)
    (tmp_path / "data" / "good" / "batch2").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "data" / "good" / "again").symlink_to(tmp_path / "elsewhere")  # the same folder twice: once
    (tmp_path / "data" / "good" / "loop").symlink_to(tmp_path / "data" / "good")
    (tmp_path / "data" / "crack").symlink_to(tmp_path / "elsewhere")
    items = scan_dataset(tmp_path / "data")
    assert [(i.path.relative_to(tmp_path / "data").as_posix(), i.defect_class) for i in items] == [
        ("crack/b.png", "crack"),
        ("good/a.png", "good"),
        ("good/again/b.png", "good"),
    ]


def test_unreadable_images_name_the_file(tmp_path):
    truncated = tmp_path / "truncated.png"
    ok, data = cv2.imencode(".png", np.zeros((20, 20), np.uint8))
    truncated.write_bytes(data.tobytes()[:30])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path, reason in ((truncated, "cannot be decoded"), (empty, "empty"), (tmp_path / "gone.png", "cannot be read")):
        with pytest.raises(ImageReadError, match=reason) as err:
            read_image(path)
        assert str(path) in str(err.value)


def test_read_keeps_16_bit_and_colour(tmp_path):
    sixteen = np.full((5, 6), 40000, np.uint16)
    _write(tmp_path / "s.png", sixteen)
    assert read_image(tmp_path / "s.png").dtype == np.uint16
    _write(tmp_path / "c.png", np.zeros((5, 6, 3), np.uint8))
    assert read_image(tmp_path / "c.png").shape == (5, 6, 3)


def test_fingerprint_changes_with_content(tmp_path):
    _write(tmp_path / "good" / "a.png", np.zeros((4, 4), np.uint8))
    before = dataset_fingerprint(scan_dataset(tmp_path), tmp_path)
    assert before == dataset_fingerprint(scan_dataset(tmp_path), tmp_path)
    _write(tmp_path / "good" / "a.png", np.ones((4, 4), np.uint8))
    assert dataset_fingerprint(scan_dataset(tmp_path), tmp_path) != before


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
def test_the_pixel_count_comes_from_the_header_of_every_common_format(ext):
    from station.core.imagefolder import pixel_count

    ok, encoded = cv2.imencode(ext, np.zeros((123, 457), np.uint8))
    assert ok and pixel_count(encoded.reshape(-1)) == 123 * 457
    assert pixel_count(np.frombuffer(b"not an image at all", np.uint8)) is None


def test_float_and_32_bit_images_are_refused_by_name_not_with_a_traceback(tmp_path):
    """A float or 32-bit TIFF decodes, but no step can use it: `station fit`'s data check crashed in
    numpy (ValueError: Invalid integer data type 'f'), `station train` refused without naming the file."""
    from fit.data_check import check_data

    for name, pixels in (
        ("float.tif", np.full((26, 36), 0.5, np.float32)),
        ("int32.tif", np.full((26, 36), 70000, np.int32)),
    ):
        _write(tmp_path / "good" / name, pixels)
        with pytest.raises(ImageReadError, match="8- or 16-bit") as err:
            read_image(tmp_path / "good" / name)
        assert name in str(err.value)
    _write(tmp_path / "good" / "fine.png", np.zeros((26, 36), np.uint16))
    with pytest.raises(DataError, match="2 image") as err:
        check_data(tmp_path)
    assert "float.tif: has float32 pixels" in str(err.value) and "int32.tif: has int32 pixels" in str(err.value)
