"""caffe.io: BVLC python/caffe/test/test_io.py ported, plus resize_image against closed forms of
scikit-image 0.13's resize (the one pycaffe used), load_image, oversample, Transformer and the
blob/datum converters against hand-built values."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

import caffeport.compat as caffe
from caffeport.errors import CaffeportError

pb2 = caffe.proto.caffe_pb2


# --- BVLC python/caffe/test/test_io.py -----------------------------------------------------------

def test_old_format() -> None:
    data = np.zeros((10, 10))
    blob = pb2.BlobProto()
    blob.data.extend(list(data.flatten()))
    shape = (1, 1, 10, 10)
    blob.num, blob.channels, blob.height, blob.width = shape
    assert caffe.io.blobproto_to_array(blob).shape == shape


def test_new_format() -> None:
    data = np.zeros((10, 10))
    blob = pb2.BlobProto()
    blob.data.extend(list(data.flatten()))
    blob.shape.dim.extend(list(data.shape))
    assert caffe.io.blobproto_to_array(blob).shape == data.shape


def test_no_shape() -> None:
    blob = pb2.BlobProto()
    blob.data.extend(list(np.zeros((10, 10)).flatten()))
    with pytest.raises(ValueError):
        caffe.io.blobproto_to_array(blob)


def test_scalar() -> None:
    blob = pb2.BlobProto()
    blob.data.extend(list((np.ones(1) * 123).flatten()))
    assert caffe.io.blobproto_to_array(blob) == 123


def test_label_none_size() -> None:
    d1 = caffe.io.array_to_datum(np.ones((10, 10, 3)), label=1)
    d2 = caffe.io.array_to_datum(np.ones((10, 10, 3)))
    assert len(d1.SerializeToString()) > len(d2.SerializeToString())


# --- converters ------------------------------------------------------------------------------------

def test_blobproto_arrays_are_float64_and_diff() -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3) / 3
    blob = caffe.io.array_to_blobproto(arr, diff=-arr)
    got = caffe.io.blobproto_to_array(blob)
    assert got.dtype == np.float64 and got.shape == (2, 3)
    np.testing.assert_array_equal(got, arr.astype(np.float64))
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob, return_diff=True), -arr)
    with pytest.raises(CaffeportError, match="do not fit"):
        bad = pb2.BlobProto()
        bad.data.extend([1.0, 2.0])
        bad.num = 3
        caffe.io.blobproto_to_array(bad)


def test_blobprotovector_round_trip() -> None:
    arrays = [np.arange(4.0).reshape(2, 2), np.ones((1, 2, 3)) * 0.5]
    s = caffe.io.arraylist_to_blobprotovector_str(arrays)
    assert isinstance(s, bytes)
    vec = pb2.BlobProtoVector()
    vec.ParseFromString(s)
    assert [list(b.shape.dim) for b in vec.blobs] == [[2, 2], [1, 2, 3]]
    assert list(vec.blobs[0].data) == [0.0, 1.0, 2.0, 3.0]
    back = caffe.io.blobprotovector_str_to_arraylist(s)
    for a, b in zip(arrays, back):
        np.testing.assert_array_equal(a, b)


def test_datum_round_trip() -> None:
    u8 = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    d = caffe.io.array_to_datum(u8, label=7)
    assert (d.channels, d.height, d.width, d.label) == (2, 3, 4, 7) and d.data == u8.tobytes()
    assert len(d.float_data) == 0
    back = caffe.io.datum_to_array(d)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, u8)
    f = caffe.io.array_to_datum(u8.astype(np.float64) / 2)
    assert len(f.data) == 0 and list(f.float_data)[:3] == [0.0, 0.5, 1.0]
    np.testing.assert_array_equal(caffe.io.datum_to_array(f), u8 / 2)
    with pytest.raises(ValueError, match="Incorrect array shape"):
        caffe.io.array_to_datum(np.zeros((3, 4)))


# --- resize_image: closed forms of scikit-image 0.13's resize ---------------------------------------

# 2 -> 4 bilinear: sample rows at -0.25, 0.25, 0.75, 1.25; outside rows are 0 after normalisation
UP2 = np.array([[0.75, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 0.75]])
DOWN2 = np.array([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])  # 4 -> 2: samples at 0.5 and 2.5


def test_resize_bilinear_up_matches_closed_form() -> None:
    img = np.array([[2.0, 4.0], [6.0, 10.0]], np.float32)[:, :, None]
    norm = (img[:, :, 0] - 2) / 8
    want = 2 + 8 * (UP2 @ norm @ UP2.T)
    got = caffe.io.resize_image(img, (4, 4))
    assert got.shape == (4, 4, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, :, 0], want, rtol=1e-6)


def test_resize_bilinear_down_rgb() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((4, 4, 3)).astype(np.float32)
    got = caffe.io.resize_image(img, (2, 2))
    lo, hi = img.min(), img.max()
    for c in range(3):
        want = lo + (hi - lo) * (DOWN2 @ ((img[:, :, c] - lo) / (hi - lo)) @ DOWN2.T)
        np.testing.assert_allclose(got[:, :, c], want, rtol=1e-5, atol=1e-7)


def test_resize_nearest_rounds_half_away_from_zero() -> None:
    img = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    got = caffe.io.resize_image(img, (2, 2), interp_order=0)  # samples at 0.5 -> 1 and 2.5 -> 3
    np.testing.assert_array_equal(got[:, :, 0], img[[1, 3]][:, [1, 3], 0])
    up = caffe.io.resize_image(img[:2, :2], (4, 4), interp_order=0)  # -0.25, 0.25, 0.75, 1.25 -> 0, 0, 1, 1
    np.testing.assert_array_equal(up[:, :, 0], img[[0, 0, 1, 1]][:, [0, 0, 1, 1], 0])


def test_resize_constant_and_other_channel_counts() -> None:
    const = np.full((3, 5, 3), 0.25, np.float32)
    np.testing.assert_array_equal(caffe.io.resize_image(const, (7, 2)), np.full((7, 2, 3), 0.25, np.float32))
    two = np.array([[[0.0, 10.0], [4.0, 2.0]]], np.float32)  # 1 x 2 x 2 channels: zoomed corner-aligned
    got = caffe.io.resize_image(two, (1, 3))
    np.testing.assert_allclose(got[0], [[0.0, 10.0], [2.0, 6.0], [4.0, 2.0]])


# --- load_image, oversample ------------------------------------------------------------------------

def test_load_image_color_grey_alpha(tmp_path: Path) -> None:
    rgb = np.array([[[255, 0, 0], [0, 128, 255]]], np.uint8)  # one row: red, (0,128,255)
    cv2.imwrite(str(tmp_path / "c.png"), rgb[:, :, ::-1])  # OpenCV writes BGR
    im = caffe.io.load_image(str(tmp_path / "c.png"))
    assert im.shape == (1, 2, 3) and im.dtype == np.float32
    np.testing.assert_allclose(im, rgb / 255.0, rtol=1e-6)
    grey = caffe.io.load_image(str(tmp_path / "c.png"), color=False)
    assert grey.shape == (1, 2, 1)
    np.testing.assert_allclose(grey[..., 0], (rgb / 255.0) @ [0.2125, 0.7154, 0.0721], rtol=1e-5)
    g = np.array([[0, 51], [102, 255]], np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), g)
    im = caffe.io.load_image(str(tmp_path / "g.png"))
    assert im.shape == (2, 2, 3)
    np.testing.assert_allclose(im, np.repeat((g / 255.0)[:, :, None], 3, axis=2), rtol=1e-6)
    np.testing.assert_allclose(caffe.io.load_image(str(tmp_path / "g.png"), color=False)[..., 0], g / 255.0,
                               rtol=1e-6)
    rgba = np.concatenate([rgb[:, :, ::-1], np.full((1, 2, 1), 7, np.uint8)], axis=2)
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    np.testing.assert_allclose(caffe.io.load_image(str(tmp_path / "a.png")), rgb / 255.0, rtol=1e-6)
    with pytest.raises(CaffeportError, match="cannot read image"):
        caffe.io.load_image(str(tmp_path / "missing.png"))


def test_oversample_crops() -> None:
    im = np.arange(6 * 8 * 2, dtype=np.float32).reshape(6, 8, 2)
    crops = caffe.io.oversample([im, im + 1000], (4, 4))
    assert crops.shape == (20, 4, 4, 2)
    corners = [(0, 0), (0, 4), (2, 0), (2, 4), (1, 2)]  # four corners, then the centre
    for k, base in enumerate([im, im + 1000]):
        for j, (y, x) in enumerate(corners):
            window = base[y:y + 4, x:x + 4]
            np.testing.assert_array_equal(crops[10 * k + j], window)
            np.testing.assert_array_equal(crops[10 * k + 5 + j], window[:, ::-1])


# --- Transformer -----------------------------------------------------------------------------------

def test_transformer_full_pipeline_and_input_untouched() -> None:
    rng = np.random.default_rng(1)
    img = rng.random((2, 2, 3)).astype(np.float32)
    before = img.copy()
    t = caffe.io.Transformer({"data": (1, 3, 4, 4)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.array([10.0, 20.0, 30.0]))
    t.set_input_scale("data", 0.5)
    got = t.preprocess("data", img)
    np.testing.assert_array_equal(img, before)
    lo, hi = img.min(), img.max()
    resized = np.stack([lo + (hi - lo) * (UP2 @ ((img[:, :, c] - lo) / (hi - lo)) @ UP2.T) for c in range(3)])
    want = (resized[::-1] * 255.0 - np.array([10.0, 20.0, 30.0])[:, None, None]) * 0.5
    assert got.shape == (3, 4, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    back = t.deprocess("data", got)
    np.testing.assert_allclose(back, resized.transpose(1, 2, 0), rtol=1e-5, atol=1e-6)


def test_transformer_mean_image_resized_and_errors() -> None:
    t = caffe.io.Transformer({"data": (1, 1, 4, 4)})
    mean = np.array([[[2.0, 4.0], [6.0, 10.0]]])  # 1 x 2 x 2 mean image for a 4 x 4 input
    t.set_mean("data", mean)
    np.testing.assert_allclose(t.mean["data"][0], 2 + 8 * (UP2 @ ((mean[0] - 2) / 8) @ UP2.T), rtol=1e-6)
    with pytest.raises(ValueError, match="Mean channels incompatible"):
        t.set_mean("data", np.zeros(3))
    with pytest.raises(ValueError, match="Mean shape invalid"):
        t.set_mean("data", np.zeros((1, 1, 2, 2)))
    with pytest.raises(CaffeportError, match="not one of the net inputs"):
        t.set_raw_scale("label", 1.0)
    with pytest.raises(CaffeportError, match="Transpose order"):
        t.set_transpose("data", (1, 0))
    with pytest.raises(CaffeportError, match="Channel swap"):
        t.set_channel_swap("data", (2, 1, 0))
