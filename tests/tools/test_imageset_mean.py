"""convert_imageset / compute_image_mean / feature datums on synthetic inputs vs independent references."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
from click.testing import CliRunner

from caffeport.cli import main
from caffeport.errors import CaffeportError
from caffeport.io.lmdb_store import LMDBWriter, array_to_datum
from caffeport.proto import caffe_pb2
from caffeport.tools import compute_image_mean, convert_imageset
from caffeport.tools.features import feature_datum


def _records(db: Path) -> list[tuple[str, caffe_pb2.Datum]]:
    env = lmdb.open(str(db), readonly=True, lock=False)
    out = []
    with env.begin() as txn:
        for k, v in txn.cursor():
            d = caffe_pb2.Datum()
            d.ParseFromString(v)
            out.append((bytes(k).decode(), d))
    env.close()
    return out


@pytest.fixture()
def images(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    (tmp_path / "img" / "sub").mkdir(parents=True)
    imgs = []
    for i in range(3):
        im = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "img" / "sub" / f"p{i}.png"), im)
        imgs.append(im)
    # line 1 names a missing file: Caffe skips it but its index is used up.
    (tmp_path / "list.txt").write_text("sub/p0.png 4\nsub/missing.png 9\nsub/p1.png 5\nsub/p2.png 6\n")
    return tmp_path, imgs


def test_raw_keys_skip_missing_and_pixels_are_bgr_chw(images) -> None:
    root, imgs = images
    n = convert_imageset(str(root / "img") + "/", root / "list.txt", root / "db", log=lambda m: None)
    assert n == 3
    recs = _records(root / "db")
    assert [k for k, _ in recs] == ["00000000_sub/p0.png", "00000002_sub/p1.png", "00000003_sub/p2.png"]
    for (_, d), im, lab in zip(recs, imgs, (4, 5, 6)):
        assert (d.channels, d.height, d.width, d.label, d.encoded) == (3, 5, 6, lab, False)
        np.testing.assert_array_equal(np.frombuffer(d.data, np.uint8).reshape(3, 5, 6), im.transpose(2, 0, 1))


def test_encoded_resize_reencodes_and_no_resize_keeps_file(images) -> None:
    root, imgs = images
    convert_imageset(str(root / "img") + "/", root / "list.txt", root / "enc", encoded=True, log=lambda m: None)
    for (_, d), i in zip(_records(root / "enc"), range(3)):
        assert d.encoded and d.channels == 0
        assert d.data == (root / "img" / "sub" / f"p{i}.png").read_bytes()
    convert_imageset(str(root / "img") + "/", root / "list.txt", root / "enc2", encoded=True, resize_height=3,
                     resize_width=4, encode_type="png", log=lambda m: None)
    for (_, d), im in zip(_records(root / "enc2"), imgs):
        dec = cv2.imdecode(np.frombuffer(d.data, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(dec, cv2.resize(im, (4, 3), interpolation=cv2.INTER_LINEAR))


def test_check_size_and_existing_output(images) -> None:
    root, _ = images
    cv2.imwrite(str(root / "img" / "sub" / "big.png"), np.zeros((7, 7, 3), np.uint8))
    (root / "l2.txt").write_text("sub/p0.png 0\nsub/big.png 1\n")
    with pytest.raises(CaffeportError, match="check_size"):
        convert_imageset(str(root / "img") + "/", root / "l2.txt", root / "db", check_size=True)
    assert not (root / "db").exists() and not list(root.glob("db.tmp-*"))
    (root / "db").mkdir()
    with pytest.raises(CaffeportError, match="already exists"):
        convert_imageset(str(root / "img") + "/", root / "l2.txt", root / "db")


def test_cli_caffe_flag_spellings(images) -> None:
    root, imgs = images
    old = os.getcwd()
    os.chdir(root)
    try:
        r = CliRunner().invoke(main, ["convert_imageset", "-gray", "-resize_height=4", "--resize_width", "3",
                                      "img/", "list.txt", "g"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(main, ["compute-image-mean", "g", "m.binaryproto"])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(main, ["compute-image-mean", "nothere", "m2.binaryproto"])
        assert r.exit_code == 1 and "nothere" in r.output
    finally:
        os.chdir(old)
    recs = _records(root / "g")
    assert all((d.channels, d.height, d.width) == (1, 4, 3) for _, d in recs)
    bp = caffe_pb2.BlobProto()
    bp.ParseFromString((root / "m.binaryproto").read_bytes())
    px = np.stack([np.frombuffer(d.data, np.uint8).astype(np.float64) for _, d in recs])
    np.testing.assert_allclose(np.asarray(bp.data), px.mean(0), rtol=1e-6)


def test_mean_float_data_accumulates_in_float32(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    xs = rng.normal(100, 50, (7, 2, 3, 3)).astype(np.float32)
    with LMDBWriter(tmp_path / "f") as w:
        for i, x in enumerate(xs):
            w.put(f"{i:04d}", array_to_datum(x).SerializeToString())
    mean = compute_image_mean(tmp_path / "f", tmp_path / "m.binaryproto")
    acc = np.zeros((2, 3, 3), np.float32)
    for x in xs:  # Caffe: sum_blob.data(i) += float_data(i), one record at a time, in float32
        acc = (acc + x).astype(np.float32)
    want = acc / np.float32(7)
    np.testing.assert_array_equal(mean, want)
    bp = caffe_pb2.BlobProto()
    bp.ParseFromString((tmp_path / "m.binaryproto").read_bytes())
    assert (bp.num, bp.channels, bp.height, bp.width) == (1, 2, 3, 3) and not bp.HasField("shape")


def test_feature_datum_legacy_dims() -> None:
    d = feature_datum(np.arange(4, dtype=np.float32), (2, 4))
    assert (d.channels, d.height, d.width) == (4, 1, 1) and list(d.float_data) == [0, 1, 2, 3]
    # channels=4 height=1 width=1 then unpacked float_data (field 6, wire type 5), no label/encoded.
    assert d.SerializeToString()[:7] == bytes([0x08, 4, 0x10, 1, 0x18, 1, 0x35])
