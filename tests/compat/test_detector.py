"""caffe.Detector (BVLC python/caffe/detector.py) on a small stand-in net: windows warped to the
input, preprocessed and classified, checked against numpy; R-CNN context padding against
hand-worked boxes; the Selective Search path's error."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

import caffeport.compat as caffe
from caffeport.errors import CaffeportError

NET = """
name: "det"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 4 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
MEAN = np.array([10.0, 20.0, 30.0])
UP3 = np.array([[0.75, 0, 0], [0.75, 0.25, 0], [0.25, 0.75, 0], [0, 0.75, 0.25], [0, 0.25, 0.75], [0, 0, 0.75]])


@pytest.fixture()
def files(tmp_path: Path) -> dict:
    model = tmp_path / "deploy.prototxt"
    model.write_text(NET)
    net = caffe.Net(str(model), caffe.TEST)
    rng = np.random.default_rng(0)
    w = rng.normal(scale=0.01, size=(4, 108)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    net.params["fc"][0].data[...] = w
    net.params["fc"][1].data[...] = b
    net.save(str(tmp_path / "w.caffemodel"))
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "img.png"), rgb[:, :, ::-1])
    return {"model": str(model), "weights": str(tmp_path / "w.caffemodel"), "w": w, "b": b,
            "image": str(tmp_path / "img.png"), "rgb": rgb.astype(np.float64) / 255}


def _predict(files: dict, window_rgb: np.ndarray) -> np.ndarray:
    """Transformer by hand (transpose, RGB->BGR, x255, minus mean), then InnerProduct + Softmax."""
    x = window_rgb.transpose(2, 0, 1)[::-1] * 255 - MEAN[:, None, None]
    s = files["w"].astype(np.float64) @ x.ravel() + files["b"]
    e = np.exp(s - s.max())
    return e / e.sum()


def test_detect_windows_matches_numpy(files: dict) -> None:
    det = caffe.Detector(files["model"], files["weights"], mean=MEAN, raw_scale=255, channel_swap=(2, 1, 0))
    assert isinstance(det, caffe.Net)
    windows = [np.array([0, 0, 6, 6]), np.array([4, 5, 10, 11]), np.array([1, 2, 4, 5])]
    dets = det.detect_windows([(files["image"], windows)])
    assert [d["filename"] for d in dets] == [files["image"]] * 3
    assert all(d["window"] is w for d, w in zip(dets, windows))
    rgb = files["rgb"]
    crops = [rgb[0:6, 0:6], rgb[4:10, 5:11]]
    small = rgb[1:4, 2:5]  # 3x3 window warped to 6x6 (scikit-image 0.13 bilinear, as pycaffe)
    lo, hi = small.min(), small.max()
    crops.append(np.stack([lo + (hi - lo) * (UP3 @ ((small[:, :, c] - lo) / (hi - lo)) @ UP3.T)
                           for c in range(3)], axis=2))
    for d, crop in zip(dets, crops):
        np.testing.assert_allclose(d["prediction"], _predict(files, crop), rtol=1e-4, atol=1e-6)


def test_context_pad_crops(files: dict) -> None:
    det = caffe.Detector(files["model"], files["weights"], mean=MEAN, raw_scale=255, channel_swap=(2, 1, 0),
                         context_pad=1)
    assert list(det.crop_dims) == [6, 6, 3]
    # mean in unprocessed space: RGB order, /raw_scale
    np.testing.assert_allclose(det.crop_mean.reshape(3), MEAN[::-1] / 255)
    im = np.arange(10 * 10 * 3, dtype=np.float32).reshape(10, 10, 3) / 300
    # window 2..5: centre 4, half 2 -> scaled by 6/4 to 1..7 (7 px), warped 7 -> 6 px: box rows 1:7
    np.testing.assert_allclose(det.crop(im, np.array([2, 2, 5, 5])), im[1:7, 1:7], rtol=1e-6)
    # window 0..3 grows to -1..5: one row/column out of the image -> pad round(1 * 6/7) = 1 of mean,
    # the clipped 0..5 box (6 px) scales to round(6 * 6/7) = 5 px
    got = det.crop(im, np.array([0, 0, 3, 3]))
    assert got.shape == (6, 6, 3)
    np.testing.assert_allclose(got[1:, 1:], im[0:5, 0:5], rtol=1e-6)
    np.testing.assert_allclose(got[0, :], np.broadcast_to(MEAN[::-1] / 255, (6, 3)), rtol=1e-6)
    np.testing.assert_allclose(got[:, 0], np.broadcast_to(MEAN[::-1] / 255, (6, 3)), rtol=1e-6)
    # the mean padding preprocesses to zero, as R-CNN intends
    pre = det.transformer.preprocess("data", got)
    np.testing.assert_allclose(pre[:, 0, :], 0, atol=1e-4)


def test_no_context_crop_is_a_slice(files: dict) -> None:
    det = caffe.Detector(files["model"], files["weights"])
    im = np.random.default_rng(1).random((8, 9, 3)).astype(np.float32)
    np.testing.assert_array_equal(det.crop(im, np.array([1, 2, 5, 8])), im[1:5, 2:8])
    assert det.context_pad is None and list(det.crop_dims) == [6, 6, 3]


def test_selective_search_needs_its_package(files: dict) -> None:
    det = caffe.Detector(files["model"], files["weights"])
    with pytest.raises(CaffeportError, match="selective_search_ijcv_with_python"):
        det.detect_selective_search([files["image"]])
