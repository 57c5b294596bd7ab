"""Graph passes (caffeport/passes.py): the folded net computes what the exact net (and Caffe) computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffeport
from caffeport.passes import optimize_net
from caffeport.proto import caffe_pb2
from tests.golden import CORPUS, assert_close, case_info, in_case, npz


def _net(text: str, seed: int = 0) -> caffeport.Net:
    msg = text_format.Parse(text, caffe_pb2.NetParameter())
    net = caffeport.Net(msg, phase=caffeport.TEST)
    rng = np.random.default_rng(seed)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = rng.standard_normal(b.shape).astype(np.float32)
    return net


def _random_bn_stats(net: caffeport.Net, seed: int) -> None:
    """BatchNorm blobs [mean_sum, var_sum, factor] and Scale blobs set to random, plausible values."""
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        blobs = net.params.get(layer.name)
        if layer.type_name == "BatchNorm":
            c = blobs[0].shape[0]
            factor = float(rng.uniform(0.5, 3.0))
            blobs[0].data[...] = rng.normal(0, 1, c) * factor
            blobs[1].data[...] = rng.uniform(0.2, 2.0, c) * factor
            blobs[2].data[...] = factor
        elif layer.type_name == "Scale":
            blobs[0].data[...] = rng.uniform(0.5, 1.5, blobs[0].shape)
            blobs[1].data[...] = rng.normal(0, 0.5, blobs[1].shape)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def test_bottleneck_golden_folded_matches_caffe():
    name = "net_resnet_bottleneck"
    info = case_info(name)
    with in_case(name):
        net = caffeport.Net("net.prototxt", "weights.caffemodel", caffeport.TEST)
        new, report = optimize_net(net)
    types = [layer.type_name for layer in new.layers]
    assert "BatchNorm" not in types and "Scale" not in types
    assert len(report.folded) == 8 and report.layers_after == report.layers_before - 8
    assert all(len(new.params[c]) == 2 for c in ("res2a_branch1", "res2a_branch2c"))  # bias added
    out = new.forward(**npz(name, "inputs.npz"))
    ref = npz(name, "forward.npz")
    for k in info["outputs"]:
        assert_close(out[k], ref[k], info["atol"], info["rtol"], f"folded {k}")
    # the original net is untouched
    assert [layer.type_name for layer in net.layers].count("BatchNorm") == 4


@pytest.mark.parametrize("seed", [1, 2])
def test_bottleneck_random_bn_stats(seed):
    with in_case("net_resnet_bottleneck"):
        net = caffeport.Net("net.prototxt", "weights.caffemodel", caffeport.TEST)
    _random_bn_stats(net, seed)
    new, _ = optimize_net(net)
    x = np.random.default_rng(seed).standard_normal((2, 16, 8, 8)).astype(np.float32) * 2
    want = net.forward(data=x)["res2a"].copy()
    got = new.forward(data=x)["res2a"]
    assert _rel(got, want) < 1e-5


def test_resnet50_corpus_random_stats():
    path = CORPUS / "3_model_zoo/resnet_KaimingHe/prototxt/ResNet-50-deploy.prototxt"
    from caffeport.export.common import load_deploy_net, randomize_weights

    net = load_deploy_net(path, None, batch=1)
    randomize_weights(net, 0)
    _random_bn_stats(net, 3)
    new, report = optimize_net(net)
    assert len(report.folded) == 106  # 53 BatchNorm + 53 Scale
    assert report.relu_pairs == 33
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = net.forward(data=x, blobs=["fc1000"])
    got = new.forward(data=x, blobs=["fc1000"])
    assert _rel(got["fc1000"], want["fc1000"]) < 1e-4
    assert _rel(got["prob"], want["prob"]) < 1e-4


_IP_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 5 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 4 bias_term: false transpose: %s } }
layer { name: "pw" type: "Power" bottom: "ip" top: "pw" power_param { power: %s scale: 2 shift: 0.5 } }
layer { name: "drop" type: "Dropout" bottom: "pw" top: "drop" dropout_param { dropout_ratio: 0.3 } }
layer { name: "relu" type: "ReLU" bottom: "drop" top: "out" }
"""


@pytest.mark.parametrize("transpose", ["false", "true"])
def test_power_and_dropout_fold_into_inner_product(transpose):
    net = _net(_IP_NET % (transpose, "1"))
    new, report = optimize_net(net)
    assert [n for n, _ in report.folded] == ["pw", "drop"]
    assert [layer.name for layer in new.layers] == ["data", "ip", "relu"]
    x = np.random.default_rng(5).standard_normal((3, 5)).astype(np.float32)
    w = net.params["ip"][0].data.astype(np.float64)
    h = x @ (w if transpose == "true" else w.T)
    want = np.maximum(2 * h + 0.5, 0)  # independent: (shift + scale x)^1, dropout identity, ReLU
    assert _rel(new.forward(data=x)["out"], want) < 1e-6


def test_nonaffine_layers_stay():
    net = _net(_IP_NET % ("false", "2"))  # Power with power 2 is not affine
    new, report = optimize_net(net)
    assert [layer.name for layer in new.layers] == ["data", "ip", "pw", "relu"]
    assert report.dropped == ["drop"]  # the TEST Dropout is removed anyway (not in place: renamed)
    x = np.random.default_rng(6).standard_normal((3, 5)).astype(np.float32)
    assert _rel(new.forward(data=x)["out"], net.forward(data=x)["out"].copy()) < 1e-6


def test_shared_output_and_batch_stats_not_folded():
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
            convolution_param { num_output: 3 kernel_size: 1 } }
    layer { name: "sc" type: "Scale" bottom: "conv" top: "sc" }
    layer { name: "bn" type: "BatchNorm" bottom: "sc" top: "bn" batch_norm_param { use_global_stats: false } }
    layer { name: "sum" type: "Eltwise" bottom: "conv" bottom: "bn" top: "sum" }
    """
    net = _net(text)
    with torch.no_grad():
        net.params["bn"][2].data[...] = 1.0
    new, report = optimize_net(net)
    assert report.folded == []  # conv's output is also read by Eltwise; bn uses batch statistics
    assert [layer.name for layer in new.layers] == [layer.name for layer in net.layers]


def test_export_onnx_optimize_matches_caffe(tmp_path):
    import onnx
    import onnxruntime as ort
    from click.testing import CliRunner

    from caffeport.cli import main

    name = "net_resnet_bottleneck"
    info = case_info(name)
    out = tmp_path / "opt.onnx"
    with in_case(name):
        res = CliRunner().invoke(main, ["export-onnx", "net.prototxt", "-w", "weights.caffemodel",
                                        "-o", str(out), "--optimize"])
    assert res.exit_code == 0, res.output
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Conv") == 4 and "BatchNormalization" not in ops and "Mul" not in ops
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["res2a"], {"data": npz(name, "inputs.npz")["data"]})[0]
    assert_close(got, npz(name, "forward.npz")["res2a"], info["atol"], info["rtol"], "onnx --optimize res2a")
