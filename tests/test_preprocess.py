import cv2
import numpy as np
import pytest

from station.core.errors import DataError, RoiError
from station.core.preprocess import InputSpec, Roi, crop, prepare_crop, to_gray8
from tests.onnx_models import model_input

SPEC = InputSpec()


def test_default_model_input_is_36_wide_26_high_flat():
    assert (SPEC.width, SPEC.height, SPEC.layout) == (36, 26, "flat")
    assert SPEC.sample_shape == (936,)
    assert InputSpec(layout="nchw").sample_shape == (1, 26, 36)


def test_roi_crop_then_scale_and_layout():
    frame = np.zeros((240, 320), np.uint8)
    frame[107:133, 142:178] = np.arange(36, dtype=np.uint8)[None, :]  # the part
    roi = Roi(142, 107, 36, 26)
    flat = model_input([frame], SPEC, roi)
    assert flat.shape == (1, 936) and flat.dtype == np.float32
    np.testing.assert_allclose(flat[0, :36], np.arange(36) / 255.0, rtol=1e-6)
    nchw = model_input([frame, frame], InputSpec(layout="nchw"), roi)
    assert nchw.shape == (2, 1, 26, 36)
    np.testing.assert_array_equal(nchw[1].reshape(-1), flat[0])


def test_colour_and_16_bit_images_give_the_same_gray_input():
    gray = np.random.default_rng(0).integers(0, 256, (26, 36), dtype=np.uint8)
    bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    bgra = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGRA)
    sixteen = gray.astype(np.uint16) * 257
    outs = [model_input([img], SPEC) for img in (gray, bgr, bgra, sixteen, gray[:, :, None])]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_other_sizes_are_resized_with_inter_area():
    big = np.random.default_rng(1).integers(0, 256, (260, 360), dtype=np.uint8)
    expected = cv2.resize(big, (36, 26), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(prepare_crop(big, SPEC), expected)


def test_roi_outside_the_frame_is_a_clear_error():
    with pytest.raises(RoiError, match="does not fit in a 320x240 frame"):
        crop(np.zeros((240, 320), np.uint8), Roi(300, 0, 36, 26))
    with pytest.raises(RoiError):
        Roi(-1, 0, 36, 26)


def test_unusable_images_are_refused_with_the_reason():
    with pytest.raises(DataError, match="not an image"):
        prepare_crop(np.zeros((0, 0), np.uint8), SPEC)
    with pytest.raises(DataError, match="float64"):
        to_gray8(np.zeros((4, 4)))
    with pytest.raises(DataError, match="2 channels"):
        to_gray8(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(DataError, match="layout"):
        InputSpec(layout="nhwc")
