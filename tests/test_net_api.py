"""The runtime Net and its pycaffe-like API, checked against hand computations in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import caffeport
import caffeport.compat as caffe
from caffeport.errors import CaffeportError
from caffeport.net import Net

IP_NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 }
                              bias_filler { type: "constant" value: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        param { lr_mult: 0 } param { lr_mult: 0 }
        inner_product_param { num_output: 2 weight_filler { type: "constant" value: 0.25 } } }
"""


def _write(tmp_path: Path, text: str, name: str = "net.prototxt") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _reference(net: Net, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w1, b1 = (p.data.astype(np.float64) for p in net.params["ip1"])
    w2, b2 = (p.data.astype(np.float64) for p in net.params["ip2"])
    h = np.maximum(x @ w1.T + b1, 0)
    return h, h @ w2.T + b2


def test_pycaffe_flow_forward_backward(tmp_path: Path) -> None:
    net = Net(_write(tmp_path, IP_NET), phase=caffeport.TEST)
    assert net.inputs == ["data"] and net.outputs == ["ip2"]
    assert list(net.params) == ["ip1", "ip2"]
    np.testing.assert_array_equal(net.params["ip1"][1].data, np.full(4, 0.5, np.float32))  # bias filler
    np.testing.assert_array_equal(net.params["ip2"][0].data, np.full((2, 4), 0.25, np.float32))
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    net.blobs["data"].data[...] = x
    out = net.forward()
    h, y = _reference(net, x)
    np.testing.assert_allclose(net.blobs["ip1"].data, h, rtol=1e-5, atol=1e-6)  # in-place: post-ReLU value
    np.testing.assert_allclose(out["ip2"], y, rtol=1e-5, atol=1e-6)
    g = np.random.default_rng(1).normal(size=(2, 2)).astype(np.float32)
    net.blobs["ip2"].diff[...] = g
    net.backward()
    w1 = net.params["ip1"][0].data.astype(np.float64)
    w2 = net.params["ip2"][0].data.astype(np.float64)
    dh = (g @ w2) * (h > 0)
    np.testing.assert_allclose(net.params["ip1"][0].diff, dh.T @ x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.params["ip1"][1].diff, dh.sum(0), rtol=1e-4, atol=1e-5)
    # lr_mult 0: Caffe computes no diff for ip2's blobs
    np.testing.assert_array_equal(net.params["ip2"][0].diff, 0)
    assert not net.params["ip2"][0].param.requires_grad
    del w1


def test_forward_kwargs_and_reshape(tmp_path: Path) -> None:
    net = Net(_write(tmp_path, IP_NET))
    x = np.ones((5, 3), np.float32)
    out = net.forward(data=x)
    assert out["ip2"].shape == (5, 2)
    net.blobs["data"].reshape(7, 3)
    net.reshape()
    assert net.blobs["ip2"].shape == (7, 2)


def test_copy_from_by_name_keeps_missing_layers(tmp_path: Path) -> None:
    net = Net(_write(tmp_path, IP_NET))
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    copied = net.copy_from({"ip1": [w, np.zeros(4, np.float32)], "not_in_net": [np.zeros(3, np.float32)]})
    assert copied == ["ip1"]
    np.testing.assert_array_equal(net.params["ip1"][0].data, w)
    np.testing.assert_array_equal(net.params["ip2"][0].data, np.full((2, 4), 0.25, np.float32))


def test_copy_from_legacy_4d_shapes(tmp_path: Path) -> None:
    net = Net(_write(tmp_path, IP_NET))
    w = np.arange(12, dtype=np.float32).reshape(1, 1, 4, 3)  # V1 caffemodels store IP weights 4-D
    net.copy_from({"ip1": [w, np.zeros((1, 1, 1, 4), np.float32)]})
    np.testing.assert_array_equal(net.params["ip1"][0].data, w.reshape(4, 3))


def test_weight_shape_mismatch_names_layer_blob_and_shapes(tmp_path: Path) -> None:
    net = Net(_write(tmp_path, IP_NET))
    with pytest.raises(CaffeportError, match=r"ip1.*blob 0.*\(5, 3\).*\(4, 3\)"):
        net.copy_from({"ip1": [np.zeros((5, 3), np.float32), np.zeros(4, np.float32)]})


def test_save_and_reload_roundtrip(tmp_path: Path) -> None:
    net = Net(_write(tmp_path, IP_NET))
    w = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
    net.params["ip1"][0].data[...] = w
    net.save(tmp_path / "w.caffemodel")
    loaded = caffeport.load_caffemodel(tmp_path / "w.caffemodel")
    np.testing.assert_array_equal(loaded["ip1"][0], w)
    net2 = Net(tmp_path / "net.prototxt", tmp_path / "w.caffemodel")
    np.testing.assert_array_equal(net2.params["ip1"][0].data, w)


def test_state_dict_roundtrip_and_plain_module(tmp_path: Path) -> None:
    net = Net(_write(tmp_path, IP_NET))
    net2 = Net(tmp_path / "net.prototxt")
    net2.module.load_state_dict(net.module.state_dict())
    x = torch.randn(2, 3)
    out1 = net.module(x)["ip2"]
    out2 = net2.module(data=x)["ip2"]
    torch.testing.assert_close(out1, out2)


def test_all_unsupported_types_reported_at_once(tmp_path: Path) -> None:
    text = IP_NET + """
    layer { name: "u1" type: "FancyLayer" bottom: "ip2" top: "u1" }
    layer { name: "u2" type: "OtherLayer" bottom: "u1" top: "u2" }
    """
    with pytest.raises(CaffeportError) as e:
        Net(_write(tmp_path, text))
    assert "FancyLayer" in str(e.value) and "OtherLayer" in str(e.value) and "u1" in str(e.value)


def test_missing_bottom_and_duplicate_top(tmp_path: Path) -> None:
    with pytest.raises(CaffeportError, match=r"relu.*'nope'"):
        Net(_write(tmp_path, IP_NET + 'layer { name: "relu" type: "ReLU" bottom: "nope" top: "r" }'))
    with pytest.raises(CaffeportError, match=r"dup.*'ip1'"):
        Net(_write(tmp_path, IP_NET + 'layer { name: "dup" type: "ReLU" bottom: "ip2" top: "ip1" }'))


def test_shared_params(tmp_path: Path) -> None:
    text = """
    layer { name: "data" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ipa" type: "InnerProduct" bottom: "a" top: "ya" param { name: "w" } param { name: "bias" }
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
    layer { name: "ipb" type: "InnerProduct" bottom: "b" top: "yb" param { name: "w" } param { name: "bias" }
            inner_product_param { num_output: 2 } }
    """
    net = Net(_write(tmp_path, text))
    assert net.params["ipa"][0].param is net.params["ipb"][0].param
    assert len(net.learnable_params()) == 2


def test_compat_constructor_forms(tmp_path: Path) -> None:
    p = _write(tmp_path, IP_NET)
    Net(p).save(tmp_path / "w.caffemodel")
    a = caffe.Net(str(p), str(tmp_path / "w.caffemodel"), caffe.TEST)
    b = caffe.Net(str(p), caffe.TEST, weights=str(tmp_path / "w.caffemodel"))
    np.testing.assert_array_equal(a.params["ip1"][0].data, b.params["ip1"][0].data)
    assert [layer.type for layer in a.layers] == ["Input", "InnerProduct", "ReLU", "InnerProduct"]
    assert a._layer_names == ["data", "ip1", "relu1", "ip2"]


def test_transformer_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    img = rng.random((4, 5, 3)).astype(np.float32)  # H, W, RGB in [0, 1] as load_image gives
    mean = np.array([104.0, 117.0, 123.0], np.float32)
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", mean)
    t.set_input_scale("data", 0.5)
    got = t.preprocess("data", img)
    ref = (img.transpose(2, 0, 1)[::-1] * 255 - mean[:, None, None]) * 0.5
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_allclose(t.deprocess("data", got), img, rtol=1e-5, atol=1e-6)


def test_blobproto_helpers_legacy_dims() -> None:
    bp = caffe.proto.caffe_pb2.BlobProto()
    bp.num, bp.channels, bp.height, bp.width = 1, 2, 1, 3
    bp.data.extend(range(6))
    arr = caffe.io.blobproto_to_array(bp)
    assert arr.shape == (1, 2, 1, 3) and arr[0, 1, 0, 2] == 5
    back = caffe.io.array_to_blobproto(arr)
    assert list(back.shape.dim) == [1, 2, 1, 3] and list(back.data) == list(range(6))


def test_module_works_under_torch_compile(tmp_path: Path) -> None:
    net = Net(_write(tmp_path, IP_NET))
    module = net.module.eval()
    x = torch.randn(3, 3)
    with torch.no_grad():
        ref = module(x)["ip2"]
        got = torch.compile(module)(x)["ip2"]
    h, y = _reference(net, x.numpy())
    np.testing.assert_allclose(got.numpy(), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref)
