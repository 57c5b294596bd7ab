"""Data layers on synthetic data, checked against independent numpy computations."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from google.protobuf import text_format

from caffeport.errors import CaffeportError
from caffeport.io.lmdb_store import LMDBWriter, array_to_datum
from caffeport.layers.base import BuildContext, layer_class
from caffeport.proto import caffe_pb2


def _layer(text: str, root: Path, phase: int = caffe_pb2.TEST):
    lp = caffe_pb2.LayerParameter()
    text_format.Merge(text, lp)
    return layer_class(lp.type)(lp, [], BuildContext(phase=phase, root=root, source="t.prototxt"))


def _make_lmdb(path: Path, imgs: np.ndarray, labels: list[int]) -> None:
    with LMDBWriter(path) as w:
        for i, (im, lab) in enumerate(zip(imgs, labels)):
            w.put(f"{i:08d}_x", array_to_datum(im, lab).SerializeToString())


@pytest.fixture()
def lmdb_dir(tmp_path: Path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 3, 6, 7), dtype=np.uint8)
    _make_lmdb(tmp_path / "db", imgs, [10, 11, 12, 13, 14])
    return tmp_path, imgs


def test_data_layer_wraps_and_batch_larger_than_db(lmdb_dir) -> None:
    root, imgs = lmdb_dir
    layer = _layer(
        'name: "d" type: "Data" top: "data" top: "label" transform_param { scale: 0.5 } '
        'data_param { source: "db" batch_size: 7 backend: LMDB }', root
    )
    assert layer.top_shapes([]) == [(7, 3, 6, 7), (7,)]
    order = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3]
    for b in range(2):
        data, label = layer.forward()
        idx = order[7 * b : 7 * b + 7]
        np.testing.assert_array_equal(data.numpy(), imgs[idx].astype(np.float32) * np.float32(0.5))
        np.testing.assert_array_equal(label.numpy(), np.array(idx, np.float32) + 10)
    layer.close()


def test_data_layer_relative_to_net_folder_and_errors(lmdb_dir, tmp_path_factory) -> None:
    root, imgs = lmdb_dir
    other = tmp_path_factory.mktemp("elsewhere")
    old = os.getcwd()
    os.chdir(other)
    try:
        layer = _layer('name: "d" type: "Data" top: "data" data_param { source: "db" batch_size: 2 backend: LMDB }',
                       root)
        (data,) = layer.forward()
        np.testing.assert_array_equal(data.numpy(), imgs[:2].astype(np.float32))
        with pytest.raises(CaffeportError, match=r"layer 'd'.*missing_db.*does not exist"):
            _layer('name: "d" type: "Data" top: "data" data_param { source: "missing_db" batch_size: 2 '
                   'backend: LMDB }', root)
        with pytest.raises(CaffeportError, match=r"layer 'd'.*mean_file 'nomean.binaryproto' not found"):
            _layer('name: "d" type: "Data" top: "data" transform_param { mean_file: "nomean.binaryproto" } '
                   'data_param { source: "db" batch_size: 2 backend: LMDB }', root)
    finally:
        os.chdir(old)


def test_imagedata_resize_gray_shuffle_keeps_a_permutation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "im").mkdir()
    raw = []
    for i in range(4):
        img = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "im" / f"{i}.png"), img)
        gray = cv2.imread(str(tmp_path / "im" / f"{i}.png"), cv2.IMREAD_GRAYSCALE)  # libpng's own gray
        raw.append(cv2.resize(gray, (5, 4), interpolation=cv2.INTER_LINEAR))
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {i}\n" for i in range(4)))
    layer = _layer(
        'name: "im" type: "ImageData" top: "data" top: "label" image_data_param { source: "list.txt" '
        'root_folder: "im/" batch_size: 4 new_height: 4 new_width: 5 is_color: false shuffle: true }', tmp_path
    )
    assert layer.top_shapes([]) == [(4, 1, 4, 5), (4,)]
    for _ in range(2):
        data, label = layer.forward()
        labs = label.numpy().astype(int)
        assert sorted(labs.tolist()) == [0, 1, 2, 3]
        for j, lab in enumerate(labs):
            np.testing.assert_array_equal(data.numpy()[j, 0], raw[lab].astype(np.float32))


def test_hdf5data_crosses_files_and_wraps(tmp_path: Path) -> None:
    a = np.arange(3 * 2, dtype=np.float64).reshape(3, 2)
    b = 100 + np.arange(2 * 2, dtype=np.float64).reshape(2, 2)
    for name, x in (("a.h5", a), ("b.h5", b)):
        with h5py.File(tmp_path / name, "w") as f:
            f["x"] = x
            f["y"] = x[:, 0]
    (tmp_path / "list.txt").write_text("a.h5\nb.h5\n")
    layer = _layer('name: "h" type: "HDF5Data" top: "x" top: "y" hdf5_data_param { source: "list.txt" '
                   'batch_size: 4 }', tmp_path)
    rows = np.concatenate([a, b]).astype(np.float32)
    seq = [rows[i % 5] for i in range(12)]
    for k in range(3):
        x, y = layer.forward()
        np.testing.assert_array_equal(x.numpy(), np.stack(seq[4 * k : 4 * k + 4]))
        np.testing.assert_array_equal(y.numpy(), np.stack(seq[4 * k : 4 * k + 4])[:, 0])
    with pytest.raises(CaffeportError, match="no dataset 'z'"):
        _layer('name: "h" type: "HDF5Data" top: "z" hdf5_data_param { source: "list.txt" batch_size: 1 }', tmp_path)


def test_memorydata_and_dummydata(tmp_path: Path) -> None:
    m = _layer('name: "m" type: "MemoryData" top: "data" top: "label" memory_data_param { batch_size: 2 '
               'channels: 1 height: 2 width: 2 }', tmp_path)
    with pytest.raises(CaffeportError, match="set_input_arrays"):
        m.forward()
    x = np.arange(16, dtype=np.float32).reshape(4, 1, 2, 2)
    m.set_input_arrays(x, np.array([5, 6, 7, 8]))
    for k in (0, 1, 0):
        d, lab = m.forward()
        np.testing.assert_array_equal(d.numpy(), x[2 * k : 2 * k + 2])
        np.testing.assert_array_equal(lab.numpy(), np.array([5, 6, 7, 8], np.float32)[2 * k : 2 * k + 2])
    with pytest.raises(CaffeportError, match="multiple of batch_size"):
        m.set_input_arrays(x[:3], np.zeros(3))
    dd = _layer('name: "dd" type: "DummyData" top: "a" top: "b" dummy_data_param { '
                'data_filler { type: "constant" value: 3 } num: 2 channels: 3 height: 1 width: 1 '
                'num: 1 channels: 1 height: 4 width: 2 }', tmp_path)
    a, b = dd.forward()
    assert tuple(a.shape) == (2, 3, 1, 1) and tuple(b.shape) == (1, 1, 4, 2)
    assert (a == 3).all() and (b == 3).all()
    g = _layer('name: "g" type: "DummyData" top: "a" dummy_data_param { data_filler { type: "gaussian" std: 1 } '
               'shape { dim: 1000 } }', tmp_path)
    (g1,) = g.forward()
    (g2,) = g.forward()
    assert not np.array_equal(g1.numpy(), g2.numpy())  # refilled each forward
    assert abs(float(g1.std()) - 1.0) < 0.15


def test_prefetch_order_equals_synchronous_order(lmdb_dir) -> None:
    root, imgs = lmdb_dir
    text = ('name: "d" type: "Data" top: "data" top: "label" data_param { source: "db" batch_size: 3 '
            'backend: LMDB prefetch: %d }')
    a, b = _layer(text % 4, root), _layer(text % 0, root)
    for _ in range(5):
        for x, y in zip(a.forward(), b.forward()):
            np.testing.assert_array_equal(x.numpy(), y.numpy())
