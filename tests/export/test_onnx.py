"""ONNX export: Caffe's own numbers (goldens) through onnxruntime, the tricky semantics one by one,
and every exportable deploy net of the corpus against caffeport's forward."""

from __future__ import annotations

import os

import numpy as np
import pytest

from caffeport.errors import CaffeportError
from caffeport.export.common import load_deploy_net, randomize_weights
from caffeport.export.onnx import NoOnnxForm, check_onnx, net_to_onnx, unsupported_layers
from caffeport.io import read_net
from caffeport.surgery import truncate
from tests.export.helpers import corpus_deploy_nets, mflops, net_from_text
from tests.golden import CORPUS, case_dir, case_info, cases, in_case, npz

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def run_ort(model, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


# --------------------------------------------------------------------------------------------------
# goldens: onnxruntime on the exported graph vs BVLC Caffe's recorded forward
# --------------------------------------------------------------------------------------------------
def _golden_forward_cases() -> list[str]:
    out = []
    for name in cases("forward"):
        info = case_info(name)
        if info.get("phase", "TEST") == "TEST":
            out.append(name)
    return out


@pytest.mark.parametrize("name", _golden_forward_cases())
def test_golden_forward_through_onnxruntime(name: str) -> None:
    from caffeport.net import Net

    info = case_info(name)
    with in_case(name) as d:
        try:
            net = Net(d / "net.prototxt", d / "weights.caffemodel" if (d / "weights.caffemodel").exists() else None)
        except CaffeportError as e:
            pytest.skip(f"caffeport cannot build it yet: {e}")
        try:
            export = net_to_onnx(net)
        except NoOnnxForm as e:
            losses = [lay for lay in net.layers if lay.is_loss]
            if not losses:
                pytest.skip(str(e))
            # A net ending in a loss: export what feeds the loss and compare that blob with Caffe's.
            cut, _ = truncate(read_net(d / "net.prototxt"), losses[0].param.bottom[0])
            net = Net(cut, root=d)
            net.copy_from(d / "weights.caffemodel")
            try:
                export = net_to_onnx(net)
            except NoOnnxForm as e2:
                pytest.skip(str(e2))
    inputs = npz(name, "inputs.npz")
    ref = npz(name, "forward.npz")
    got = run_ort(export.model, {k: inputs[k].astype(np.float32) for k in export.inputs}, export.outputs)
    atol, rtol = max(info.get("atol", 1e-5), 1e-5), max(info.get("rtol", 1e-4), 1e-4)
    for blob, value in zip(net.outputs, got):
        want = ref[blob]
        assert value.shape == want.shape, f"{name}: {blob} shape {value.shape} vs Caffe {want.shape}"
        np.testing.assert_allclose(value, want, atol=atol, rtol=rtol, err_msg=f"{name}: {blob}")
    assert case_dir(name).exists()


# --------------------------------------------------------------------------------------------------
# pooling: CEIL rounding, pad clipping, the AVE divisor
# --------------------------------------------------------------------------------------------------
def caffe_pool_reference(x: np.ndarray, method: str, k: int, s: int, p: int, ceil: bool = True) -> np.ndarray:
    """Caffe's PoolingLayer::Forward_cpu written out with loops (square kernel)."""
    N, C, H, W = x.shape

    def size(n: int) -> int:
        q = (n + 2 * p - k) / s
        o = int(np.ceil(q) if ceil else np.floor(q)) + 1
        if p and (o - 1) * s >= n + p:
            o -= 1
        return o

    oh, ow = size(H), size(W)
    y = np.zeros((N, C, oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * s - p, j * s - p
            he, we = min(hs + k, H + p), min(ws + k, W + p)
            div = (he - hs) * (we - ws)
            hs0, ws0, he0, we0 = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
            win = x[:, :, hs0:he0, ws0:we0]
            if method == "MAX":
                y[:, :, i, j] = win.max(axis=(2, 3))
            else:
                y[:, :, i, j] = win.sum(axis=(2, 3)) / div
    return y


POOL_CASES = [
    # (H, W, k, s, p): each pins a different corner of Caffe's size rule
    (8, 8, 3, 2, 0),    # ceil overflow, no pad
    (7, 7, 3, 2, 1),    # pad, the last window would start in the pad: clipped
    (6, 9, 2, 2, 1),    # pad, clip on one axis only
    (10, 10, 3, 3, 0),  # ceil adds a window that covers 1 pixel
    (13, 13, 3, 2, 1),
    (5, 5, 4, 3, 2),    # end pad beyond the kernel's reach
    (6, 6, 3, 1, 2),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("H,W,k,s,p", POOL_CASES)
def test_pooling_ceil_and_pad(method: str, H: int, W: int, k: int, s: int, p: int) -> None:
    net = net_from_text(f"""
        layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 dim: {H} dim: {W} }} }} }}
        layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool"
                 pooling_param {{ pool: {method} kernel_size: {k} stride: {s} pad: {p} }} }}""")
    export = net_to_onnx(net, dynamic_batch=True)
    for node in export.model.graph.node:
        assert all(a.name != "ceil_mode" or a.i == 0 for a in node.attribute), "ceil_mode must not be used"
    x = np.random.default_rng(1).standard_normal((2, 3, H, W)).astype(np.float32)
    (got,) = run_ort(export.model, {"data": x}, export.outputs)
    np.testing.assert_allclose(got, caffe_pool_reference(x, method, k, s, p), rtol=1e-5, atol=1e-6)
    assert check_onnx(export, net, batch_sizes=[1, 3]) < 1e-5


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_floor_and_global(method: str) -> None:
    net = net_from_text(f"""
        layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 2 dim: 9 dim: 9 }} }} }}
        layer {{ name: "p1" type: "Pooling" bottom: "data" top: "p1"
                 pooling_param {{ pool: {method} kernel_size: 2 stride: 2 pad: 1 round_mode: FLOOR }} }}
        layer {{ name: "p2" type: "Pooling" bottom: "p1" top: "p2"
                 pooling_param {{ pool: {method} global_pooling: true }} }}""")
    export = net_to_onnx(net)
    x = np.random.default_rng(2).standard_normal((1, 2, 9, 9)).astype(np.float32)
    got = run_ort(export.model, {"data": x}, ["p2"])[0]
    p1 = caffe_pool_reference(x, method, 2, 2, 1, ceil=False)
    want = p1.max(axis=(2, 3), keepdims=True) if method == "MAX" else p1.mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    check_onnx(export, net)


# --------------------------------------------------------------------------------------------------
# LRN, grouped (de)convolution, the rest of the common layers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_lrn(region: str) -> None:
    net = net_from_text(f"""
        layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 6 dim: 7 dim: 5 }} }} }}
        layer {{ name: "lrn" type: "LRN" bottom: "data" top: "lrn"
                 lrn_param {{ local_size: 3 alpha: 0.5 beta: 0.75 k: 2 norm_region: {region} }} }}""")
    export = net_to_onnx(net)
    x = np.random.default_rng(3).standard_normal((2, 6, 7, 5)).astype(np.float32)
    (got,) = run_ort(export.model, {"data": x}, ["lrn"])
    if region == "WITHIN_CHANNEL":  # Caffe: k is unused, the divisor is size^2 including padding
        sq = np.pad(x * x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        avg = sum(sq[:, :, i:i + 7, j:j + 5] for i in range(3) for j in range(3)) / 9
        want = x * (1 + 0.5 * avg) ** -0.75
    else:
        sq = np.pad(x * x, ((0, 0), (1, 1), (0, 0), (0, 0)))
        want = x * (2 + 0.5 / 3 * (sq[:, :-2] + sq[:, 1:-1] + sq[:, 2:])) ** -0.75
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert check_onnx(export, net) < 1e-5


def test_grouped_conv_and_deconv() -> None:
    net = net_from_text("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 11 dim: 9 } } }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
                convolution_param { num_output: 6 group: 2 kernel_h: 3 kernel_w: 2 stride: 2 pad_h: 1 pad_w: 0
                                    dilation: 1 } }
        layer { name: "dil" type: "Convolution" bottom: "conv" top: "dil"
                convolution_param { num_output: 6 group: 3 kernel_size: 3 pad: 2 dilation: 2 bias_term: false } }
        layer { name: "deconv" type: "Deconvolution" bottom: "dil" top: "deconv"
                convolution_param { num_output: 4 group: 2 kernel_size: 4 stride: 2 pad: 1 } }""")
    export = net_to_onnx(net, dynamic_batch=True)
    assert check_onnx(export, net, batch_sizes=[1, 3]) < 1e-5
    x = np.random.default_rng(4).standard_normal((2, 4, 11, 9)).astype(np.float32)
    (got,) = run_ort(export.model, {"data": x}, ["deconv"])
    # independent check: torch's own conv ops on the same weights
    import torch
    import torch.nn.functional as F

    w = {n: [torch.from_numpy(a) for a in b] for n, b in net.state_blobs().items()}
    y = F.conv2d(torch.from_numpy(x), *w["conv"], stride=2, padding=(1, 0), groups=2)
    y = F.conv2d(y, w["dil"][0], padding=2, dilation=2, groups=3)
    y = F.conv_transpose2d(y, *w["deconv"], stride=2, padding=1, groups=2)
    np.testing.assert_allclose(got, y.numpy(), rtol=1e-4, atol=1e-5)


ZOO = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 8 dim: 8 } } }
layer { name: "ref" type: "Input" top: "ref" input_param { shape { dim: 2 dim: 4 dim: 5 dim: 6 } } }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" }
layer { name: "sc" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true } }
layer { name: "prelu" type: "PReLU" bottom: "bn" top: "prelu" }
layer { name: "crop" type: "Crop" bottom: "prelu" bottom: "ref" top: "crop" crop_param { axis: 2 offset: 1 offset: 2 } }
layer { name: "slice" type: "Slice" bottom: "crop" top: "s1" top: "s2" slice_param { axis: 1 slice_point: 1 } }
layer { name: "pow" type: "Power" bottom: "s2" top: "pow" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "cat" type: "Concat" bottom: "pow" bottom: "s1" top: "cat" concat_param { axis: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "cat" bottom: "crop" top: "sum"
        eltwise_param { operation: SUM coeff: 0.5 coeff: -2 } }
layer { name: "prod" type: "Eltwise" bottom: "sum" bottom: "crop" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "sum" top: "max" eltwise_param { operation: MAX } }
layer { name: "relu" type: "ReLU" bottom: "max" top: "max" relu_param { negative_slope: 0.1 } }
layer { name: "tanh" type: "TanH" bottom: "max" top: "tanh" }
layer { name: "sig" type: "Sigmoid" bottom: "tanh" top: "sig" }
layer { name: "absv" type: "AbsVal" bottom: "sum" top: "absv" }
layer { name: "bnll" type: "BNLL" bottom: "absv" top: "bnll" }
layer { name: "elu" type: "ELU" bottom: "sum" top: "elu" elu_param { alpha: 0.7 } }
layer { name: "exp" type: "Exp" bottom: "sig" top: "exp" exp_param { base: 2 scale: 0.5 shift: 0.1 } }
layer { name: "log" type: "Log" bottom: "exp" top: "log" log_param { base: 10 scale: 2 shift: 0.5 } }
layer { name: "drop" type: "Dropout" bottom: "log" top: "log" }
layer { name: "flat" type: "Flatten" bottom: "log" top: "flat" flatten_param { axis: 2 } }
layer { name: "resh" type: "Reshape" bottom: "flat" top: "resh" reshape_param { shape { dim: 0 dim: -1 dim: 5 } } }
layer { name: "soft" type: "Softmax" bottom: "resh" top: "soft" softmax_param { axis: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "elu" top: "ip" inner_product_param { num_output: 7 } }
layer { name: "ip2" type: "InnerProduct" bottom: "bnll" top: "ip2" inner_product_param { num_output: 3 axis: 2 } }
layer { name: "sm1" type: "Softmax" bottom: "ip" top: "sm1" }
"""


def test_layer_zoo_exports_exactly() -> None:
    net = net_from_text(ZOO)
    export = net_to_onnx(net, dynamic_batch=True)
    assert set(export.outputs) == {"soft", "sm1", "ip2"}
    assert check_onnx(export, net, batch_sizes=[1, 2, 3]) < 1e-5


def test_unsupported_layer_is_named() -> None:
    net = net_from_text("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
        layer { name: "norm1" type: "MVN" bottom: "data" top: "norm1" }""")
    with pytest.raises(CaffeportError, match=r"'norm1' \(MVN\)"):
        net_to_onnx(net)


def test_check_catches_a_wrong_graph() -> None:
    """The check itself must fail when the graph is wrong (here: a corrupted initializer)."""
    net = net_from_text("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
                convolution_param { num_output: 2 kernel_size: 3 } }""")
    export = net_to_onnx(net)
    init = export.model.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 1.0
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    with pytest.raises(CaffeportError, match="relative error"):
        check_onnx(export, net)


# --------------------------------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------------------------------
CATS_DOGS = CORPUS / "1_tutorial_cats_dogs" / "caffe_models" / "caffe_model_2"
DEPLOY_NETS = corpus_deploy_nets()
# Raise with CAFFEPORT_EXPORT_MAX_MFLOPS=1e9 to check every corpus net at full size (minutes).
MAX_MFLOPS = float(os.environ.get("CAFFEPORT_EXPORT_MAX_MFLOPS", "100"))


def _affordable_net(path):
    """The net at batch 1, its spatial input size shrunk (1, 1/2, 1/4, 1/8) until it costs at most
    MAX_MFLOPS (the weights are random, so a smaller image only shrinks fc fan-ins)."""
    net = load_deploy_net(path, batch=1)
    if mflops(net) <= MAX_MFLOPS:
        return net, 1
    full = {n: net._shapes[n] for n in net.inputs}
    for div in (2, 4, 8):
        shapes = {n: (*s[:2], *(max(d // div, 8) for d in s[2:])) for n, s in full.items()}
        try:
            small = load_deploy_net(path, input_shapes=shapes, batch=1)
        except CaffeportError:
            continue
        if all(all(d > 0 for d in sh) for sh in small._shapes.values()) and mflops(small) <= MAX_MFLOPS:
            return small, div
    pytest.skip(f"{mflops(net):.0f} MFLOPs > {MAX_MFLOPS:.0f} even with a smaller input")


@pytest.mark.parametrize("path", DEPLOY_NETS, ids=[str(p.relative_to(CORPUS)) for p in DEPLOY_NETS])
def test_corpus_deploy_net_exports(path) -> None:
    try:
        load_deploy_net(path, batch=1)
    except CaffeportError as e:
        pytest.skip(f"does not build: {str(e)[:120]}")
    net, _ = _affordable_net(path)
    bad = unsupported_layers(net)
    if bad:
        pytest.skip(f"no ONNX form: {', '.join(bad)[:120]}")
    randomize_weights(net, 0)
    try:
        export = net_to_onnx(net, dynamic_batch=True)
    except NoOnnxForm as e:
        pytest.skip(str(e)[:160])
    err = check_onnx(export, net, batch_sizes=[1, 2])
    assert err < 1e-4


def test_corpus_has_exportable_nets() -> None:
    assert len(DEPLOY_NETS) >= 40


REAL_WEIGHTS = [
    ("4_real_caffemodels/everpeace_caffe_2014/examples/mnist/lenet.prototxt",
     "4_real_caffemodels/everpeace_caffe_2014/examples/mnist/lenet_iter_10000.caffemodel"),
    ("4_real_caffemodels/everpeace_caffe_2014/examples/cifar10/cifar10_quick.prototxt",
     "4_real_caffemodels/everpeace_caffe_2014/examples/cifar10/cifar10_quick_iter_5000.caffemodel"),
    ("4_real_caffemodels/mtcnn_kpzhang93/code/codes/MTCNNv2/model/det1.prototxt",
     "4_real_caffemodels/mtcnn_kpzhang93/code/codes/MTCNNv2/model/det1.caffemodel"),
    ("4_real_caffemodels/mtcnn_kpzhang93/code/codes/MTCNNv2/model/det4.prototxt",
     "4_real_caffemodels/mtcnn_kpzhang93/code/codes/MTCNNv2/model/det4.caffemodel"),
    ("4_real_caffemodels/vanillacnn_ishay2b/ZOO/vanilla_deploy.prototxt",
     "4_real_caffemodels/vanillacnn_ishay2b/ZOO/vanillaCNN.caffemodel"),
]


@pytest.mark.parametrize("model,weights", REAL_WEIGHTS, ids=[m.split("/")[1] + "/" + m.rsplit("/", 1)[1]
                                                           for m, _ in REAL_WEIGHTS])
def test_real_weights_export(model: str, weights: str) -> None:
    if not (CORPUS / model).exists() or not (CORPUS / weights).exists():
        pytest.skip("not in this corpus")
    try:
        net = load_deploy_net(CORPUS / model, CORPUS / weights, batch=1)
    except CaffeportError as e:
        pytest.skip(f"does not build: {e}")
    export = net_to_onnx(net)
    assert check_onnx(export, net) < 1e-4


def test_cats_dogs_dynamic_batch() -> None:
    net = load_deploy_net(CATS_DOGS / "caffenet_deploy_2.prototxt")
    randomize_weights(net, 0)
    export = net_to_onnx(net, dynamic_batch=True)
    dims = export.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 227, 227]
    assert export.inputs == ["data"] and export.outputs == ["prob"]
    err = check_onnx(export, net, batch_sizes=[1, 3])
    assert err < 1e-4
    assert "onnxruntime batch 3" in export.checks
