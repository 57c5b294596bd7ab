"""Mean files (.binaryproto), BlobProtoVector and the BlobProto helpers."""

from __future__ import annotations

import numpy as np
import pytest

from caffeport.errors import CaffeportError
from caffeport.io import (
    array_to_blobproto,
    blobproto_to_array,
    read_blobproto,
    read_blobproto_vector,
    write_blobproto,
    write_blobproto_vector,
)
from caffeport.proto import caffe_pb2
from tests.golden import CORPUS, GOLDEN

MEANS = sorted(CORPUS.rglob("*.binaryproto"))


@pytest.mark.parametrize("path", MEANS, ids=[str(p.relative_to(CORPUS)) for p in MEANS])
def test_corpus_means(path):
    arr = read_blobproto(path)
    ref = caffe_pb2.BlobProto.FromString(path.read_bytes())  # protobuf's own decode
    assert ref.num == 1 and arr.shape == (ref.channels, ref.height, ref.width)
    np.testing.assert_array_equal(arr.ravel(), np.asarray(ref.data, np.float32))


def test_golden_compute_image_mean():
    """The mean.binaryproto Caffe's compute_image_mean wrote equals the golden mean.npz."""
    hits = sorted(GOLDEN.glob("*/mean.binaryproto"))
    assert hits
    for p in hits:
        npz_path = p.with_name("mean.npz")
        if npz_path.exists():
            with np.load(npz_path) as d:
                ref = d[d.files[0]]
            got = read_blobproto(p)
            np.testing.assert_array_equal(got.reshape(ref.shape[-3:]), ref.reshape(ref.shape[-3:]))


def test_write_legacy_like_compute_image_mean(tmp_path):
    mean = np.random.default_rng(0).random((3, 4, 5), dtype=np.float32)
    p = tmp_path / "mean.binaryproto"
    write_blobproto(mean, p)
    ref = caffe_pb2.BlobProto.FromString(p.read_bytes())
    assert (ref.num, ref.channels, ref.height, ref.width) == (1, 3, 4, 5) and not ref.HasField("shape")
    np.testing.assert_array_equal(read_blobproto(p), mean)
    write_blobproto(mean, p, legacy=False)
    ref = caffe_pb2.BlobProto.FromString(p.read_bytes())
    assert list(ref.shape.dim) == [3, 4, 5] and not ref.HasField("num")
    np.testing.assert_array_equal(read_blobproto(p), mean)


def test_vector_roundtrip(tmp_path):
    arrs = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((1, 2, 2, 2), np.float32), np.float32(7)]
    p = tmp_path / "v.binaryproto"
    write_blobproto_vector(arrs, p)
    back = read_blobproto_vector(p)
    ref = caffe_pb2.BlobProtoVector.FromString(p.read_bytes())
    assert len(ref.blobs) == 3 and list(ref.blobs[0].shape.dim) == [2, 3]
    for a, b in zip(arrs, back):
        assert np.shape(a) == b.shape
        np.testing.assert_array_equal(a, b)


def test_helpers():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = array_to_blobproto(a)
    assert list(b.shape.dim) == [2, 3, 4] and list(b.data) == list(range(24))
    np.testing.assert_array_equal(blobproto_to_array(b), a)
    leg = array_to_blobproto(a, legacy=True)
    assert (leg.num, leg.channels, leg.height, leg.width) == (1, 2, 3, 4)
    assert blobproto_to_array(leg).shape == (1, 2, 3, 4)
    d = caffe_pb2.BlobProto(double_data=[0.1, 0.2])
    d.shape.dim.append(2)
    out = blobproto_to_array(d)
    assert out.dtype == np.float64 and out.tolist() == [0.1, 0.2]


def test_bad_binaryproto(tmp_path):
    p = tmp_path / "m.binaryproto"
    good = array_to_blobproto(np.ones((3, 2, 2), np.float32), legacy=True).SerializeToString()
    p.write_bytes(good[:-5])
    with pytest.raises(CaffeportError, match="m.binaryproto"):
        read_blobproto(p)
    p.write_bytes(b"")
    with pytest.raises(CaffeportError, match="m.binaryproto"):
        read_blobproto(p)
    with pytest.raises(CaffeportError, match="not found"):
        read_blobproto(tmp_path / "none.binaryproto")
