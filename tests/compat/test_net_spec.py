"""caffe.NetSpec / caffe.layers / caffe.params / caffe.to_proto.

Oracles: BVLC's python/caffe/test/test_net_spec.py (ported: same nets, same assertions), the
NetParameter text pycaffe itself wrote (the 01-learning-lenet notebook's recorded `cat` of
lenet_auto_train.prototxt, brewing-logreg's nonlinear_auto_*.prototxt and FCN's voc-fcn8s
train/val.prototxt in ../shared/corpus, produced by pycaffe's net_spec), and numpy computations of
the nets caffeport builds from them.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from google.protobuf import text_format

import caffeport.compat as caffe
from caffeport.compat import layers as L
from caffeport.compat import params as P
from caffeport.compat.coord_map import crop
from caffeport.errors import CaffeportError
from caffeport.io.lmdb_store import LMDBWriter, array_to_datum
from tests.golden import CORPUS

FCN8S = CORPUS / "3_model_zoo/fcn_shelhamer/voc-fcn8s"
HDF5_EX = CORPUS / "2_bvlc_caffe/head/examples/hdf5_classification"


# --- BVLC python/caffe/test/test_net_spec.py, ported ---------------------------------------------

def lenet(batch_size: int):
    n = caffe.NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[batch_size, 1, 28, 28]), dict(dim=[batch_size, 1, 1, 1])],
                                  transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type='xavier'))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type='xavier'))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type='xavier'))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type='xavier'))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n.to_proto()


def anon_lenet(batch_size: int):
    data, label = L.DummyData(shape=[dict(dim=[batch_size, 1, 28, 28]), dict(dim=[batch_size, 1, 1, 1])],
                              transform_param=dict(scale=1. / 255), ntop=2)
    conv1 = L.Convolution(data, kernel_size=5, num_output=20, weight_filler=dict(type='xavier'))
    pool1 = L.Pooling(conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    conv2 = L.Convolution(pool1, kernel_size=5, num_output=50, weight_filler=dict(type='xavier'))
    pool2 = L.Pooling(conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    ip1 = L.InnerProduct(pool2, num_output=500, weight_filler=dict(type='xavier'))
    relu1 = L.ReLU(ip1, in_place=True)
    ip2 = L.InnerProduct(relu1, num_output=10, weight_filler=dict(type='xavier'))
    loss = L.SoftmaxWithLoss(ip2, label)
    return loss.to_proto()


def silent_net():
    n = caffe.NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=3), ntop=2)
    n.silence_data = L.Silence(n.data, ntop=0)
    n.silence_data2 = L.Silence(n.data2, ntop=0)
    return n.to_proto()


def load_net(net_proto, tmp_path: Path) -> caffe.Net:
    with tempfile.NamedTemporaryFile(mode="w+", delete=False, dir=tmp_path, suffix=".prototxt") as f:
        f.write(str(net_proto))
    return caffe.Net(f.name, caffe.TEST)


def test_lenet(tmp_path: Path) -> None:
    net_proto = lenet(50)
    assert net_proto.layer[6].bottom == net_proto.layer[6].top  # relu is in-place
    net = load_net(net_proto, tmp_path)
    assert len(net.layers) == 9
    net_proto = anon_lenet(50)
    assert net_proto.layer[6].bottom == net_proto.layer[6].top
    net = load_net(net_proto, tmp_path)
    assert len(net.layers) == 9


def test_zero_tops(tmp_path: Path) -> None:
    net = load_net(silent_net(), tmp_path)
    assert len(net.forward()) == 0


def test_type_error() -> None:
    data = L.DummyData(ntop=2)  # a 2-tuple of Tops
    with pytest.raises(TypeError, match=r"^Silence input 0 is not a Top \(type is <(type|class) 'tuple'>\)$"):
        L.Silence(data, ntop=0)
    L.Silence(*data, ntop=0)  # each element is a Top


# --- the text pycaffe wrote ----------------------------------------------------------------------

# `!cat mnist/lenet_auto_train.prototxt` as recorded in BVLC examples/01-learning-lenet.ipynb
# (pycaffe printed 1/255 with Python 2's double repr; as a float field it is the same value).
NOTEBOOK_LENET_TRAIN = """
layer { name: "data" type: "Data" top: "data" top: "label"
  transform_param { scale: 0.00392156862745 }
  data_param { source: "mnist/mnist_train_lmdb" batch_size: 64 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc1" type: "InnerProduct" bottom: "pool2" top: "fc1"
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "score" type: "InnerProduct" bottom: "fc1" top: "score"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
"""


def notebook_lenet(lmdb: str, batch_size: int):
    """examples/01-learning-lenet.ipynb's lenet()."""
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                             transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type='xavier'))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type='xavier'))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type='xavier'))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type='xavier'))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()


def _parse(text: str) -> caffe.proto.caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe.proto.caffe_pb2.NetParameter())


def test_notebook_lenet_is_the_recorded_net() -> None:
    assert notebook_lenet("mnist/mnist_train_lmdb", 64) == _parse(NOTEBOOK_LENET_TRAIN)


def test_notebook_lenet_runs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 1, 28, 28), dtype=np.uint8)
    labels = [3, 1, 4, 1, 5, 9]
    with LMDBWriter(tmp_path / "mnist_train_lmdb") as w:
        for i, (im, lab) in enumerate(zip(imgs, labels)):
            w.put(f"{i:08d}", array_to_datum(im, lab).SerializeToString())
    path = tmp_path / "lenet_auto_train.prototxt"
    path.write_text(str(notebook_lenet(str(tmp_path / "mnist_train_lmdb"), 4)))
    net = caffe.Net(str(path), caffe.TRAIN)
    out = net.forward()
    shapes = {k: tuple(v.data.shape) for k, v in net.blobs.items()}
    assert shapes["data"] == (4, 1, 28, 28) and shapes["conv1"] == (4, 20, 24, 24)
    assert shapes["pool1"] == (4, 20, 12, 12) and shapes["conv2"] == (4, 50, 8, 8)
    assert shapes["pool2"] == (4, 50, 4, 4) and shapes["fc1"] == (4, 500) and shapes["score"] == (4, 10)
    np.testing.assert_allclose(net.blobs["data"].data, imgs[:4].astype(np.float32) * np.float32(1 / 255), rtol=1e-6)
    np.testing.assert_array_equal(net.blobs["label"].data, labels[:4])
    s = net.blobs["score"].data.astype(np.float64)
    logp = s - s.max(1, keepdims=True) - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True))
    want = -logp[np.arange(4), labels[:4]].mean()
    np.testing.assert_allclose(float(out["loss"]), want, rtol=1e-5)
    assert [(k, v[0].data.shape) for k, v in net.params.items()] == [
        ("conv1", (20, 1, 5, 5)), ("conv2", (50, 20, 5, 5)), ("fc1", (500, 800)), ("score", (10, 500))]


def nonlinear_net(hdf5: str, batch_size: int):
    """examples/brewing-logreg.ipynb's nonlinear_net()."""
    n = caffe.NetSpec()
    n.data, n.label = L.HDF5Data(batch_size=batch_size, source=hdf5, ntop=2)
    n.ip1 = L.InnerProduct(n.data, num_output=40, weight_filler=dict(type='xavier'))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.ip1, num_output=2, weight_filler=dict(type='xavier'))
    n.accuracy = L.Accuracy(n.ip2, n.label)
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n.to_proto()


@pytest.mark.parametrize("split", ["train", "test"])
def test_brewing_logreg_text_is_pycaffes(split: str) -> None:
    got = str(nonlinear_net(f"examples/hdf5_classification/data/{split}.txt", 10))
    assert got == (HDF5_EX / f"nonlinear_auto_{split}.prototxt").read_text()


def test_brewing_logreg_net_runs_as_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 4)).astype(np.float32)
    y = rng.integers(0, 2, 10).astype(np.float32)
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f["data"], f["label"] = x, y
    (tmp_path / "train.txt").write_text(str(tmp_path / "train.h5") + "\n")
    path = tmp_path / "net.prototxt"
    path.write_text(str(nonlinear_net(str(tmp_path / "train.txt"), 10)))
    net = caffe.Net(str(path), caffe.TRAIN)
    out = net.forward()
    w1, b1 = (p.data.astype(np.float64) for p in net.params["ip1"])
    w2, b2 = (p.data.astype(np.float64) for p in net.params["ip2"])
    s = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
    logp = s - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True)) - s.max(1, keepdims=True)
    np.testing.assert_allclose(float(out["loss"]), -logp[np.arange(10), y.astype(int)].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(out["accuracy"]), (s.argmax(1) == y).mean(), rtol=1e-6)


# --- FCN (shelhamer/fcn.berkeleyvision.org voc-fcn8s, voc-fcn32s net.py): crop(), pycaffe's text -----

def conv_relu(bottom, nout, ks=3, stride=1, pad=1):
    conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad,
                         param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)])
    return conv, L.ReLU(conv, in_place=True)


def max_pool(bottom, ks=2, stride=2):
    return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=ks, stride=stride)


def fcn_base(data_tops, w):
    """The VGG trunk of shelhamer/fcn.berkeleyvision.org's net.py files (through drop7)."""
    n = caffe.NetSpec()
    n.data, n.label = data_tops
    n.conv1_1, n.relu1_1 = conv_relu(n.data, w(64), pad=100)
    n.conv1_2, n.relu1_2 = conv_relu(n.relu1_1, w(64))
    n.pool1 = max_pool(n.relu1_2)
    n.conv2_1, n.relu2_1 = conv_relu(n.pool1, w(128))
    n.conv2_2, n.relu2_2 = conv_relu(n.relu2_1, w(128))
    n.pool2 = max_pool(n.relu2_2)
    n.conv3_1, n.relu3_1 = conv_relu(n.pool2, w(256))
    n.conv3_2, n.relu3_2 = conv_relu(n.relu3_1, w(256))
    n.conv3_3, n.relu3_3 = conv_relu(n.relu3_2, w(256))
    n.pool3 = max_pool(n.relu3_3)
    n.conv4_1, n.relu4_1 = conv_relu(n.pool3, w(512))
    n.conv4_2, n.relu4_2 = conv_relu(n.relu4_1, w(512))
    n.conv4_3, n.relu4_3 = conv_relu(n.relu4_2, w(512))
    n.pool4 = max_pool(n.relu4_3)
    n.conv5_1, n.relu5_1 = conv_relu(n.pool4, w(512))
    n.conv5_2, n.relu5_2 = conv_relu(n.relu5_1, w(512))
    n.conv5_3, n.relu5_3 = conv_relu(n.relu5_2, w(512))
    n.pool5 = max_pool(n.relu5_3)
    n.fc6, n.relu6 = conv_relu(n.pool5, w(4096), ks=7, pad=0)
    n.drop6 = L.Dropout(n.relu6, dropout_ratio=0.5, in_place=True)
    n.fc7, n.relu7 = conv_relu(n.drop6, w(4096), ks=1, pad=0)
    n.drop7 = L.Dropout(n.relu7, dropout_ratio=0.5, in_place=True)
    return n


LEARNED = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]


def fcn32s(data_tops, nclass: int = 21):
    """voc-fcn32s/net.py's fcn(), data layer given."""
    n = fcn_base(data_tops, lambda c: c)
    n.score_fr = L.Convolution(n.drop7, num_output=nclass, kernel_size=1, pad=0, param=LEARNED)
    n.upscore = L.Deconvolution(n.score_fr, convolution_param=dict(num_output=nclass, kernel_size=64, stride=32,
                                                                    bias_term=False), param=[dict(lr_mult=0)])
    n.score = crop(n.upscore, n.data)
    n.loss = L.SoftmaxWithLoss(n.score, n.label, loss_param=dict(normalize=False, ignore_label=255))
    return n


def fcn8s(data_tops, width: dict[int, int] | None = None, nclass: int = 21):
    """voc-fcn8s/net.py's fcn(), data layer given; ``width`` shrinks channel counts for running."""
    n = fcn_base(data_tops, (lambda c: width.get(c, c)) if width else (lambda c: c))
    learned = LEARNED
    n.score_fr = L.Convolution(n.drop7, num_output=nclass, kernel_size=1, pad=0, param=learned)
    n.upscore2 = L.Deconvolution(n.score_fr, convolution_param=dict(num_output=nclass, kernel_size=4, stride=2,
                                                                     bias_term=False), param=[dict(lr_mult=0)])
    n.score_pool4 = L.Convolution(n.pool4, num_output=nclass, kernel_size=1, pad=0, param=learned)
    n.score_pool4c = crop(n.score_pool4, n.upscore2)
    n.fuse_pool4 = L.Eltwise(n.upscore2, n.score_pool4c, operation=P.Eltwise.SUM)
    n.upscore_pool4 = L.Deconvolution(n.fuse_pool4, convolution_param=dict(num_output=nclass, kernel_size=4,
                                                                           stride=2, bias_term=False),
                                      param=[dict(lr_mult=0)])
    n.score_pool3 = L.Convolution(n.pool3, num_output=nclass, kernel_size=1, pad=0, param=learned)
    n.score_pool3c = crop(n.score_pool3, n.upscore_pool4)
    n.fuse_pool3 = L.Eltwise(n.upscore_pool4, n.score_pool3c, operation=P.Eltwise.SUM)
    n.upscore8 = L.Deconvolution(n.fuse_pool3, convolution_param=dict(num_output=nclass, kernel_size=16, stride=8,
                                                                      bias_term=False), param=[dict(lr_mult=0)])
    n.score = crop(n.upscore8, n.data)
    n.loss = L.SoftmaxWithLoss(n.score, n.label, loss_param=dict(normalize=False, ignore_label=255))
    return n


# param_str as FCN's Python 2 str(dict) printed it
FCN_PARAM_STR = {
    "train": "{'sbdd_dir': '../data/sbdd/dataset', 'seed': 1337, 'split': 'train', "
             "'mean': (104.00699, 116.66877, 122.67892)}",
    "val": "{'voc_dir': '../data/pascal/VOC2011', 'seed': 1337, 'split': 'seg11valid', "
           "'mean': (104.00699, 116.66877, 122.67892)}",
}


@pytest.mark.parametrize("split,layer", [("train", "SBDDSegDataLayer"), ("val", "VOCSegDataLayer")])
@pytest.mark.parametrize("builder,folder", [(fcn8s, FCN8S), (fcn32s, FCN8S.parent / "voc-fcn32s")],
                         ids=["fcn8s", "fcn32s"])
def test_fcn_text_is_pycaffes(split: str, layer: str, builder, folder: Path) -> None:
    data = L.Python(module='voc_layers', layer=layer, ntop=2, param_str=FCN_PARAM_STR[split])
    got = str(builder(data).to_proto())
    assert got == (folder / f"{split}.prototxt").read_text()


def test_fcn_style_net_with_crops_runs(tmp_path: Path) -> None:
    """A narrow FCN-8s (same layers, few channels) runs in caffeport; the crops computed by
    coord_map align each score with the input (score has the data's size) and Crop takes the
    window at the offsets crop() chose."""
    width = {64: 2, 128: 2, 256: 2, 512: 2, 4096: 4}
    data = L.Input(shape=dict(dim=[1, 3, 40, 36]))
    label = L.Input(shape=dict(dim=[1, 1, 40, 36]))
    n = fcn8s((data, label), width, nclass=3)
    proto = n.to_proto()
    offsets = {lp.name: list(lp.crop_param.offset) for lp in proto.layer if lp.type == "Crop"}
    assert offsets == {"score_pool4c": [5], "score_pool3c": [9], "score": [31]}
    path = tmp_path / "fcn.prototxt"
    path.write_text(str(proto))
    net = caffe.Net(str(path), caffe.TEST)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 3, 40, 36)).astype(np.float32)
    net.forward(data=x, label=np.zeros((1, 1, 40, 36), np.float32))
    assert net.blobs["score"].data.shape == (1, 3, 40, 36)
    up = net.blobs["upscore8"].data
    np.testing.assert_array_equal(net.blobs["score"].data, up[:, :, 31:31 + 40, 31:31 + 36])
    sp = net.blobs["score_pool4"].data
    h, w = net.blobs["upscore2"].data.shape[2:]
    np.testing.assert_array_equal(net.blobs["score_pool4c"].data, sp[:, :, 5:5 + h, 5:5 + w])


# --- naming, ordering and parameter rules --------------------------------------------------------

def test_names_order_and_in_place() -> None:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3]))
    hidden = L.InnerProduct(n.data, num_output=4)  # unnamed: InnerProduct1
    n.out = L.ReLU(L.InnerProduct(hidden, num_output=5), in_place=True)  # layer named 'out', top 'InnerProduct2'
    n.silence = L.Silence(hidden, ntop=0)
    proto = n.to_proto()
    assert [(lp.name, lp.type, list(lp.bottom), list(lp.top)) for lp in proto.layer] == [
        ("data", "Input", [], ["data"]),
        ("InnerProduct1", "InnerProduct", ["data"], ["InnerProduct1"]),
        ("InnerProduct2", "InnerProduct", ["InnerProduct1"], ["InnerProduct2"]),
        ("out", "ReLU", ["InnerProduct2"], ["InnerProduct2"]),
        ("silence", "Silence", ["InnerProduct1"], []),
    ]


def test_to_proto_several_tops_share_layers_and_counters() -> None:
    """examples/pycaffe/caffenet.py: to_proto(loss, acc) emits the shared layers once."""
    data, label = L.Data(source="db", backend=P.Data.LMDB, batch_size=2, ntop=2)
    fc = L.InnerProduct(data, num_output=3)
    proto = caffe.to_proto(L.SoftmaxWithLoss(fc, label), L.Accuracy(fc, label))
    assert [(lp.name, list(lp.bottom), list(lp.top)) for lp in proto.layer] == [
        ("Data1", [], ["Data1", "Data2"]),
        ("InnerProduct1", ["Data1"], ["InnerProduct1"]),
        ("SoftmaxWithLoss1", ["InnerProduct1", "Data2"], ["SoftmaxWithLoss1"]),
        ("Accuracy1", ["InnerProduct1", "Data2"], ["Accuracy1"]),
    ]


def test_parameter_routing() -> None:
    n = caffe.NetSpec()
    n.data = L.DummyData(shape=[dict(dim=[1, 2, 3, 3])], data_filler=dict(type="constant", value=1.5))
    n.conv = L.Convolution(n.data, kernel_size=[3, 1], pad=1, num_output=4, bias_term=False, name="my_conv",
                           param=[dict(lr_mult=0)] * 2, loss_weight=0.5, include=dict(phase=caffe.TEST),
                           propagate_down=[True], weight_filler=dict(type="gaussian", std=0.01),
                           engine=P.Convolution.CAFFE)
    n.drop = L.Dropout(n.conv, in_place=True, dropout_param=dict(dropout_ratio=0.25))
    want = _parse("""
    layer { name: "data" type: "DummyData" top: "data"
            dummy_data_param { data_filler { type: "constant" value: 1.5 } shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
    layer { name: "my_conv" type: "Convolution" bottom: "data" top: "conv"
            param { lr_mult: 0 } param { lr_mult: 0 } loss_weight: 0.5 include { phase: TEST }
            propagate_down: true
            convolution_param { num_output: 4 bias_term: false pad: 1 kernel_size: 3 kernel_size: 1
                                weight_filler { type: "gaussian" std: 0.01 } engine: CAFFE } }
    layer { name: "drop" type: "Dropout" bottom: "conv" top: "conv" dropout_param { dropout_ratio: 0.25 } }
    """)
    assert n.to_proto() == want
    assert n["conv"] is n.conv


def test_fine_tuning_pattern_reassigned_tops() -> None:
    """02-fine-tuning: a top made outside is assigned to the spec; a top named by setattr."""
    dummy = L.DummyData(shape=dict(dim=[1, 3, 8, 8]))
    n = caffe.NetSpec()
    n.data = dummy
    fc8 = L.InnerProduct(n.data, num_output=2)
    n.__setattr__("fc8_flickr", fc8)
    n.probs = L.Softmax(fc8)
    assert [(lp.name, list(lp.top)) for lp in n.to_proto().layer] == [
        ("data", ["data"]), ("fc8_flickr", ["fc8_flickr"]), ("probs", ["probs"])]


def test_errors_name_layer_and_keyword() -> None:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    n.up = L.Deconvolution(n.data, num_output=2)  # Deconvolution has no deconvolution_param
    with pytest.raises(CaffeportError, match=r"layer 'up' \(Deconvolution\): keyword num_output") as err:
        n.to_proto()
    assert isinstance(err.value, AttributeError)
    m = caffe.NetSpec()
    m.data = L.Input(shape=dict(dim=[1]))
    m.ip = L.InnerProduct(m.data, num_output="ten")
    with pytest.raises(CaffeportError, match=r"layer 'ip' \(InnerProduct\): keyword num_output") as err:
        m.to_proto()
    assert isinstance(err.value, TypeError)
    with pytest.raises(AttributeError, match="no such value"):
        getattr(P.Pooling, "MEDIAN")  # noqa: B009
    with pytest.raises(KeyError):
        n.__getitem__("nothing")
    assert P.Pooling.AVE == caffe.proto.caffe_pb2.PoolingParameter.AVE


# --- caffe's module-level functions (BVLC test_layer_type_list.py, test_nccl.py, _caffe.cpp) ------

def test_layer_type_list() -> None:
    for type_name in ["Data", "Convolution", "InnerProduct"]:
        assert type_name in caffe.layer_type_list()


def test_nccl() -> None:
    """BVLC's test only checks uids when has_nccl(); caffeport has no NCCL object and says so."""
    assert caffe.has_nccl() is False
    with pytest.raises(CaffeportError, match="caffeport train"):
        caffe.NCCL(None, b"uid")
    with pytest.raises(CaffeportError, match="not available"):
        caffe.NCCL.new_uid()


def test_version_and_solver_globals(monkeypatch: pytest.MonkeyPatch) -> None:
    from caffeport.compat import _misc

    monkeypatch.setattr(_misc, "_STATE", dict(_misc._STATE))
    assert caffe.__version__ == "1.0.0"
    assert (caffe.solver_count(), caffe.solver_rank()) == (1, 0)
    caffe.set_solver_count(4)
    caffe.set_solver_rank(2)
    caffe.set_multiprocess(True)
    assert (caffe.solver_count(), caffe.solver_rank(), _misc.multiprocess()) == (4, 2, True)


def test_timer() -> None:
    import time

    t = caffe.Timer()
    assert t.ms == 0.0  # never started
    t.start()
    time.sleep(0.03)
    t.stop()
    ms = t.ms
    assert 30 <= ms < 2000 and ms == int(ms)  # whole milliseconds, as Caffe's CPU timer
    time.sleep(0.01)
    assert t.ms == ms  # stopped
    t.start()
    time.sleep(0.01)
    assert t.ms >= 10  # reading a running timer stops it
    assert t.ms == t.ms


def test_log(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from caffeport.compat import _misc

    monkeypatch.setattr(_misc, "_STATE", dict(_misc._STATE))
    caffe.log("before init")  # glog writes to stderr until initialised
    err = capsys.readouterr().err
    assert re.match(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ _caffe\.cpp:68\] before init$", err.strip())
    caffe.init_log()
    caffe.log("to log files in Caffe")
    assert capsys.readouterr().err == ""
    caffe.init_log(0, True)
    caffe.log("shown")
    assert capsys.readouterr().err.strip().endswith("] shown")
    caffe.init_log(1, True)  # minloglevel WARNING hides INFO
    caffe.log("hidden")
    assert capsys.readouterr().err == ""


def test_assigning_a_tuple_of_tops_is_a_clear_error() -> None:
    n = caffe.NetSpec()
    n.both = L.DummyData(shape=dict(dim=[1]), ntop=2)
    with pytest.raises(CaffeportError, match=r"NetSpec.both is not a Top .*unpack them"):
        n.to_proto()
