"""The Python of BVLC's ``net_surgery`` and ``01-learning-lenet`` notebooks, with only ``import caffe``
changed, on small stand-in nets and data generated here. Checked against numpy / the source net."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

import caffeport.compat as caffe
from caffeport.compat import layers as L
from caffeport.compat import params as P


# --- net_surgery, part 1: editing a filter, the conv blob seen before the forward --------------------
def test_net_surgery_filter_edit_and_live_blob(tmp_path: Path) -> None:
    conv = tmp_path / "conv.prototxt"
    conv.write_text("""name: "convolution"
    input: "data" input_shape { dim: 1 dim: 1 dim: 12 dim: 12 }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
      convolution_param { num_output: 3 kernel_size: 5 stride: 1
        weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0 } } }""")
    net = caffe.Net(str(conv), caffe.TEST)
    im = np.random.default_rng(0).uniform(0, 255, size=(12, 12)).astype(np.float32)
    net.blobs["data"].reshape(*((1, 1) + im.shape))
    net.blobs["data"].data[...] = im
    conv_out = net.blobs["conv"].data  # the notebook prints this array after editing the filter
    net.forward()
    # the surgery: the first filter becomes a box blur, the bias 1
    net.params["conv"][0].data[0] = 1 / 25.0
    net.params["conv"][1].data[0] = 1.0
    net.forward()
    w = net.params["conv"][0].data.astype(np.float64)
    b = net.params["conv"][1].data.astype(np.float64)
    ref = np.zeros((3, 8, 8))
    for o in range(3):
        for i in range(8):
            for j in range(8):
                ref[o, i, j] = (im[i:i + 5, j:j + 5] * w[o, 0]).sum() + b[o]
    np.testing.assert_allclose(conv_out[0], ref, rtol=1e-4, atol=1e-3)


# --- net_surgery, part 2: transplanting fc weights into a fully-convolutional net ----------------------
FC_NET = """name: "fc"
input: "data" input_shape { dim: 1 dim: 2 dim: 6 dim: 6 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc6" type: "InnerProduct" bottom: "conv1" top: "fc6"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 }
    bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
"""

FULL_CONV = """name: "fc_full_conv"
input: "data" input_shape { dim: 1 dim: 2 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc6-conv" type: "Convolution" bottom: "conv1" top: "fc6-conv"
  convolution_param { num_output: 5 kernel_size: 4 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6-conv" top: "fc6-conv" }
layer { name: "fc7-conv" type: "Convolution" bottom: "fc6-conv" top: "fc7-conv"
  convolution_param { num_output: 3 kernel_size: 1 } }
"""


def test_net_surgery_fully_convolutional_transplant(tmp_path: Path) -> None:
    (tmp_path / "fc.prototxt").write_text(FC_NET)
    (tmp_path / "full_conv.prototxt").write_text(FULL_CONV)
    net = caffe.Net(str(tmp_path / "fc.prototxt"), caffe.TEST)
    net.save(str(tmp_path / "fc.caffemodel"))
    # ---- the notebook's cells ----
    params = ["fc6", "fc7"]
    fc_params = {pr: (net.params[pr][0].data, net.params[pr][1].data) for pr in params}
    net_full_conv = caffe.Net(str(tmp_path / "full_conv.prototxt"), str(tmp_path / "fc.caffemodel"), caffe.TEST)
    params_full_conv = ["fc6-conv", "fc7-conv"]
    conv_params = {pr: (net_full_conv.params[pr][0].data, net_full_conv.params[pr][1].data)
                   for pr in params_full_conv}
    for pr, pr_conv in zip(params, params_full_conv):
        conv_params[pr_conv][0].flat = fc_params[pr][0].flat  # flat unrolling
        conv_params[pr_conv][1][...] = fc_params[pr][1]
    net_full_conv.save(str(tmp_path / "full_conv.caffemodel"))
    # ---- check: each output position is the fc net on the matching 6x6 window ----
    again = caffe.Net(str(tmp_path / "full_conv.prototxt"), str(tmp_path / "full_conv.caffemodel"), caffe.TEST)
    x = np.random.default_rng(1).normal(size=(1, 2, 8, 8)).astype(np.float32)
    out = again.forward(data=x)["fc7-conv"]
    assert out.shape == (1, 3, 3, 3)
    for i in range(3):
        for j in range(3):
            ref = net.forward(data=x[:, :, i:i + 6, j:j + 6])["fc7"]
            np.testing.assert_allclose(out[0, :, i, j], ref[0], rtol=1e-4, atol=1e-5)


# --- 01-learning-lenet: NetSpec, SGDSolver, the manual step loop ------------------------------------
def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in for MNIST: 12x12 images, class 1 has a bright blob top-left, class 0 bottom-right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.uniform(0, 0.3, size=(n, 1, 12, 12)).astype(np.float32)
    for k in range(n):
        r, c = (1, 1) if y[k] else (7, 7)
        r += rng.integers(0, 3)
        c += rng.integers(0, 3)
        x[k, 0, r:r + 3, c:c + 3] += 0.8
    return x, y.astype(np.float32)


def lenet(source: str, batch_size: int) -> str:
    n = caffe.NetSpec()
    n.data, n.label = L.HDF5Data(batch_size=batch_size, source=source, ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=6, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool1, num_output=16, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=2, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return str(n.to_proto())


def test_learning_lenet_loop(tmp_path: Path) -> None:
    for split, (count, seed) in {"train": (256, 0), "test": (64, 1)}.items():
        x, y = _digits(count, seed)
        with h5py.File(tmp_path / f"{split}.h5", "w") as f:
            f["data"], f["label"] = x, y
        (tmp_path / f"{split}.txt").write_text(str(tmp_path / f"{split}.h5") + "\n")
    (tmp_path / "lenet_auto_train.prototxt").write_text(lenet(str(tmp_path / "train.txt"), 16))
    (tmp_path / "lenet_auto_test.prototxt").write_text(lenet(str(tmp_path / "test.txt"), 16))
    (tmp_path / "lenet_auto_solver.prototxt").write_text(f"""
train_net: "{tmp_path / 'lenet_auto_train.prototxt'}"
test_net: "{tmp_path / 'lenet_auto_test.prototxt'}"
test_iter: 4 test_interval: 100000 base_lr: 0.05 momentum: 0.9 weight_decay: 0.0005
lr_policy: "inv" gamma: 0.0001 power: 0.75 display: 0 max_iter: 10000 snapshot: 0
snapshot_prefix: "{tmp_path / 'lenet'}" """)
    # ---- the notebook's cells ----
    solver = caffe.SGDSolver(str(tmp_path / "lenet_auto_solver.prototxt"))
    shapes = [(k, v.data.shape) for k, v in solver.net.blobs.items()]
    assert shapes[0] == ("data", (16, 1, 12, 12)) and shapes[-1] == ("loss", ())
    assert [(k, v[0].data.shape) for k, v in solver.net.params.items()][0] == ("conv1", (6, 1, 3, 3))
    solver.net.forward()
    solver.test_nets[0].forward()
    solver.step(1)
    niter, test_interval = 60, 20
    train_loss = np.zeros(niter)
    test_acc = np.zeros(int(np.ceil(niter / test_interval)))
    output = np.zeros((niter, 8, 2))
    tn = solver.test_nets[0]
    for it in range(niter):
        solver.step(1)
        train_loss[it] = solver.net.blobs["loss"].data
        batch = tn.blobs["data"].data.copy()
        tn.forward(start="conv1")  # the data layer does not run: same batch
        np.testing.assert_array_equal(tn.blobs["data"].data, batch)
        output[it] = tn.blobs["score"].data[:8]
        if it % test_interval == 0:
            correct = 0
            for _ in range(4):
                tn.forward()
                correct += sum(tn.blobs["score"].data.argmax(1) == tn.blobs["label"].data)
            test_acc[it // test_interval] = correct / 64
    assert train_loss[-10:].mean() < 0.5 * train_loss[:5].mean()
    assert test_acc[-1] >= 0.9
    assert np.isfinite(output).all()
