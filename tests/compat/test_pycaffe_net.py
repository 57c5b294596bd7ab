"""BVLC python/caffe/test/test_net.py, ported (same behaviour, with ``caffe`` = caffeport.compat),
plus the Net semantics pycaffe scripts rely on: live blob memory, forward/backward layer ranges,
in-place layers on a net input, callbacks, batching helpers. References are numpy computations."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import caffeport.compat as caffe
from caffeport.errors import CaffeportError


def simple_net_file(tmp_path: Path, num_output: int) -> str:
    """The net of pycaffe's test_net.py (after test_net.cpp)."""
    p = tmp_path / f"simple_{num_output}.prototxt"
    p.write_text("""name: 'testnet' force_backward: true
    layer { type: 'DummyData' name: 'data' top: 'data' top: 'label'
      dummy_data_param { num: 5 channels: 2 height: 3 width: 4
        num: 5 channels: 1 height: 1 width: 1
        data_filler { type: 'gaussian' std: 1 }
        data_filler { type: 'constant' } } }
    layer { type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
      convolution_param { num_output: 11 kernel_size: 2 pad: 3
        weight_filler { type: 'gaussian' std: 1 }
        bias_filler { type: 'constant' value: 2 } }
        param { decay_mult: 1 } param { decay_mult: 0 }
        }
    layer { type: 'InnerProduct' name: 'ip' bottom: 'conv' top: 'ip_blob'
      inner_product_param { num_output: """ + str(num_output) + """
        weight_filler { type: 'gaussian' std: 2.5 }
        bias_filler { type: 'constant' value: -3 } } }
    layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip_blob' bottom: 'label'
      top: 'loss' }""")
    return str(p)


@pytest.fixture
def net(tmp_path: Path) -> caffe.Net:
    n = caffe.Net(simple_net_file(tmp_path, 13), caffe.TRAIN)
    n.blobs["label"].data[...] = np.random.default_rng(0).integers(13, size=n.blobs["label"].data.shape)
    return n


# --- TestNet -------------------------------------------------------------------------------------
def test_memory(net: caffe.Net) -> None:
    params = sum(map(list, net.params.values()), [])
    blobs = list(net.blobs.values())
    del net
    total = 0.0
    for p in params:
        total += p.data.sum() + p.diff.sum()
    for bl in blobs:
        total += bl.data.sum() + bl.diff.sum()
    assert np.isfinite(total)


def test_layer_dict(net: caffe.Net) -> None:
    layer_dict = net.layer_dict
    assert list(layer_dict.keys()) == list(net._layer_names)
    for i, name in enumerate(net._layer_names):
        assert layer_dict[name].type == net.layers[i].type
    assert [lay.type for lay in net.layers] == ["DummyData", "Convolution", "InnerProduct", "SoftmaxWithLoss"]


def test_forward_backward(net: caffe.Net) -> None:
    net.forward()
    net.backward()
    assert net.params["conv"][0].diff.any()


def test_forward_start_end(net: caffe.Net) -> None:
    conv_blob = net.blobs["conv"]
    ip_blob = net.blobs["ip_blob"]
    sample = np.random.default_rng(1).uniform(size=conv_blob.data.shape).astype(np.float32)
    conv_blob.data[:] = sample
    out = net.forward(start="ip", end="ip")
    assert "ip_blob" in out
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    manual = np.array([w @ conv_blob.data[i].reshape(-1) + b for i in range(conv_blob.data.shape[0])])
    np.testing.assert_allclose(ip_blob.data, manual, rtol=1e-3, atol=1e-5)
    # the layers outside the range did not run: conv still holds the sample, not conv(data)
    np.testing.assert_array_equal(conv_blob.data, sample)


def test_backward_start_end(net: caffe.Net) -> None:
    conv_blob = net.blobs["conv"]
    ip_blob = net.blobs["ip_blob"]
    sample = np.random.default_rng(2).uniform(size=ip_blob.data.shape).astype(np.float32)
    ip_blob.diff[:] = sample
    out = net.backward(start="ip", end="ip")
    assert "conv" in out
    w = net.params["ip"][0].data
    manual = np.array([w.T @ sample[i].reshape(-1) for i in range(conv_blob.data.shape[0])])
    np.testing.assert_allclose(conv_blob.diff, manual.reshape(conv_blob.data.shape), rtol=1e-3, atol=1e-5)
    # conv (outside the range) computed no param diff
    assert not net.params["conv"][0].diff.any()


def test_clear_param_diffs(net: caffe.Net) -> None:
    net.forward()
    net.backward()
    diff = net.params["conv"][0].diff
    assert diff.max() > 0
    net.clear_param_diffs()
    assert (diff == 0).all()


def test_inputs_outputs(net: caffe.Net) -> None:
    assert net.inputs == []
    assert net.outputs == ["loss"]


def test_top_bottom_names(net: caffe.Net) -> None:
    assert net.top_names == OrderedDict([("data", ["data", "label"]), ("conv", ["conv"]), ("ip", ["ip_blob"]),
                                         ("loss", ["loss"])])
    assert net.bottom_names == OrderedDict([("data", []), ("conv", ["data"]), ("ip", ["conv"]),
                                            ("loss", ["ip_blob", "label"])])
    assert net._blob_names == ["data", "label", "conv", "ip_blob", "loss"]
    assert net.blob_loss_weights == OrderedDict([("data", 0.0), ("label", 0.0), ("conv", 0.0), ("ip_blob", 0.0),
                                                 ("loss", 1.0)])
    assert isinstance(net.blobs, OrderedDict) and isinstance(net.params, OrderedDict)


def test_save_and_read(net: caffe.Net, tmp_path: Path) -> None:
    f = tmp_path / "saved"  # no extension, as pycaffe's NamedTemporaryFile
    net.save(str(f))
    net_file = simple_net_file(tmp_path, 13)
    caffe.Net(net_file, str(f), caffe.TRAIN)  # legacy constructor
    net2 = caffe.Net(net_file, caffe.TRAIN, weights=str(f))
    for name in net.params:
        for i in range(len(net.params[name])):
            assert abs(net.params[name][i].data - net2.params[name][i].data).sum() == 0


def test_save_hdf5(net: caffe.Net, tmp_path: Path) -> None:
    f = tmp_path / "saved_h5"  # no .h5 extension: save_hdf5 writes HDF5 anyway
    net.save_hdf5(str(f))
    assert f.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    net2 = caffe.Net(simple_net_file(tmp_path, 13), caffe.TRAIN)
    net2.load_hdf5(str(f))
    for name in net.params:
        for i in range(len(net.params[name])):
            assert abs(net.params[name][i].data - net2.params[name][i].data).sum() == 0


# --- TestLevels / TestStages / TestAllInOne ---------------------------------------------------------
LEVELS = """
layer { name: "data" type: "DummyData" top: "data" dummy_data_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } } }
layer { name: "NoLevel" type: "InnerProduct" bottom: "data" top: "NoLevel" inner_product_param { num_output: 1 } }
layer { name: "Level0Only" type: "InnerProduct" bottom: "data" top: "Level0Only"
  include { min_level: 0 max_level: 0 } inner_product_param { num_output: 1 } }
layer { name: "Level1Only" type: "InnerProduct" bottom: "data" top: "Level1Only"
  include { min_level: 1 max_level: 1 } inner_product_param { num_output: 1 } }
layer { name: "Level>=0" type: "InnerProduct" bottom: "data" top: "Level>=0"
  include { min_level: 0 } inner_product_param { num_output: 1 } }
layer { name: "Level>=1" type: "InnerProduct" bottom: "data" top: "Level>=1"
  include { min_level: 1 } inner_product_param { num_output: 1 } }
"""

STAGES = """
layer { name: "data" type: "DummyData" top: "data" dummy_data_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } } }
layer { name: "A" type: "InnerProduct" bottom: "data" top: "A" include { stage: "A" }
  inner_product_param { num_output: 1 } }
layer { name: "B" type: "InnerProduct" bottom: "data" top: "B" include { stage: "B" }
  inner_product_param { num_output: 1 } }
layer { name: "AorB" type: "InnerProduct" bottom: "data" top: "AorB" include { stage: "A" } include { stage: "B" }
  inner_product_param { num_output: 1 } }
layer { name: "AandB" type: "InnerProduct" bottom: "data" top: "AandB" include { stage: "A" stage: "B" }
  inner_product_param { num_output: 1 } }
"""

ALL_IN_ONE = """
layer { name: "train_data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } shape { dim: 1 dim: 1 dim: 1 dim: 1 } }
  include { phase: TRAIN stage: "train" } }
layer { name: "val_data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } shape { dim: 1 dim: 1 dim: 1 dim: 1 } }
  include { phase: TEST stage: "val" } }
layer { name: "deploy_data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } }
  include { phase: TEST stage: "deploy" } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
  include: { phase: TRAIN stage: "train" } include: { phase: TEST stage: "val" } }
layer { name: "pred" type: "Softmax" bottom: "ip" top: "pred" include: { phase: TEST stage: "deploy" } }
"""


def _blobs_wo_data(net: caffe.Net) -> list[str]:
    return [b for b in net.blobs.keys() if "data" not in b]


def test_levels(tmp_path: Path) -> None:
    f = tmp_path / "levels.prototxt"
    f.write_text(LEVELS)
    assert _blobs_wo_data(caffe.Net(str(f), caffe.TEST)) == ["NoLevel", "Level0Only", "Level>=0"]
    assert _blobs_wo_data(caffe.Net(str(f), caffe.TEST, level=1)) == ["NoLevel", "Level1Only", "Level>=0",
                                                                        "Level>=1"]


def test_stages(tmp_path: Path) -> None:
    f = tmp_path / "stages.prototxt"
    f.write_text(STAGES)
    assert _blobs_wo_data(caffe.Net(str(f), caffe.TEST, stages=["A"])) == ["A", "AorB"]
    assert _blobs_wo_data(caffe.Net(str(f), caffe.TEST, stages=["B"])) == ["B", "AorB"]
    assert _blobs_wo_data(caffe.Net(str(f), caffe.TEST, stages=["A", "B"])) == ["A", "B", "AorB", "AandB"]


def test_all_in_one(tmp_path: Path) -> None:
    f = tmp_path / "all.prototxt"
    f.write_text(ALL_IN_ONE)
    for phase, stage, outputs in ((caffe.TRAIN, "train", ["loss"]), (caffe.TEST, "val", ["loss"]),
                                  (caffe.TEST, "deploy", ["pred"])):
        net = caffe.Net(str(f), phase, stages=[stage])
        assert list(net.blobs["data"].shape) == [1, 1, 10, 10]
        assert net.outputs == outputs


# --- live blob memory -------------------------------------------------------------------------------
IP_NET = """name: "live"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "out" type: "InnerProduct" bottom: "ip" top: "out"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
"""


def _ip_ref(net: caffe.Net, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w1, b1 = (p.data.astype(np.float64) for p in net.params["ip"])
    w2, b2 = (p.data.astype(np.float64) for p in net.params["out"])
    h = np.maximum(x @ w1.T + b1, 0)
    return h, h @ w2.T + b2


def test_views_stay_live_across_forward_and_backward(tmp_path: Path) -> None:
    f = tmp_path / "live.prototxt"
    f.write_text(IP_NET)
    net = caffe.Net(str(f), caffe.TEST)
    views = {n: net.blobs[n].data for n in net.blobs}
    dviews = {n: net.blobs[n].diff for n in net.blobs}
    rng = np.random.default_rng(3)
    for _ in range(2):  # the second pass writes into the same memory again
        x = rng.normal(size=(2, 3)).astype(np.float32)
        out = net.forward(data=x)
        h, y = _ip_ref(net, x)
        np.testing.assert_allclose(views["ip"], h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(views["out"], y, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(views["data"], x)
        assert np.shares_memory(out["out"], views["out"])
        g = rng.normal(size=(2, 2)).astype(np.float32)
        dviews["out"][...] = g
        net.backward()
        w2 = net.params["out"][0].data.astype(np.float64)
        np.testing.assert_allclose(dviews["ip"], (g @ w2) * (h > 0), rtol=1e-4, atol=1e-5)
    # a param view stays live too
    pv = net.params["ip"][0].data
    net.copy_from({"ip": [np.ones((4, 3), np.float32), np.zeros(4, np.float32)]})
    np.testing.assert_array_equal(pv, 1)


def test_forward_kwargs_must_be_inputs(tmp_path: Path) -> None:
    f = tmp_path / "live.prototxt"
    f.write_text(IP_NET)
    net = caffe.Net(str(f), caffe.TEST)
    with pytest.raises(CaffeportError, match="'dta'.*not among the net inputs.*data"):
        net.forward(dta=np.zeros((2, 3)))
    with pytest.raises(CaffeportError, match="'ip'.*not among the net outputs"):
        net.backward(ip=np.zeros((2, 4)))
    with pytest.raises(CaffeportError, match="no layer named 'relu2'"):
        net.forward(start="relu2")
    with pytest.raises(TypeError):
        net.forward(None, None, None, None)  # pycaffe's forward takes blobs/start/end and keywords only


def test_weights_path_with_comma_is_one_path(tmp_path: Path) -> None:
    f = tmp_path / "live.prototxt"
    f.write_text(IP_NET)
    net = caffe.Net(str(f), caffe.TEST)
    net.params["ip"][0].data[...] = 0.5
    w = tmp_path / "weights,v2.caffemodel"
    net.save(str(w))
    net2 = caffe.Net(str(f), str(w), caffe.TEST)
    np.testing.assert_array_equal(net2.params["ip"][0].data, 0.5)
    with pytest.raises(CaffeportError, match="not found"):
        caffe.Net(str(f), str(tmp_path / "a.caffemodel,b.caffemodel"), caffe.TEST)


def test_callbacks_around_each_layer(tmp_path: Path) -> None:
    f = tmp_path / "live.prototxt"
    f.write_text(IP_NET)
    net = caffe.Net(str(f), caffe.TEST)
    seen: list[tuple[str, int]] = []
    net.before_forward(lambda i: seen.append(("bf", i)))
    net.after_forward(lambda i: seen.append(("af", i)))
    net.before_backward(lambda i: seen.append(("bb", i)))
    net.after_backward(lambda i: seen.append(("ab", i)))
    net.forward()
    assert seen == [(k, i) for i in range(4) for k in ("bf", "af")]
    seen.clear()
    net.backward()
    assert seen == [(k, i) for i in range(3, -1, -1) for k in ("bb", "ab")]


def test_forward_all_and_forward_backward_all(tmp_path: Path) -> None:
    f = tmp_path / "live.prototxt"
    f.write_text(IP_NET)
    net = caffe.Net(str(f), caffe.TEST)
    x = np.random.default_rng(4).normal(size=(5, 3)).astype(np.float32)  # 2 full batches + 1 padded
    out = net.forward_all(data=x, blobs=["ip"])
    h, y = _ip_ref(net, x)
    assert set(out) == {"out", "ip"} and out["out"].shape == (5, 2)
    np.testing.assert_allclose(out["out"], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["ip"], h, rtol=1e-5, atol=1e-5)
    g = np.random.default_rng(5).normal(size=(5, 2)).astype(np.float32)
    blobs, diffs = net.forward_backward_all(data=x, out=g, diffs=["ip"])
    np.testing.assert_allclose(blobs["out"], y, rtol=1e-5, atol=1e-5)
    w2 = net.params["out"][0].data.astype(np.float64)
    np.testing.assert_allclose(diffs["ip"], (g @ w2) * (h > 0), rtol=1e-4, atol=1e-5)


def test_set_input_arrays_memory_data(tmp_path: Path) -> None:
    f = tmp_path / "mem.prototxt"
    f.write_text("""layer { name: "data" type: "MemoryData" top: "data" top: "label"
      memory_data_param { batch_size: 2 channels: 1 height: 2 width: 2 } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
      inner_product_param { num_output: 1 weight_filler { type: "constant" value: 1 } } }
    layer { name: "sil" type: "Silence" bottom: "label" }""")
    net = caffe.Net(str(f), caffe.TEST)
    data = np.arange(16, dtype=np.float32).reshape(4, 1, 2, 2)
    labels = np.arange(4, dtype=np.float32)
    net.set_input_arrays(data, labels)
    net.forward()
    np.testing.assert_array_equal(net.blobs["ip"].data.ravel(), data[:2].reshape(2, -1).sum(1))
    net.forward()
    np.testing.assert_array_equal(net.blobs["ip"].data.ravel(), data[2:].reshape(2, -1).sum(1))
    np.testing.assert_array_equal(net.blobs["label"].data.ravel(), labels[2:])
    other = caffe.Net(simple_net_file(tmp_path, 3), caffe.TEST)
    with pytest.raises(CaffeportError, match="first layer is a MemoryData"):
        other.set_input_arrays(data, labels)


def test_share_with(tmp_path: Path) -> None:
    f = tmp_path / "live.prototxt"
    f.write_text(IP_NET)
    a = caffe.Net(str(f), caffe.TEST)
    b = caffe.Net(str(f), caffe.TEST)
    b.share_with(a)
    a.params["ip"][0].data[...] = 3.0
    np.testing.assert_array_equal(b.params["ip"][0].data, 3.0)  # same memory


def test_layer_view_blobs_are_the_params(net: caffe.Net) -> None:
    conv = net.layers[1]
    assert conv.type == "Convolution" and len(conv.blobs) == 2
    conv.blobs[0].data[...] = 0.25
    np.testing.assert_array_equal(net.params["conv"][0].data, 0.25)
    conv.blobs[0].diff[...] = 1.0
    np.testing.assert_array_equal(net.params["conv"][0].diff, 1.0)


def test_classifier_is_a_net() -> None:
    assert issubclass(caffe.Classifier, caffe.Net)


def test_net_file_missing_names_it(tmp_path: Path) -> None:
    with pytest.raises(CaffeportError, match="nope.prototxt"):
        caffe.Net(str(tmp_path / "nope.prototxt"), caffe.TEST)
    assert not os.path.exists(tmp_path / "nope.prototxt")


# --- in-place layers on a net input (the top IS the input blob) -------------------------------------
def _sig(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


# type, layer params, f(x), f'(x) as numpy (float64). Caffe's in-place rule: after forward the input
# blob holds f(x); after backward its diff is top_diff * f'(x) (the diff through the in-place layer).
INPLACE = {
    "ReLU": ("relu_param { negative_slope: 0.1 }", lambda x: np.where(x > 0, x, 0.1 * x),
             lambda x: np.where(x > 0, 1.0, 0.1)),
    "Sigmoid": ("", _sig, lambda x: _sig(x) * (1 - _sig(x))),
    "TanH": ("", np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "ELU": ("elu_param { alpha: 0.5 }", lambda x: np.where(x > 0, x, 0.5 * (np.exp(x) - 1)),
            lambda x: np.where(x > 0, 1.0, 0.5 * np.exp(x))),
    "Exp": ("exp_param { base: 2 scale: 0.5 shift: 0.1 }", lambda x: 2 ** (0.5 * x + 0.1),
            lambda x: np.log(2) * 0.5 * 2 ** (0.5 * x + 0.1)),
    "Dropout": ("", lambda x: x, lambda x: np.ones_like(x)),  # TEST phase: identity
    "Swish": ("", lambda x: x * _sig(x), lambda x: _sig(x) + x * _sig(x) * (1 - _sig(x))),
    "Scale": ("scale_param { filler { type: 'constant' value: 1.5 } bias_term: true "
              "bias_filler { type: 'constant' value: 0.25 } }", lambda x: 1.5 * x + 0.25, lambda x: 1.5 + 0 * x),
    "Bias": ("bias_param { filler { type: 'constant' value: -0.5 } }", lambda x: x - 0.5, np.ones_like),
    "PReLU": ("prelu_param { filler { type: 'constant' value: 0.2 } }", lambda x: np.where(x > 0, x, 0.2 * x),
              lambda x: np.where(x > 0, 1.0, 0.2)),
    "BatchNorm": ("batch_norm_param { use_global_stats: true eps: 0.001 }",
                  lambda x: (x - 0.5) / np.sqrt(2.0 + 0.001), lambda x: np.full_like(x, 1 / np.sqrt(2.001))),
}


@pytest.mark.parametrize("kind", sorted(INPLACE))
def test_inplace_layer_on_net_input(tmp_path: Path, kind: str) -> None:
    params, f, df = INPLACE[kind]
    p = tmp_path / "inplace.prototxt"
    p.write_text(f"""force_backward: true
    layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 dim: 2 dim: 2 }} }} }}
    layer {{ name: "l" type: "{kind}" bottom: "data" top: "data" {params} }}""")
    net = caffe.Net(str(p), caffe.TEST)
    if kind == "BatchNorm":  # mean 0.5, variance 2 per channel, scale factor 1
        net.params["l"][0].data[...] = 0.5
        net.params["l"][1].data[...] = 2.0
        net.params["l"][2].data[...] = 1.0
    x = np.random.default_rng(6).normal(size=(2, 3, 2, 2)).astype(np.float32)
    x[np.abs(x) < 1e-2] = 0.5  # keep away from kinks
    data = net.blobs["data"].data
    data[...] = x
    out = net.forward()
    xd = x.astype(np.float64)
    np.testing.assert_allclose(data, f(xd), rtol=1e-5, atol=1e-6)  # the input blob holds the output
    np.testing.assert_allclose(out["data"], f(xd), rtol=1e-5, atol=1e-6)
    g = np.random.default_rng(7).normal(size=x.shape).astype(np.float32)
    net.blobs["data"].diff[...] = g  # the top diff, on the same blob
    diffs = net.backward()
    np.testing.assert_allclose(net.blobs["data"].diff, g * df(xd), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(diffs["data"], g * df(xd), rtol=1e-4, atol=1e-5)
    if kind == "Scale":  # param diffs use the bottom as it was before the in-place write
        np.testing.assert_allclose(net.params["l"][0].diff, (g * xd).sum((0, 2, 3)), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(net.params["l"][1].diff, g.sum((0, 2, 3)), rtol=1e-4, atol=1e-5)
    if kind == "PReLU":
        np.testing.assert_allclose(net.params["l"][0].diff, (g * np.minimum(xd, 0)).sum((0, 2, 3)),
                                   rtol=1e-4, atol=1e-5)


def test_inplace_dropout_train_on_input(tmp_path: Path) -> None:
    p = tmp_path / "drop.prototxt"
    p.write_text("""force_backward: true
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 50 } } }
    layer { name: "d" type: "Dropout" bottom: "data" top: "data" dropout_param { dropout_ratio: 0.5 } }""")
    net = caffe.Net(str(p), caffe.TRAIN)
    x = np.random.default_rng(8).uniform(0.5, 1.5, size=(4, 50)).astype(np.float32)
    net.blobs["data"].data[...] = x
    net.forward()
    y = net.blobs["data"].data.copy()
    kept = y != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(y[kept], 2 * x[kept], rtol=1e-6)  # Caffe scales kept units by 1/(1-p)
    g = np.random.default_rng(9).normal(size=x.shape).astype(np.float32)
    net.blobs["data"].diff[...] = g
    net.backward()  # the same mask as the forward's
    np.testing.assert_allclose(net.blobs["data"].diff, np.where(kept, 2 * g, 0), rtol=1e-6)


def test_inplace_eltwise_sum_into_input(tmp_path: Path) -> None:
    p = tmp_path / "elt.prototxt"
    p.write_text("""force_backward: true
    layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "b" type: "Input" top: "b" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "s" type: "Eltwise" bottom: "a" bottom: "b" top: "a" }""")
    net = caffe.Net(str(p), caffe.TEST)
    a = np.random.default_rng(10).normal(size=(2, 3)).astype(np.float32)
    b = np.random.default_rng(11).normal(size=(2, 3)).astype(np.float32)
    net.forward(a=a, b=b)
    np.testing.assert_allclose(net.blobs["a"].data, a + b, rtol=1e-6)
    g = np.random.default_rng(12).normal(size=(2, 3)).astype(np.float32)
    net.blobs["a"].diff[...] = g
    net.backward()
    np.testing.assert_allclose(net.blobs["a"].diff, g, rtol=1e-6)
    np.testing.assert_allclose(net.blobs["b"].diff, g, rtol=1e-6)


def test_inplace_chain_on_input(tmp_path: Path) -> None:
    """BatchNorm -> Scale -> ReLU, all in place on the input (a ResNet stem written into 'data')."""
    p = tmp_path / "chain.prototxt"
    p.write_text("""force_backward: true
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 2 dim: 3 } } }
    layer { name: "bn" type: "BatchNorm" bottom: "data" top: "data" batch_norm_param { use_global_stats: true } }
    layer { name: "sc" type: "Scale" bottom: "data" top: "data"
      scale_param { filler { type: 'constant' value: 2 } } }
    layer { name: "relu" type: "ReLU" bottom: "data" top: "data" }""")
    net = caffe.Net(str(p), caffe.TEST)
    net.params["bn"][0].data[...] = 0.0
    net.params["bn"][1].data[...] = 1.0 - 1e-5  # var + eps = 1
    net.params["bn"][2].data[...] = 1.0
    x = np.random.default_rng(13).normal(size=(2, 2, 3)).astype(np.float32)
    x[np.abs(x) < 1e-2] = 0.3
    net.forward(data=x)
    np.testing.assert_allclose(net.blobs["data"].data, np.maximum(2 * x, 0), rtol=1e-5, atol=1e-6)
    g = np.ones_like(x)
    net.blobs["data"].diff[...] = g
    net.backward()
    np.testing.assert_allclose(net.blobs["data"].diff, 2 * (x > 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.params["sc"][0].diff, (x * (x > 0)).sum((0, 2)), rtol=1e-5, atol=1e-5)


def test_blob_reshape_any_blob(tmp_path: Path) -> None:
    f = tmp_path / "live.prototxt"
    f.write_text(IP_NET)
    net = caffe.Net(str(f), caffe.TEST)
    net.blobs["ip"].reshape(3, 4)  # pycaffe reshapes any blob; the layer's next forward reshapes it back
    assert net.blobs["ip"].data.shape == (3, 4) and not net.blobs["ip"].data.any()
    net.blobs["data"].reshape(5, 3)
    net.reshape()
    out = net.forward(data=np.ones((5, 3), np.float32))
    assert out["out"].shape == (5, 2) and net.blobs["ip"].shape == (5, 4)


def test_legacy_accessors_pad_missing_axes_with_trailing_ones(tmp_path):
    # Caffe's Blob::LegacyShape(i) is shape(i) for the axes a blob has and 1 past them, so a
    # (10, 4) blob has num 10, channels 4 (brewing-logreg reads test_nets[0].blobs['data'].num).
    p = tmp_path / "n.prototxt"
    p.write_text('input: "a" input_shape { dim: 10 dim: 4 } input: "b" input_shape { dim: 5 }\n'
                 'input: "c" input_shape { dim: 2 dim: 3 dim: 4 }\n'
                 'layer { name: "s" type: "Silence" bottom: "a" bottom: "b" bottom: "c" }')
    net = caffe.Net(str(p), caffe.TEST)
    legacy = {k: (b.num, b.channels, b.height, b.width) for k, b in net.blobs.items()}
    assert legacy == {"a": (10, 4, 1, 1), "b": (5, 1, 1, 1), "c": (2, 3, 4, 1)}
