"""The Python of BVLC's ``net_surgery`` and ``01-learning-lenet`` notebooks, with only ``import caffe``
changed, on small stand-in nets and data generated here. Checked against numpy / the source net."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

import caffeport.compat as caffe
from caffeport.compat import layers as L
from caffeport.compat import params as P
from caffeport.compat.proto import caffe_pb2  # the notebooks' `from caffe.proto import caffe_pb2`
from tests.golden import CORPUS


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


# --- brewing-logreg: HDF5 data, NetSpec nets, a SolverParameter built in Python, get_solver/solve ------
def _two_blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in for sklearn's make_classification: 4 features, 2 informative (two shifted Gaussians)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.normal(size=(n, 4))
    x[:, 0] += 2.0 * y - 1.0
    x[:, 1] -= 1.5 * y - 0.75
    return x, y


def logreg(hdf5: str, batch_size: int) -> str:
    n = caffe.NetSpec()
    n.data, n.label = L.HDF5Data(batch_size=batch_size, source=hdf5, ntop=2)
    n.ip1 = L.InnerProduct(n.data, num_output=2, weight_filler=dict(type="xavier"))
    n.accuracy = L.Accuracy(n.ip1, n.label)
    n.loss = L.SoftmaxWithLoss(n.ip1, n.label)
    return n.to_proto()


def _logreg_solver(train_net_path: str, test_net_path: str, prefix: str):
    s = caffe_pb2.SolverParameter()
    s.train_net = train_net_path
    s.test_net.append(test_net_path)
    s.test_interval = 500
    s.test_iter.append(25)
    s.max_iter = 1000
    s.base_lr = 0.01
    s.lr_policy = "step"
    s.gamma = 0.1
    s.stepsize = 500
    s.momentum = 0.9
    s.weight_decay = 5e-4
    s.display = 500
    s.snapshot = 1000
    s.snapshot_prefix = prefix
    s.solver_mode = caffe_pb2.SolverParameter.CPU
    return s


def test_brewing_logreg(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the notebook runs from the Caffe root with relative paths
    X, y = _two_blobs(2000, 0)
    Xt, yt = _two_blobs(500, 1)
    dirname = tmp_path / "examples/hdf5_classification/data"
    dirname.mkdir(parents=True)
    train_filename, test_filename = dirname / "train.h5", dirname / "test.h5"
    # ---- the notebook's cells (float64 features, as sklearn gives them) ----
    with h5py.File(train_filename, "w") as f:
        f["data"] = X
        f["label"] = y.astype(np.float32)
    with open(dirname / "train.txt", "w") as f:
        f.write(str(train_filename) + "\n")
        f.write(str(train_filename) + "\n")
    comp_kwargs = {"compression": "gzip", "compression_opts": 1}
    with h5py.File(test_filename, "w") as f:
        f.create_dataset("data", data=Xt, **comp_kwargs)
        f.create_dataset("label", data=yt.astype(np.float32), **comp_kwargs)
    with open(dirname / "test.txt", "w") as f:
        f.write(str(test_filename) + "\n")
    train_net_path = "examples/hdf5_classification/logreg_auto_train.prototxt"
    with open(train_net_path, "w") as f:
        f.write(str(logreg("examples/hdf5_classification/data/train.txt", 10)))
    test_net_path = "examples/hdf5_classification/logreg_auto_test.prototxt"
    with open(test_net_path, "w") as f:
        f.write(str(logreg("examples/hdf5_classification/data/test.txt", 10)))
    solver_path = "examples/hdf5_classification/logreg_solver.prototxt"
    with open(solver_path, "w") as f:
        f.write(str(_logreg_solver(train_net_path, test_net_path, "examples/hdf5_classification/data/train")))
    caffe.set_mode_cpu()
    solver = caffe.get_solver(solver_path)
    solver.solve()
    accuracy = 0
    batch_size = solver.test_nets[0].blobs["data"].num
    test_iters = int(len(Xt) / batch_size)
    for _ in range(test_iters):
        solver.test_nets[0].forward()
        accuracy += solver.test_nets[0].blobs["accuracy"].data
    accuracy /= test_iters
    # ---- checks: the Accuracy layer over the test set = numpy on the trained weights ----
    assert solver.iter == 1000 and batch_size == 10 and test_iters == 50
    w, b = (p.data.astype(np.float64) for p in solver.net.params["ip1"])
    ref = float(((Xt @ w.T + b).argmax(1) == yt).mean())
    assert abs(float(accuracy) - ref) < 1e-6 and ref > 0.8
    assert (dirname / "train_iter_1000.caffemodel").exists() and (dirname / "train_iter_1000.solverstate").exists()
    # the notebook's `caffe train -solver ...` cell, with Caffe's single-dash flag
    run = subprocess.run([sys.executable, "-m", "caffeport", "train", "-solver", solver_path],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Optimization Done" in run.stderr + run.stdout


# --- 00-classification: CaffeNet deploy, Transformer, batch reshape, blobs/params tour -----------------
CAFFENET = CORPUS / "2_bvlc_caffe/head/models/bvlc_reference_caffenet/deploy.prototxt"


def test_classification_notebook(tmp_path: Path) -> None:
    import cv2

    stand_in = caffe.Net(str(CAFFENET), caffe.TEST)  # seeded random weights stand in for the download
    weights = tmp_path / "bvlc_reference_caffenet.caffemodel"
    stand_in.save(str(weights))
    del stand_in
    rng = np.random.default_rng(0)
    np.save(tmp_path / "ilsvrc_2012_mean.npy", rng.uniform(90, 130, size=(3, 256, 256)))
    cat = tmp_path / "cat.jpg"
    img = np.zeros((360, 480, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, 480)[None, :]
    img[..., 1] = np.linspace(255, 0, 360)[:, None]
    img[100:250, 150:330, 2] = 220
    cv2.imwrite(str(cat), img)
    # ---- the notebook's cells ----
    caffe.set_mode_cpu()
    net = caffe.Net(str(CAFFENET), str(weights), caffe.TEST)
    mu = np.load(tmp_path / "ilsvrc_2012_mean.npy")
    mu = mu.mean(1).mean(1)
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_mean("data", mu)
    transformer.set_raw_scale("data", 255)
    transformer.set_channel_swap("data", (2, 1, 0))
    net.blobs["data"].reshape(50, 3, 227, 227)
    image = caffe.io.load_image(str(cat))
    transformed_image = transformer.preprocess("data", image)
    net.blobs["data"].data[...] = transformed_image
    output = net.forward()
    output_prob = output["prob"][0]
    top_inds = output_prob.argsort()[::-1][:5]
    caffe.set_device(0)
    caffe.set_mode_gpu()  # no GPU here: pycaffe would fail; caffeport stays on the CPU
    net.forward()
    blob_shapes = {name: blob.data.shape for name, blob in net.blobs.items()}
    param_shapes = {name: (p[0].data.shape, p[1].data.shape) for name, p in net.params.items()}
    feat = net.blobs["conv1"].data[0, :36]
    # ---- checks ----
    # the whole pipeline against OpenCV's Caffe importer on the same blob
    cv = cv2.dnn.readNetFromCaffe(str(CAFFENET), str(weights))
    cv.setInput(np.ascontiguousarray(transformed_image[None], np.float32))
    ref = cv.forward("prob").reshape(-1)
    np.testing.assert_allclose(output_prob, ref, rtol=1e-4, atol=1e-6)
    assert list(top_inds) == list(np.argsort(ref)[::-1][:5])
    # the transformer: BGR, [0, 255], mean-subtracted, CHW; deprocess inverts it
    assert transformed_image.shape == (3, 227, 227)
    resized = caffe.io.resize_image(image, (227, 227))
    np.testing.assert_allclose(transformed_image, (resized * 255)[:, :, ::-1].transpose(2, 0, 1)
                               - mu[:, None, None], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(transformer.deprocess("data", transformed_image), resized, atol=1e-5)
    assert blob_shapes["data"] == (50, 3, 227, 227) and blob_shapes["conv1"] == (50, 96, 55, 55)
    assert blob_shapes["pool5"] == (50, 256, 6, 6) and blob_shapes["prob"] == (50, 1000)
    assert param_shapes["conv2"] == ((256, 48, 5, 5), (256,)) and param_shapes["fc6"] == ((4096, 9216), (4096,))
    assert feat.shape == (36, 55, 55)
    np.testing.assert_allclose(net.blobs["prob"].data[0], output_prob, rtol=1e-6)


# --- pascal-multilabel-with-datalayer: a Python data layer fed by param_str, CaffeNet from NetSpec,
# SGDSolver + copy_from + share_with, the notebook's hamming accuracy --------------------------------
DATALAYER = '''
import ast
import numpy as np
import caffe


class PascalMultilabelDataLayerSync(caffe.Layer):
    """Stand-in for the notebook's layer (which reads VOC2012 JPEGs): the same tops, param_str and
    per-item writes; image k is seeded noise whose 20 labels are a function of k."""

    def setup(self, bottom, top):
        self.top_names = ["data", "label"]
        params = ast.literal_eval(self.param_str)
        self.batch_size = params["batch_size"]
        self.im_shape = params["im_shape"]
        self.offset = 0 if params["split"] == "train" else 1000
        self._cur = 0
        top[0].reshape(self.batch_size, 3, params["im_shape"][0], params["im_shape"][1])
        top[1].reshape(self.batch_size, 20)

    def forward(self, bottom, top):
        for itt in range(self.batch_size):
            k = self.offset + self._cur
            rng = np.random.default_rng(k)
            im = rng.uniform(0, 255, size=(self.im_shape[0], self.im_shape[1], 3)).astype(np.float32)
            top[0].data[itt, ...] = (im[:, :, ::-1] - 128).transpose((2, 0, 1))
            top[1].data[itt, ...] = [(k >> (j % 5)) & 1 for j in range(20)]
            self._cur = (self._cur + 1) % 8

    def reshape(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        pass
'''


def conv_relu(bottom, ks, nout, stride=1, pad=0, group=1):
    conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad, group=group)
    return conv, L.ReLU(conv, in_place=True)


def fc_relu(bottom, nout):
    fc = L.InnerProduct(bottom, num_output=nout)
    return fc, L.ReLU(fc, in_place=True)


def max_pool(bottom, ks, stride=1):
    return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=ks, stride=stride)


def caffenet_multilabel(data_layer_params, datalayer):
    n = caffe.NetSpec()
    n.data, n.label = L.Python(module="pascal_multilabel_datalayers", layer=datalayer,
                               ntop=2, param_str=str(data_layer_params))
    n.conv1, n.relu1 = conv_relu(n.data, 11, 96, stride=4)
    n.pool1 = max_pool(n.relu1, 3, stride=2)
    n.norm1 = L.LRN(n.pool1, local_size=5, alpha=1e-4, beta=0.75)
    n.conv2, n.relu2 = conv_relu(n.norm1, 5, 256, pad=2, group=2)
    n.pool2 = max_pool(n.relu2, 3, stride=2)
    n.norm2 = L.LRN(n.pool2, local_size=5, alpha=1e-4, beta=0.75)
    n.conv3, n.relu3 = conv_relu(n.norm2, 3, 384, pad=1)
    n.conv4, n.relu4 = conv_relu(n.relu3, 3, 384, pad=1, group=2)
    n.conv5, n.relu5 = conv_relu(n.relu4, 3, 256, pad=1, group=2)
    n.pool5 = max_pool(n.relu5, 3, stride=2)
    n.fc6, n.relu6 = fc_relu(n.pool5, 4096)
    n.drop6 = L.Dropout(n.relu6, in_place=True)
    n.fc7, n.relu7 = fc_relu(n.drop6, 4096)
    n.drop7 = L.Dropout(n.relu7, in_place=True)
    n.score = L.InnerProduct(n.drop7, num_output=20)
    n.loss = L.SigmoidCrossEntropyLoss(n.score, n.label)
    return str(n.to_proto())


def hamming_distance(gt, est):
    return sum([1 for (g, e) in zip(gt, est) if g == e]) / float(len(gt))


def check_accuracy(net, num_batches, batch_size=128):
    acc = 0.0
    for _ in range(num_batches):
        net.forward()
        gts = net.blobs["label"].data
        ests = net.blobs["score"].data > 0
        for gt, est in zip(gts, ests):
            acc += hamming_distance(gt, est)
    return acc / (num_batches * batch_size)


def test_pascal_multilabel_with_datalayer(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers" / "pascal_multilabel_datalayers.py").write_text(DATALAYER)
    monkeypatch.syspath_prepend(str(tmp_path / "layers"))
    workdir = tmp_path / "pascal_multilabel_with_datalayer"
    workdir.mkdir()
    batch = 4
    # the solver file as the notebook's tools.CaffeSolver writes it (string values, sorted keys)
    sp = {"base_lr": "0.0001", "momentum": "0.9", "test_iter": "100", "test_interval": "250", "display": "1",
          "snapshot": "2500", "snapshot_prefix": f'"{workdir / "snapshot"}"', "lr_policy": '"fixed"',
          "gamma": "0.1", "weight_decay": "0.0005", "train_net": f'"{workdir / "trainnet.prototxt"}"',
          "test_net": f'"{workdir / "valnet.prototxt"}"', "max_iter": "100000",
          "test_initialization": "false", "average_loss": "25", "iter_size": "1"}
    (workdir / "solver.prototxt").write_text("".join(f"{k}: {v}\n" for k, v in sorted(sp.items())))
    with open(workdir / "trainnet.prototxt", "w") as f:
        data_layer_params = dict(batch_size=batch, im_shape=[227, 227], split="train", pascal_root="unused")
        f.write(caffenet_multilabel(data_layer_params, "PascalMultilabelDataLayerSync"))
    with open(workdir / "valnet.prototxt", "w") as f:
        data_layer_params = dict(batch_size=batch, im_shape=[227, 227], split="val", pascal_root="unused")
        f.write(caffenet_multilabel(data_layer_params, "PascalMultilabelDataLayerSync"))
    # stand-in for bvlc_reference_caffenet.caffemodel: the same net with fc8 where the notebook has score
    (workdir / "ref.prototxt").write_text((workdir / "valnet.prototxt").read_text().replace('"score"', '"fc8"'))
    ref = caffe.Net(str(workdir / "ref.prototxt"), caffe.TEST)
    rng = np.random.default_rng(0)
    for blobs in ref.params.values():
        blobs[0].data[...] = rng.normal(0, 0.01, size=blobs[0].data.shape)
        blobs[1].data[...] = 0.1
    weights = workdir / "bvlc_reference_caffenet.caffemodel"
    ref.save(str(weights))
    ref_params = {k: [p.data.copy() for p in v] for k, v in ref.params.items()}
    del ref
    # ---- the notebook's cells ----
    solver = caffe.SGDSolver(str(workdir / "solver.prototxt"))
    fresh_score = solver.net.params["score"][0].data.copy()
    solver.net.copy_from(str(weights))
    solver.test_nets[0].share_with(solver.net)
    # ---- checks before stepping: copied by layer name, score left fresh, test net shares ----
    for name in ("conv1", "conv5", "fc6", "fc7"):
        for got, want in zip(solver.net.params[name], ref_params[name]):
            np.testing.assert_array_equal(got.data, want)
    np.testing.assert_array_equal(solver.net.params["score"][0].data, fresh_score)
    w0 = solver.net.params["conv1"][0].data.copy()
    solver.step(1)
    # Caffe's SGD (first step, zero history): the diff holds lr * (grad + decay * w) and w1 = w0 - diff
    w1 = solver.net.params["conv1"][0].data
    np.testing.assert_allclose(w1, w0 - solver.net.params["conv1"][0].diff, rtol=1e-6, atol=1e-9)
    assert not np.array_equal(w1, w0)
    np.testing.assert_array_equal(solver.test_nets[0].params["conv1"][0].data, w1)
    gtlist = solver.net.blobs["label"].data[0, ...].astype(int)
    assert gtlist.tolist() == [(0 >> (j % 5)) & 1 for j in range(20)]
    solver.step(2)
    tn = solver.test_nets[0]
    check_accuracy(tn, 1, batch_size=batch)
    acc = check_accuracy(tn, 1, batch_size=batch)
    # the notebook's accuracy = numpy on the blobs of the batch it just ran
    want = np.mean([(g == (s > 0)).mean() for g, s in zip(tn.blobs["label"].data, tn.blobs["score"].data)])
    assert abs(acc - want) < 1e-12 and tn.blobs["label"].data.shape == (batch, 20)
    expected_labels = [[((1000 + (4 + k) % 8) >> (j % 5)) & 1 for j in range(20)] for k in range(batch)]
    np.testing.assert_array_equal(tn.blobs["label"].data, expected_labels)
