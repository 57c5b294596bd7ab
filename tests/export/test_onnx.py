"""ONNX export: Caffe's own numbers (goldens) through onnxruntime, the tricky semantics one by one,
and every exportable deploy net of the corpus against caffeport's forward."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from caffeport.errors import CaffeportError
from caffeport.export.common import load_deploy_net, randomize_weights
from caffeport.export.onnx import NoOnnxForm, check_onnx, net_to_onnx, unsupported_types
from caffeport.io import read_net
from caffeport.surgery import truncate
from tests.export.helpers import corpus_deploy_nets, mflops, net_from_text
from tests.golden import CORPUS, case_dir, case_info, cases, in_case, npz


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


# Golden forward cases that cannot be exported, even cut at the loss input: {case: why}. A case
# listed here that exports (a converter was added) fails the test, so this list stays current.
NO_ONNX_FORM = {
    "accuracy_topk_ignore_perclass": "Accuracy: an evaluation layer",
    "dummydata_constant": "DummyData: a data layer",
    "filter_parameter": "Filter: the top's batch size depends on the selector's values",
    "lstm": "LSTM: per-step state reset from the cont input",
    "rnn": "RNN: per-step state reset from the cont input",
    "python_layer": "Python: arbitrary code",
}


def _export_golden(name: str):
    """(net, export) for a golden case; a net ending in a loss is cut at what feeds the loss."""
    from caffeport.net import Net

    with in_case(name) as d:
        weights = d / "weights.caffemodel" if (d / "weights.caffemodel").exists() else None
        net = Net(d / "net.prototxt", weights, allow_python_layers=True)  # golden fixtures are trusted code
        losses = [lay for lay in net.layers if lay.is_loss]
        if losses:
            cut, _ = truncate(read_net(d / "net.prototxt"), losses[0].param.bottom[0])
            net = Net(cut, root=d)
            if weights:
                net.copy_from(weights)
        return net, net_to_onnx(net)


def test_no_onnx_form_cases_are_golden_forward_cases() -> None:
    assert set(NO_ONNX_FORM) <= set(_golden_forward_cases())


@pytest.mark.parametrize("name", _golden_forward_cases())
def test_golden_forward_through_onnxruntime(name: str) -> None:
    info = case_info(name)
    if name in NO_ONNX_FORM:
        with pytest.raises(NoOnnxForm, match=NO_ONNX_FORM[name].split(":")[0]):
            _export_golden(name)
        return
    net, export = _export_golden(name)
    inputs = npz(name, "inputs.npz")
    ref = npz(name, "forward.npz")
    got = run_ort(export.model, {k: inputs[k].astype(np.float32) for k in export.inputs}, export.outputs)
    atol, rtol = max(info.get("atol", 1e-5), 1e-5), max(info.get("rtol", 1e-4), 1e-4)
    assert got, f"{name}: nothing to compare"
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
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
        layer { name: "rois" type: "Input" top: "rois" input_param { shape { dim: 2 dim: 5 } } }
        layer { name: "roi" type: "ROIPooling" bottom: "data" bottom: "rois" top: "roi"
                roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 1 } }""")
    with pytest.raises(NoOnnxForm, match=r"'roi' \(ROIPooling\).*FLT_MIN"):
        net_to_onnx(net)


ZOO2 = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 9 dim: 7 } } }
layer { name: "idx" type: "Input" top: "idx" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "mvn" type: "MVN" bottom: "data" top: "mvn" mvn_param { eps: 0.01 } }
layer { name: "mvn2" type: "MVN" bottom: "data" top: "mvn2"
        mvn_param { across_channels: true normalize_variance: false } }
layer { name: "bn" type: "BN" bottom: "mvn" top: "bn" }
layer { name: "interp" type: "Interp" bottom: "bn" top: "interp"
        interp_param { zoom_factor: 3 pad_beg: -1 pad_end: -1 } }
layer { name: "interp2" type: "Interp" bottom: "mvn2" top: "interp2" interp_param { height: 4 width: 11 } }
layer { name: "spp" type: "SPP" bottom: "interp" top: "spp" spp_param { pyramid_height: 3 pool: MAX } }
layer { name: "spp2" type: "SPP" bottom: "interp2" top: "spp2" spp_param { pyramid_height: 2 pool: AVE } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "mask"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool2" type: "Pooling" bottom: "data" top: "pool2" top: "mask2"
        pooling_param { pool: MAX kernel_size: 2 stride: 3 pad: 1 } }
layer { name: "im2col" type: "Im2col" bottom: "data" top: "cols"
        convolution_param { kernel_h: 3 kernel_w: 2 stride: 2 pad: 1 dilation: 2 } }
layer { name: "tile" type: "Tile" bottom: "pool" top: "tile" tile_param { axis: 2 tiles: 3 } }
layer { name: "r1" type: "Reduction" bottom: "tile" top: "r1" reduction_param { operation: ASUM axis: 2 coeff: -0.5 } }
layer { name: "r2" type: "Reduction" bottom: "tile" top: "r2" reduction_param { operation: MEAN axis: 1 } }
layer { name: "r3" type: "Reduction" bottom: "cols" top: "r3" reduction_param { operation: SUMSQ axis: -1 coeff: 2 } }
layer { name: "am1" type: "ArgMax" bottom: "data" top: "am1" argmax_param { top_k: 3 out_max_val: true } }
layer { name: "am2" type: "ArgMax" bottom: "data" top: "am2" argmax_param { top_k: 2 axis: 1 } }
layer { name: "am3" type: "ArgMax" bottom: "data" top: "am3" argmax_param { top_k: 2 axis: 3 out_max_val: true } }
layer { name: "am4" type: "ArgMax" bottom: "data" top: "am4" }
layer { name: "emb" type: "Embed" bottom: "idx" top: "emb" embed_param { num_output: 5 input_dim: 4 } }
"""


def test_more_layers_export_exactly() -> None:
    net = net_from_text(ZOO2)
    export = net_to_onnx(net, dynamic_batch=True)
    assert {"spp", "spp2", "mask", "mask2", "am1", "am2", "am3", "am4", "emb", "r1", "r2", "r3"} <= set(export.outputs)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 9, 7)).astype(np.float32)
    x[0, :, 2, :] = x[0, :, 3, :]  # ties: Caffe picks the larger index (ArgMax) / the first maximum (mask)
    idx = np.array([[0.2, 3.9, 1.0], [2.5, 0.0, 3.0]], np.float32)  # Embed truncates
    got = run_ort(export.model, {"data": x, "idx": idx}, export.outputs)
    want = net.forward(data=x, idx=idx)
    for name, value in zip(export.outputs, got):
        np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    onnx.checker.check_model(export.model, full_check=True)  # (check_onnx would feed random indices)


def test_segnet_upsample_exports_exactly() -> None:
    net = net_from_text("""
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 7 dim: 9 } } }
    layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "mask"
            pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
    layer { name: "up" type: "Upsample" bottom: "pool" bottom: "mask" top: "up"
            upsample_param { upsample_h: 7 upsample_w: 9 } }
    """)
    export = net_to_onnx(net, dynamic_batch=True)
    x = np.random.default_rng(3).standard_normal((2, 3, 7, 9)).astype(np.float32)
    (got,) = run_ort(export.model, {"data": x}, ["up"])
    want = net.forward(data=x)["up"]
    # an independent unpooling in numpy: each pooled value back at its window's first argmax, zeros
    # elsewhere; Caffe's CEIL rounding gives 4x5 windows, the last row/column clipped to the image
    ref = np.zeros_like(x)
    for i in range(4):
        for j in range(5):
            win = x[:, :, 2 * i:min(2 * i + 2, 7), 2 * j:min(2 * j + 2, 9)]
            w = win.shape[3]
            k = win.reshape(2, 3, -1).argmax(-1)
            dy, dx = np.divmod(k, w)
            for n in range(2):
                for c in range(3):
                    ref[n, c, 2 * i + dy[n, c], 2 * j + dx[n, c]] = win[n, c, dy[n, c], dx[n, c]]
    np.testing.assert_array_equal(want, ref)
    np.testing.assert_array_equal(got, ref)


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
_FRCNN = "3_model_zoo/py_faster_rcnn/models/pascal_voc/"
_PSP = "3_model_zoo/pspnet_hszhao/evaluation/prototxt/"
_RESNET = "3_model_zoo/resnet_KaimingHe/prototxt/"
_SSD_TYPES = {"DetectionOutput"}

# Deploy nets that must not build: {net: text the error must contain}. (py-faster-rcnn's end2end nets
# build since rpn.proposal_layer has a built-in equivalent, caffeport/layers/proposal.py.)
NO_BUILD: dict[str, str] = {}
# Deploy nets that build but have no ONNX form: {net: the layer types without one}.
NO_ONNX = {
    _FRCNN + "VGG16/faster_rcnn_end2end/test.prototxt": {"Python", "ROIPooling"},  # built-in RPN proposals
    _FRCNN + "ZF/faster_rcnn_end2end/test.prototxt": {"Python", "ROIPooling"},
    _FRCNN + "VGG16/fast_rcnn/test.prototxt": {"ROIPooling"},
    _FRCNN + "ZF/fast_rcnn/test.prototxt": {"ROIPooling"},
    "3_model_zoo/mobilenet_ssd_chuanqi305/MobileNetSSD_deploy.prototxt": _SSD_TYPES,
    "3_model_zoo/mobilenet_ssd_chuanqi305/deploy.prototxt": _SSD_TYPES,
    "3_model_zoo/ssd_vgg16_voc0712/models/VGGNet/VOC0712/SSD_300x300/deploy.prototxt": _SSD_TYPES,
    "4_real_caffemodels/libfacedetection_yufacedetectnet/models/caffe/yufacedetectnet-open-v1.prototxt": _SSD_TYPES,
    "4_real_caffemodels/libfacedetection_yufacedetectnet/models/caffe/yufacedetectnet-open-v2.prototxt": _SSD_TYPES,
}
# Nets run with a smaller image than declared (weights are random, so only fc fan-ins change): the
# short side becomes SMALL_SIDE unless INPUT_SIDE says otherwise.
SMALL_SIDE = 64
INPUT_SIDE = {
    # fc6-conv's 6x6 kernel needs pool5 at 6x6
    "2_bvlc_caffe/head/examples/net_surgery/bvlc_caffenet_full_conv.prototxt": 227,
    "2_bvlc_caffe/legacy_v1_2015-02/examples/imagenet/bvlc_caffenet_full_conv.prototxt": 227,
    # SSD's extra layers (3x3 convolutions without padding) need about the declared size
    "3_model_zoo/ssd_vgg16_voc0712/models/VGGNet/VOC0712/SSD_300x300/deploy.prototxt": 300,
    "3_model_zoo/mobilenet_ssd_chuanqi305/MobileNetSSD_deploy.prototxt": 300,
    "3_model_zoo/mobilenet_ssd_chuanqi305/deploy.prototxt": 300,
    # PSPNet: 41 gives a 6x6 conv5_3 (473 gives 60x60), with the pyramid rescaled (PSP_SHRINK)
    _PSP + "pspnet101_VOC2012_473.prototxt": 41,
    _PSP + "pspnet50_ADE20K_473.prototxt": 41,
    _RESNET + "ResNet-152-deploy.prototxt": 48,
    # VGG: five 2x2 pools still leave 1x1
    "3_model_zoo/vgg/aizvorski_vgg-benchmarks/vgg16_deploy.prototxt": 32,
    "3_model_zoo/vgg/crowsonkb_style_transfer/VGG_ILSVRC_19_layers_deploy.prototxt": 32,
    "3_model_zoo/vgg/crowsonkb_style_transfer/vgg16.prototxt": 32,
    "3_model_zoo/vgg/crowsonkb_style_transfer/vgg19.prototxt": 32,
}
# Final poolings whose kernel is the whole map at the declared size: made global_pooling (the
# same at that size) so that the net also runs on a small image.
GLOBAL_POOL = {
    "2_bvlc_caffe/head/models/bvlc_googlenet/deploy.prototxt": ["pool5/7x7_s1"],
    "2_bvlc_caffe/legacy_v1_2015-02/models/bvlc_googlenet/deploy.prototxt": ["pool5/7x7_s1"],
    _RESNET + "ResNet-50-deploy.prototxt": ["pool5"],
    _RESNET + "ResNet-101-deploy.prototxt": ["pool5"],
    _RESNET + "ResNet-152-deploy.prototxt": ["pool5"],
}
PSP_SHRINK = 10  # pyramid pooling kernels/strides and the 60x60 Interps, divided
MAX_MFLOPS = 1500
# Nets above MAX_MFLOPS even at their smallest size: {net: why} (checked at batch 1 only).
HEAVY = {
    "3_model_zoo/fcn_shelhamer/voc-fcn8s/deploy.prototxt": "conv1_1's pad 100 keeps the maps large",
    _PSP + "pspnet101_VOC2012_473.prototxt": "dilated ResNet-101 at 1/8 with a 4096-channel head",
    _PSP + "pspnet50_ADE20K_473.prototxt": "dilated ResNet-50 at 1/8 with a 4096-channel head",
}


def _rel(path) -> str:
    return str(path.relative_to(CORPUS))


def _small_message(path):
    """The deploy net's message at its test size (see INPUT_SIDE, GLOBAL_POOL, PSP_SHRINK)."""
    from caffeport.export.common import set_input_shapes
    from caffeport.graph import filter_net, net_state
    from caffeport.proto import caffe_pb2

    rel = _rel(path)
    msg = filter_net(read_net(path), net_state(caffe_pb2.TEST, 0, ()), str(path))
    side = INPUT_SIDE.get(rel, SMALL_SIDE)
    shapes = {}
    for lp in msg.layer:
        if lp.type != "Input":
            continue
        for top, shape in zip(lp.top, lp.input_param.shape):
            dims = [int(d) for d in shape.dim]
            if len(dims) == 4 and min(dims[2:]) > side:
                f = side / min(dims[2:])
                dims = [1, dims[1], *(max(side, round(d * f)) for d in dims[2:])]
            shapes[top] = [1, *dims[1:]] if dims else dims
    set_input_shapes(msg, shapes, str(path))
    names = GLOBAL_POOL.get(rel, [])
    for lp in msg.layer:
        if lp.name in names:
            assert lp.type == "Pooling" and not lp.pooling_param.global_pooling, f"{rel}: GLOBAL_POOL {lp.name}"
            lp.pooling_param.global_pooling = True
            for f in ("kernel_size", "kernel_h", "kernel_w", "stride", "stride_h", "stride_w"):
                lp.pooling_param.ClearField(f)
    assert sum(lp.name in names for lp in msg.layer) == len(names), f"{rel}: GLOBAL_POOL names a missing layer"
    if rel.startswith(_PSP):
        for lp in msg.layer:
            if lp.type == "Pooling" and "_pool" in lp.name and lp.pooling_param.kernel_size >= PSP_SHRINK:
                lp.pooling_param.kernel_size //= PSP_SHRINK
                lp.pooling_param.stride //= PSP_SHRINK
            if lp.type == "Interp" and lp.interp_param.HasField("height"):
                lp.interp_param.height //= PSP_SHRINK
                lp.interp_param.width //= PSP_SHRINK
    msg.name = msg.name or rel
    return msg


def test_corpus_expectations_name_corpus_nets() -> None:
    rels = {_rel(p) for p in DEPLOY_NETS}
    for table in (NO_BUILD, NO_ONNX, INPUT_SIDE, GLOBAL_POOL, HEAVY):
        assert set(table) <= rels, set(table) - rels


@pytest.mark.parametrize("path", DEPLOY_NETS, ids=[_rel(p) for p in DEPLOY_NETS])
def test_corpus_deploy_net_exports(path) -> None:
    from caffeport.net import Net

    rel = _rel(path)
    msg = _small_message(path)
    if rel in NO_BUILD:
        with pytest.raises(CaffeportError, match=NO_BUILD[rel]):
            Net(msg, root=path.parent)
        return
    net = Net(msg, root=path.parent)
    net.source = rel
    assert all(d > 0 for s in net._shapes.values() for d in s), f"{rel}: empty blobs at the test size"
    if rel in NO_ONNX:
        assert unsupported_types(net) == NO_ONNX[rel]
        with pytest.raises(NoOnnxForm, match="|".join(NO_ONNX[rel])):
            net_to_onnx(net)
        return
    cost = mflops(net)
    if rel in HEAVY:
        assert cost > MAX_MFLOPS, f"{rel} costs {cost:.0f} MFLOPs now: remove it from HEAVY"
    else:
        assert cost <= MAX_MFLOPS, f"{rel}: {cost:.0f} MFLOPs at {net._shapes[net.inputs[0]]}: shrink it"
    randomize_weights(net, 0)
    export = net_to_onnx(net, dynamic_batch=True)
    err = check_onnx(export, net, batch_sizes=[1] if rel in HEAVY else [2])
    assert err < 1e-4


def test_corpus_has_exportable_nets() -> None:
    assert len(DEPLOY_NETS) >= 40


# SSD deploy nets cut just before DetectionOutput (no ONNX form): the graph up to its bottoms (loc,
# softmaxed conf, priors) runs Normalize, Permute, Flatten, Concat and PriorBox on real nets.
SSD_NETS = sorted(rel for rel, types in NO_ONNX.items() if types == _SSD_TYPES)
# Real trained weights where the corpus has them (the other nets get random ones).
SSD_WEIGHTS = {
    rel: rel.replace(".prototxt", ".caffemodel") for rel in SSD_NETS if rel.startswith("4_real_caffemodels/")
}
SSD_CUT_TYPES = {"Normalize", "Permute", "Flatten", "Concat", "PriorBox", "Softmax"}


def test_ssd_nets_listed() -> None:
    assert len(SSD_NETS) == 5 and len(SSD_WEIGHTS) == 2
    assert all((CORPUS / w).exists() for w in SSD_WEIGHTS.values())


@pytest.mark.parametrize("rel", SSD_NETS)
def test_ssd_net_exports_up_to_detection_output(rel: str) -> None:
    from caffeport.net import Net

    path = CORPUS / rel
    msg = _small_message(path)  # yufacedetectnet runs at 64x85; SSD300 nets need their 300x300
    (det,) = [lp for lp in msg.layer if lp.type == "DetectionOutput"]
    assert det is msg.layer[-1], f"{rel}: DetectionOutput is not the last layer"
    bottoms = list(det.bottom)
    del msg.layer[-1]
    net = Net(msg, root=path.parent)
    net.source = rel
    assert sorted(net.outputs) == sorted(bottoms) == ["mbox_conf_flatten", "mbox_loc", "mbox_priorbox"]
    types = {lay.param.type for lay in net.layers}
    assert SSD_CUT_TYPES - {"Normalize"} <= types, SSD_CUT_TYPES - types
    if rel in SSD_WEIGHTS:
        copied = net.copy_from(CORPUS / SSD_WEIGHTS[rel])
        assert set(copied) == {p.layer.name for p in net._plans if len(p.layer.blobs)}, f"{rel}: weights missing"
        assert "Normalize" in types
    else:
        randomize_weights(net, 0)
    export = net_to_onnx(net, dynamic_batch=True)
    assert not unsupported_types(net)
    ops = {n.op_type for n in export.model.graph.node}
    assert {"Transpose", "Reshape", "Concat", "Softmax"} <= ops, ops
    # mbox_priorbox is a batch-independent (1, 2, 4 * priors) top, like Caffe's
    assert net._shapes["mbox_priorbox"][:2] == (1, 2)
    assert net._shapes["mbox_priorbox"][2] == net._shapes["mbox_loc"][1]
    err = check_onnx(export, net, batch_sizes=[1, 2])
    assert err < 1e-4


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
    net = load_deploy_net(CORPUS / model, CORPUS / weights, batch=1)
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
