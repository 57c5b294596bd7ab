"""DataTransformer against an element-by-element reference written from Caffe's index formula."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffeport.data.transformer import DataTransformer
from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def _ref(img, mean, mean_values, scale, crop, h_off, w_off, mirror):
    """Caffe's loop: out[top_index] = (pixel[data_index] - mean[data_index or c]) * scale, float32."""
    c_n, h_n, w_n = img.shape
    hh, ww = (crop, crop) if crop else (h_n, w_n)
    out = np.zeros((c_n, hh, ww), np.float32)
    s = np.float32(scale)
    for c in range(c_n):
        for h in range(hh):
            for w in range(ww):
                px = np.float32(img[c, h_off + h, w_off + w])
                tw = ww - 1 - w if mirror else w
                if mean is not None:
                    v = np.float32(np.float32(px - np.float32(mean[c, h_off + h, w_off + w])) * s)
                elif mean_values is not None:
                    mv = mean_values[0] if len(mean_values) == 1 else mean_values[c]
                    v = np.float32(np.float32(px - np.float32(mv)) * s)
                else:
                    v = np.float32(px * s)
                out[c, h, tw] = v
    return out


def _mean_file(tmp: Path, mean: np.ndarray) -> Path:
    bp = caffe_pb2.BlobProto()
    bp.num, bp.channels, bp.height, bp.width = 1, *mean.shape
    bp.data.extend(mean.ravel().tolist())
    p = tmp / "mean.binaryproto"
    p.write_bytes(bp.SerializeToString())
    return p


def test_mean_file_cropped_at_same_offset_test_phase(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 9, 8), dtype=np.uint8)
    mean = rng.uniform(0, 255, (3, 9, 8)).astype(np.float32)
    tp = caffe_pb2.TransformationParameter(mean_file="mean.binaryproto", crop_size=5, scale=0.017)
    tf = DataTransformer(tp, TEST, _mean_file(tmp_path, mean))
    got = tf.transform(img)
    want = _ref(img, mean, None, 0.017, 5, (9 - 5) // 2, (8 - 5) // 2, False)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("values", [[100.0], [104.0, 117.0, 123.0]])
def test_mean_values_scale_mirror(values: list[float]) -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (3, 6, 7), dtype=np.uint8)
    tp = caffe_pb2.TransformationParameter(mean_value=values, scale=0.00390625, mirror=True)
    tf = DataTransformer(tp, TEST, rng=np.random.default_rng(5))
    draws = np.random.default_rng(5)
    for _ in range(6):
        mirror = bool(draws.integers(2))
        np.testing.assert_array_equal(tf.transform(img), _ref(img, None, values, 0.00390625, 0, 0, 0, mirror))


def test_no_mean_float_data_scale() -> None:
    img = np.random.default_rng(2).normal(size=(2, 4, 4)).astype(np.float32)
    tf = DataTransformer(caffe_pb2.TransformationParameter(scale=0.3), TEST)
    np.testing.assert_array_equal(tf.transform(img), _ref(img, None, None, 0.3, 0, 0, 0, False))


def test_train_crop_offsets_cover_range_and_match_reference() -> None:
    img = np.arange(1 * 6 * 6, dtype=np.uint8).reshape(1, 6, 6)
    tf = DataTransformer(caffe_pb2.TransformationParameter(crop_size=4), TRAIN, rng=np.random.default_rng(3))
    seen = set()
    for _ in range(200):
        out = tf.transform(img)
        h_off, w_off = int(out[0, 0, 0]) // 6, int(out[0, 0, 0]) % 6
        seen.add((h_off, w_off))
        np.testing.assert_array_equal(out, _ref(img, None, None, 1.0, 4, h_off, w_off, False))
    assert seen == {(h, w) for h in range(3) for w in range(3)}


def test_errors_name_mean_file_and_shapes(tmp_path: Path) -> None:
    mean = np.zeros((3, 4, 4), np.float32)
    tp = caffe_pb2.TransformationParameter(mean_file="mean.binaryproto")
    tf = DataTransformer(tp, TEST, _mean_file(tmp_path, mean), where="n.prototxt: layer 'data' (Data)")
    with pytest.raises(CaffeportError, match=r"mean\.binaryproto.*\(3, 4, 4\).*\(3, 5, 5\)") as e:
        tf.transform(np.zeros((3, 5, 5), np.uint8))
    assert "layer 'data'" in str(e.value)
    both = caffe_pb2.TransformationParameter(mean_file="mean.binaryproto", mean_value=[1.0])
    with pytest.raises(CaffeportError, match="mean_file and mean_value"):
        DataTransformer(both, TEST, tmp_path / "mean.binaryproto")
    with pytest.raises(CaffeportError, match="not found"):
        DataTransformer(tp, TEST, tmp_path / "missing.binaryproto")
    with pytest.raises(CaffeportError, match="2 mean_value"):
        DataTransformer(caffe_pb2.TransformationParameter(mean_value=[1, 2]), TEST).transform(
            np.zeros((3, 2, 2), np.uint8)
        )
    with pytest.raises(CaffeportError, match="crop_size 5"):
        DataTransformer(caffe_pb2.TransformationParameter(crop_size=5), TEST).transform(np.zeros((1, 4, 9), np.uint8))
