"""Datum encoding/decoding and the LMDB reader/writer, checked against hand-built protobuf bytes."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest

from caffeport.errors import CaffeportError
from caffeport.io.lmdb_store import (
    LMDBReader,
    LMDBWriter,
    array_to_datum,
    datum_to_array,
    open_reader,
    parse_datum,
)
from caffeport.proto import caffe_pb2


def test_raw_datum_bytes_match_caffe_layout() -> None:
    arr = np.arange(2 * 1 * 3, dtype=np.uint8).reshape(2, 1, 3)
    got = array_to_datum(arr, 7).SerializeToString()
    # channels=2 height=1 width=3, data (6 bytes), label=7, encoded=false: as CVMatToDatum writes.
    want = bytes([0x08, 2, 0x10, 1, 0x18, 3, 0x22, 6, 0, 1, 2, 3, 4, 5, 0x28, 7, 0x38, 0])
    assert got == want
    back = datum_to_array(parse_datum(got))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, arr)


def test_reader_iterates_datums_in_key_order(tmp_path: Path) -> None:
    with LMDBWriter(tmp_path / "db") as w:
        for key, lab in (("b", 2), ("a", 1), ("c", 3)):  # inserted out of order
            w.put(key, array_to_datum(np.zeros((1, 1, 1), np.uint8), lab).SerializeToString())
    with LMDBReader(tmp_path / "db") as r:
        assert [(k, d.label) for k, d in r] == [(b"a", 1), (b"b", 2), (b"c", 3)]


def test_float_datum_and_size_checks() -> None:
    arr = np.array([[[1.5, -2.0]]], np.float32)
    d = array_to_datum(arr)
    assert list(d.float_data) == [1.5, -2.0] and not d.data
    np.testing.assert_array_equal(datum_to_array(d), arr)
    bad = caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc")
    with pytest.raises(CaffeportError, match="3 bytes"):
        datum_to_array(bad)


def test_encoded_datum_force_color_gray() -> None:
    img = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    d = caffe_pb2.Datum(data=buf.tobytes(), encoded=True, label=1)
    np.testing.assert_array_equal(datum_to_array(d), img.transpose(2, 0, 1))
    gray = datum_to_array(d, force_gray=True)
    assert gray.shape == (1, 5, 4)
    np.testing.assert_array_equal(gray[0], cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE))
    ok, gbuf = cv2.imencode(".png", img[:, :, 0])
    g = caffe_pb2.Datum(data=gbuf.tobytes(), encoded=True)
    assert datum_to_array(g).shape == (1, 5, 4)  # native decode keeps 1 channel
    col = datum_to_array(g, force_color=True)
    assert col.shape == (3, 5, 4) and (col[0] == col[2]).all()
    with pytest.raises(CaffeportError, match="force_color and force_gray"):
        datum_to_array(d, force_color=True, force_gray=True)


def test_writer_reader_roundtrip_wraps_and_grows(tmp_path: Path) -> None:
    db = tmp_path / "db"
    big = b"x" * (3 << 20)  # 8 x 3 MiB forces the 10 MiB map to grow
    with LMDBWriter(db, commit_every=3) as w:
        for i in range(8):
            w.put(f"{i:08d}", big + bytes([i]))
    assert db.is_dir() and not list(tmp_path.glob("db.tmp-*"))
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.stat()["entries"] == 8
    env.close()
    r = LMDBReader(db)
    assert len(r) == 8
    assert [k for k, _ in r.items()] == [f"{i:08d}".encode() for i in range(8)]
    keys = [r.next_record()[0] for _ in range(10)]
    assert keys == [f"{i:08d}".encode() for i in list(range(8)) + [0, 1]]
    r.close()
    with pytest.raises(CaffeportError, match="already exists"):
        LMDBWriter(db)


def test_writer_aborts_on_error(tmp_path: Path) -> None:
    db = tmp_path / "db"
    with pytest.raises(RuntimeError):
        with LMDBWriter(db) as w:
            w.put("a", b"1")
            raise RuntimeError("boom")
    assert not db.exists() and not list(tmp_path.iterdir())


def test_reader_errors_name_path(tmp_path: Path) -> None:
    with pytest.raises(CaffeportError, match="does not exist") as e:
        LMDBReader(tmp_path / "nope", where="net.prototxt: layer 'data' (Data)")
    assert "layer 'data'" in str(e.value) and "nope" in str(e.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(CaffeportError, match="not an LMDB"):
        LMDBReader(tmp_path / "plain")


def test_leveldb_without_plyvel_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "plyvel", None)  # as if plyvel were not installed
    (tmp_path / "ldb").mkdir()
    with pytest.raises(CaffeportError, match="plyvel.*LMDB"):
        open_reader(tmp_path / "ldb", caffe_pb2.DataParameter.LEVELDB)
