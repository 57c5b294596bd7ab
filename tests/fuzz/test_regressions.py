"""Inputs the fuzzer found (tests/fuzz/fuzz_runner.py), each now a CaffeportError naming the file or a
correct result. Reference values are numpy formulas, not caffeport's output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import caffeport
from caffeport.errors import CaffeportError
from tests.layers.helpers import make


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_lrn_huge_local_size_no_huge_padding(region):
    # local_size 2^31-1 made torch pad 2^30 channels (274 GB); the window covering the whole blob is the answer
    size = 2147483647
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    layer = make("LRN", f"lrn_param {{ local_size: {size} alpha: 0.3 beta: 0.75 norm_region: {region} }}", [x.shape])
    y = layer(torch.from_numpy(x)).numpy()
    if region == "ACROSS_CHANNELS":
        want = x / (1 + 0.3 / size * (x * x).sum(1, keepdims=True)) ** 0.75
    else:
        want = x / (1 + 0.3 / size**2 * (x * x).sum((2, 3), keepdims=True)) ** 0.75
    np.testing.assert_allclose(y, want, rtol=1e-6)


def test_zero_sized_blob_through_pooling_and_inner_product(tmp_path):
    p = tmp_path / "z.prototxt"
    p.write_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 0 dim: 8 dim: 8 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param { num_output: 3 bias_filler { type: "constant" value: 0.5 } } }
""")
    out = caffeport.Net(p).forward()
    np.testing.assert_array_equal(out["ip"], np.full((2, 3), 0.5, np.float32))  # GEMM over K = 0 adds nothing


def _list_net(tmp_path: Path, dtype: str, param: str) -> Path:
    p = tmp_path / "net.prototxt"
    p.write_text(f"""
layer {{ name: "data" type: "{dtype}" top: "data" top: "label" {param} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param {{ num_output: 3 }} }}
""")
    return p


@pytest.mark.parametrize("kind", ["image", "hdf5"])
def test_list_file_not_utf8(tmp_path, kind):
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\xff\xfeimg.png 0\n")
    param = (f'image_data_param {{ source: "{lst}" batch_size: 1 }}' if kind == "image"
             else f'hdf5_data_param {{ source: "{lst}" batch_size: 1 }}')
    with pytest.raises(CaffeportError) as err:
        caffeport.Net(_list_net(tmp_path, "ImageData" if kind == "image" else "HDF5Data", param))
    assert "img.png" in str(err.value)


def test_corrupt_hdf5_data_file(tmp_path):
    import h5py

    h5 = tmp_path / "d.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("data", data=np.arange(24, dtype=np.float32).reshape(4, 6))
        f.create_dataset("label", data=np.zeros(4, np.float32))
    good = h5.read_bytes()
    (tmp_path / "list.txt").write_text("d.h5\n")
    net = _list_net(tmp_path, "HDF5Data", f'hdf5_data_param {{ source: "{tmp_path / "list.txt"}" batch_size: 2 }}')
    rng = np.random.default_rng(1)
    failures = 0
    for _ in range(30):
        bad = bytearray(good)
        for i in rng.integers(8, len(bad), size=6):
            bad[i] = int(rng.integers(0, 256))
        h5.write_bytes(bytes(bad))
        try:
            caffeport.Net(net).forward()
        except CaffeportError as e:
            failures += 1
            assert "d.h5" in str(e)
    assert failures > 0


def test_hdf5_data_absurd_declared_size(tmp_path):
    import h5py

    h5 = tmp_path / "d.h5"
    with h5py.File(h5, "w") as f:  # 2^31 x 4 float64 declared (64 GiB), nothing written
        f.create_dataset("data", shape=(1 << 31, 4), dtype="f8", chunks=(1024, 4))
        f.create_dataset("label", data=np.zeros(4, np.float32))
    (tmp_path / "list.txt").write_text("d.h5\n")
    net = _list_net(tmp_path, "HDF5Data", f'hdf5_data_param {{ source: "{tmp_path / "list.txt"}" batch_size: 2 }}')
    with pytest.raises(CaffeportError, match="d.h5"):
        caffeport.Net(net)


def _caffe_pool(x: np.ndarray, method: str, k: int, s: int, p: int) -> np.ndarray:
    """Caffe's PoolingLayer forward, loop by loop (pooling_layer.cpp), ceil rounding."""
    N, C, H, W = x.shape

    def out(n: int) -> int:
        o = -(-(n + 2 * p - k) // s) + 1
        return o - 1 if p and (o - 1) * s >= n + p else o

    oh, ow = out(H), out(W)
    y = np.zeros((N, C, oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * s - p, j * s - p
            he, we = min(hs + k, H + p), min(ws + k, W + p)
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
            win = x[:, :, hs:he, ws:we]
            if method == "MAX":
                y[:, :, i, j] = win.max((2, 3)) if win.size else -np.finfo(np.float32).max
            else:
                y[:, :, i, j] = win.sum((2, 3)) / size
    return y


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("stride,pad", [(2147483647, 0), (2000000000, 1), (20, 0), (3, 1)])
def test_pooling_huge_stride_no_huge_padding(method, stride, pad):
    # stride 2^31-1 made the padded path pad 2^31 rows ("Storage size calculation overflowed")
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 9)).astype(np.float32)
    layer = make("Pooling", f"pooling_param {{ pool: {method} kernel_size: 2 stride: {stride} pad: {pad} }}",
                 [x.shape])
    np.testing.assert_allclose(layer(torch.from_numpy(x)).numpy(), _caffe_pool(x, method, 2, stride, pad), rtol=1e-6)


def test_unknown_filler_names_the_layer(tmp_path):
    p = tmp_path / "f.prototxt"
    p.write_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "top" } } }
""")
    with pytest.raises(CaffeportError, match=r"f\.prototxt: layer 'ip' .*unknown filler type 'top'"):
        caffeport.Net(p)


def test_convolution_over_zero_channels_gives_the_bias(tmp_path):
    # torch's conv returned the (2, 0, 8, 8) input shape where Caffe's top is (2, 4, 8, 8) = bias
    p = tmp_path / "c.prototxt"
    p.write_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 0 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_filler { type: "constant" value: 0.25 } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "constant" value: 1 } } }
""")
    out = caffeport.Net(p).forward()
    np.testing.assert_allclose(out["ip"], np.full((2, 3), 0.25 * 4 * 4 * 4, np.float32))
