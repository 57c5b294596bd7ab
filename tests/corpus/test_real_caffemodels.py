"""The real trained caffemodels of the corpus give the predictions their authors recorded, and the same
numbers as OpenCV's independent Caffe importer where nothing was recorded.

Recorded values come from the source repositories (not copied into the corpus, quoted here):
- ikkiChung/Prediction-Example-With-Caffe README: the IMAGE_DATA net on dog10/cat10/truck10 prints
  ``Pattern:i class:c Prob=p`` = argmax top-1 of image i and ``prob`` flat index i (image 0's first three
  class probabilities, as the tool indexes ``i * prob.height()`` with height 1).
- Ry0/cifar10_impact_scar ipynb/impact_scar.ipynb: dataset/0/0_0001.jpg -> "Predicted class is #0.",
  plus the blob and parameter shapes it lists.
- everpeace/caffe examples/cifar10_full.ipynb: predictions_raw[0] for CIFAR-10 test image 0, which the
  corpus does not have (checked only if it appears).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from caffeport.io import load_caffemodel, read_blobproto
from caffeport.net import TEST, Net
from tests.corpus.common import CORPUS, REAL, build, cv2_caffe, cv_forward, rel_err

CIFAR_MEAN = REAL / "jwcom79_cifar10_hdf5/examples/cifar10/mean.binaryproto"  # the real CIFAR-10 mean
IKKI = REAL / "ikkiChung_cifar10_quick_prediction/examples"
RY0 = REAL / "ry0_cifar10_impact_scar"
MTCNN = REAL / "mtcnn_kpzhang93/code/codes/MTCNNv2"
VANILLA = REAL / "vanillacnn_ishay2b"


def _cv2_or_skip():
    cv2 = cv2_caffe()
    assert cv2 is not None, "OpenCV's Caffe importer is missing (OpenCV 5 removed it): install requirements-dev.txt"
    return cv2


def _imread(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)  # BGR, as Caffe's ReadImageToCVMat
    assert img is not None, path
    return img


# --------------------------------------------------------------------------------------------------
# recorded predictions
# --------------------------------------------------------------------------------------------------
def test_ikkichung_prediction_example_as_recorded(tmp_path: Path) -> None:
    """The V1 IMAGE_DATA net run as the C++ example runs it (paths relative to the Caffe root)."""
    ex = tmp_path / "examples"
    (ex / "prediction_example").mkdir(parents=True)
    (ex / "cifar10").mkdir()
    shutil.copytree(IKKI / "images", ex / "images")
    for f in ("prediction_example.prototxt", "file_list.txt"):
        shutil.copy(IKKI / "prediction_example" / f, ex / "prediction_example" / f)
    shutil.copy(CIFAR_MEAN, ex / "cifar10" / "mean.binaryproto")
    net = Net(ex / "prediction_example/prediction_example.prototxt",
              IKKI / "cifar10/cifar10_quick_iter_5000.caffemodel", TEST, root=tmp_path)
    net.forward()
    argmax = net.blobs["argmax"].data.reshape(3, -1)
    prob = net.blobs["prob"].data
    assert argmax[:, 0].tolist() == [5, 3, 9]  # dog, cat, truck; README: class:5, class:3, class:9
    recorded = np.array([2.69744e-06, 4.0121e-05, 0.00531694])  # README: Prob=... (6 significant digits)
    np.testing.assert_allclose(prob.reshape(-1)[:3], recorded, rtol=2e-5)
    assert argmax.shape == (3, 5)  # top_k: 5
    np.testing.assert_array_equal(net.blobs["label"].data, [0, 1, 2])  # file_list.txt labels


RY0_BLOB_SHAPES = [("data", (1, 3, 32, 32)), ("conv1", (1, 32, 32, 32)), ("pool1", (1, 32, 16, 16)),
                   ("conv2", (1, 32, 16, 16)), ("pool2", (1, 32, 8, 8)), ("conv3", (1, 64, 8, 8)),
                   ("pool3", (1, 64, 4, 4)), ("ip1", (1, 64)), ("ip2", (1, 3)), ("prob", (1, 3))]
RY0_PARAM_SHAPES = [("conv1", (32, 3, 5, 5)), ("conv2", (32, 32, 5, 5)), ("conv3", (64, 32, 5, 5)),
                    ("ip1", (64, 1024)), ("ip2", (3, 64))]


def _ry0_input(k: int) -> np.ndarray:
    """caffe.io.load_image (RGB in [0, 1]) -> Transformer: transpose, raw_scale 255, minus the mean
    image; no channel swap (the notebook leaves it commented out)."""
    rgb = _imread(RY0 / f"dataset/{k}/{k}_0001.jpg")[:, :, ::-1].astype(np.float32)
    mean = read_blobproto(RY0 / "mean.binaryproto")
    assert mean.shape == (3, 32, 32)
    return (rgb.transpose(2, 0, 1) - mean)[None]


def test_ry0_impact_scar_as_recorded() -> None:
    net = Net(RY0 / "cifar10_quick.prototxt", RY0 / "caffemodel/normal/cifar10_impact_scar_quick_iter_10000.caffemodel")
    out = net.forward(data=_ry0_input(0))
    assert int(out["prob"].argmax()) == 0  # "Predicted class is #0."
    assert [(k, net.blobs[k].data.shape) for k in net.blobs if k in dict(RY0_BLOB_SHAPES)] == RY0_BLOB_SHAPES
    assert [(k, v[0].data.shape) for k, v in net.params.items()] == RY0_PARAM_SHAPES


@pytest.mark.parametrize("model,proto", [
    ("normal/cifar10_impact_scar_quick_iter_10000", "cifar10_quick"),
    ("padded/cifar10_impact_scar_quick_padded_iter_10000", "cifar10_quick_padded"),
])
def test_ry0_models_match_opencv(model: str, proto: str) -> None:
    cv2 = _cv2_or_skip()
    x = np.concatenate([_ry0_input(k) for k in range(3)])
    net = build(RY0 / f"{proto}.prototxt", {"data": x.shape}, RY0 / f"caffemodel/{model}.caffemodel")
    ours = net.forward(data=x)["prob"]
    ref = cv_forward(cv2, RY0 / f"{proto}.prototxt", RY0 / f"caffemodel/{model}.caffemodel", {"data": x}, ["prob"])
    assert rel_err(ours, ref["prob"]) < 1e-5
    assert ours[0].argmax() == 0 and ours[1].argmax() == 1  # the samples of classes 0 and 1


# --------------------------------------------------------------------------------------------------
# CIFAR-10 models on the three CIFAR-style images, vs OpenCV
# --------------------------------------------------------------------------------------------------
CIFAR_MODELS = [
    ("everpeace_caffe_2014/examples/cifar10/cifar10_quick.prototxt",
     "everpeace_caffe_2014/examples/cifar10/cifar10_quick_iter_5000.caffemodel"),
    ("everpeace_caffe_2014/examples/cifar10/cifar10_full.prototxt",
     "everpeace_caffe_2014/examples/cifar10/cifar10_full_iter_70000.caffemodel"),
    ("jwcom79_cifar10_hdf5/examples/cifar10/cifar10_quick.prototxt",
     "jwcom79_cifar10_hdf5/examples/cifar10/cifar10_quick_iter_5000.caffemodel.h5"),
    ("jwcom79_cifar10_hdf5/examples/cifar10/cifar10_full.prototxt",
     "jwcom79_cifar10_hdf5/examples/cifar10/cifar10_full_iter_70000.caffemodel.h5"),
    ("everpeace_caffe_2014/examples/cifar10/cifar10_quick.prototxt",  # same architecture, ikkiChung's weights
     "ikkiChung_cifar10_quick_prediction/examples/cifar10/cifar10_quick_iter_5000.caffemodel"),
]


@pytest.mark.parametrize("proto,weights", CIFAR_MODELS, ids=[w.split("/")[0] + "/" + w.rsplit("/", 1)[1]
                                                             for _, w in CIFAR_MODELS])
def test_cifar10_models_match_opencv(proto: str, weights: str, tmp_path: Path) -> None:
    cv2 = _cv2_or_skip()
    mean = read_blobproto(CIFAR_MEAN)
    x = np.stack([_imread(IKKI / f"images/{n}10.png").transpose(2, 0, 1).astype(np.float32) - mean
                  for n in ("dog", "cat", "truck")])
    net = build(REAL / proto, {"data": x.shape}, REAL / weights)
    ours = net.forward(data=x)["prob"]
    model = REAL / weights
    if weights.endswith(".h5"):  # OpenCV reads binary caffemodels only
        model = tmp_path / "weights.caffemodel"
        net.save(model)
    ref = cv_forward(cv2, REAL / proto, model, {"data": x}, ["prob"])["prob"].reshape(ours.shape)
    assert rel_err(ours, ref) < 1e-5
    assert ours.argmax(1).tolist() == ref.argmax(1).tolist()


# --------------------------------------------------------------------------------------------------
# LeNet on synthetic digits
# --------------------------------------------------------------------------------------------------
def _digit(d: int) -> np.ndarray:
    """A digit drawn MNIST-style: white on black, fitted in 20x20, centred by its centre of mass in 28x28."""
    import cv2

    canvas = np.zeros((60, 60), np.uint8)
    cv2.putText(canvas, str(d), (15, 45), cv2.FONT_HERSHEY_SIMPLEX, 1.2, 255, 3, cv2.LINE_AA)
    ys, xs = np.nonzero(canvas)
    crop = canvas[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    s = 20.0 / max(crop.shape)
    crop = cv2.resize(crop, (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))),
                      interpolation=cv2.INTER_AREA).astype(np.float64)
    h, w = crop.shape
    cy = (crop.sum(1) * np.arange(h)).sum() / crop.sum()
    cx = (crop.sum(0) * np.arange(w)).sum() / crop.sum()
    oy = min(max(int(round(14 - cy)), 0), 28 - h)
    ox = min(max(int(round(14 - cx)), 0), 28 - w)
    out = np.zeros((28, 28), np.float32)
    out[oy:oy + h, ox:ox + w] = crop
    return out


LENETS = ["everpeace_caffe_2014/examples/mnist", "ethereon_caffe-tensorflow_lenet/examples/mnist"]


@pytest.mark.parametrize("folder", LENETS)
def test_lenet_reads_synthetic_digits(folder: str) -> None:
    x = np.stack([_digit(d) for d in range(10)])[:, None] * np.float32(0.00390625)  # the data layer's scale
    proto, weights = REAL / folder / "lenet.prototxt", REAL / folder / "lenet_iter_10000.caffemodel"
    net = build(proto, {"data": x.shape}, weights)
    prob = net.forward(data=x)["prob"]
    assert (prob.argmax(1) == np.arange(10)).sum() >= 8, prob.argmax(1)  # the digit drawn (printed font)
    cv2 = cv2_caffe()
    if cv2 is not None:
        ref = cv_forward(cv2, proto, weights, {"data": x}, ["prob"])["prob"]
        assert np.abs(prob - ref).max() < 1e-5


# --------------------------------------------------------------------------------------------------
# MTCNN and VanillaCNN on real image crops, vs OpenCV
# --------------------------------------------------------------------------------------------------
def _mtcnn_inputs(det: int) -> np.ndarray:
    """The MATLAB pipeline's input: RGB, (x - 127.5) * 0.0078125, transposed (W and H swapped)."""
    import cv2

    rgb = _imread(MTCNN / "test1.jpg")[:, :, ::-1].astype(np.float32)
    norm = (rgb - 127.5) * 0.0078125
    if det == 1:  # PNet, fully convolutional: the image at scale 0.3
        small = cv2.resize(norm, None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA)
        return small.transpose(2, 1, 0)[None]
    side = {2: 24, 3: 48, 4: 24}[det]
    rng = np.random.default_rng(det)
    crops = []
    for _ in range(4):
        y, x = rng.integers(0, rgb.shape[0] - 80), rng.integers(0, rgb.shape[1] - 80)
        s = int(rng.integers(40, 80))
        crops.append(cv2.resize(norm[y:y + s, x:x + s], (side, side), interpolation=cv2.INTER_AREA).transpose(2, 1, 0))
    if det == 4:  # five landmark patches stacked on channels
        return np.stack([np.concatenate([np.roll(c, k, axis=1) for k in range(5)]) for c in crops])
    return np.stack(crops)


@pytest.mark.parametrize("det", [1, 2, 3, 4])
def test_mtcnn_matches_opencv(det: int) -> None:
    cv2 = _cv2_or_skip()
    x = _mtcnn_inputs(det).astype(np.float32)
    proto, weights = MTCNN / f"model/det{det}.prototxt", MTCNN / f"model/det{det}.caffemodel"
    net = build(proto, {"data": x.shape}, weights)
    ours = net.forward(data=x)
    layers = {}
    for blob in ours:
        layers[blob] = [p.layer.name for p in net._plans if blob in p.tops][-1]
    ref = cv_forward(cv2, proto, weights, {"data": x}, list(layers.values()))
    for blob, layer in layers.items():
        assert rel_err(ours[blob], ref[layer]) < 1e-5, blob
    if det in (1, 2, 3):  # face probabilities are softmaxes
        prob = next(v for k, v in ours.items() if k.startswith("prob"))
        np.testing.assert_allclose(prob.sum(1), 1, atol=1e-5)


def test_vanillacnn_matches_opencv() -> None:
    import cv2 as cv

    cv2 = _cv2_or_skip()
    mean = _imread(VANILLA / "trainMean.png").astype(np.float32)
    std = _imread(VANILLA / "trainSTD.png").astype(np.float32)
    face = _imread(MTCNN / "test2.jpg").astype(np.float32)
    crops = [cv.resize(face[y:y + s, x:x + s], (40, 40), interpolation=cv.INTER_AREA)
             for y, x, s in ((0, 0, 120), (30, 40, 100), (10, 90, 140))]
    x = np.stack([((c - mean) / np.maximum(std, 1)).transpose(2, 0, 1) for c in crops]).astype(np.float32)
    proto, weights = VANILLA / "ZOO/vanilla_deploy.prototxt", VANILLA / "ZOO/vanillaCNN.caffemodel"
    net = build(proto, {"data": x.shape}, weights)
    ours = net.forward(data=x)
    (blob, value), = ours.items()
    assert value.shape == (3, 10)  # five (x, y) landmarks
    layer = [p.layer.name for p in net._plans if blob in p.tops][-1]
    ref = cv_forward(cv2, proto, weights, {"data": x}, [layer])[layer]
    assert rel_err(value, ref) < 1e-5


# --------------------------------------------------------------------------------------------------
# HDF5 caffemodels
# --------------------------------------------------------------------------------------------------
H5_MODELS = sorted(CORPUS.rglob("*.caffemodel.h5"))


@pytest.mark.parametrize("path", H5_MODELS, ids=[p.name for p in H5_MODELS])
def test_hdf5_caffemodel_matches_h5py(path: Path) -> None:
    """Caffe's HDF5 snapshot: /data/<layer>/<blob index>. caffeport's reader == h5py's datasets, and a
    binary twin (same name without .h5), where the corpus has one, holds the same blobs."""
    import h5py
    blobs = load_caffemodel(path)
    with h5py.File(path, "r") as f:
        ref = {layer: [np.asarray(f["data"][layer][str(i)]) for i in range(len(f["data"][layer]))]
               for layer in f["data"]}
    ref = {k: v for k, v in ref.items() if v}
    assert sorted(k for k, v in blobs.items() if len(v)) == sorted(ref)
    for layer, arrays in ref.items():
        assert len(blobs[layer]) == len(arrays)
        for mine, theirs in zip(blobs[layer], arrays):
            np.testing.assert_array_equal(np.asarray(mine).reshape(theirs.shape), theirs)
    twin = path.with_suffix("")
    if twin.exists():
        binary = load_caffemodel(twin)
        for layer, arrays in ref.items():
            for mine, theirs in zip(binary[layer], arrays):
                np.testing.assert_array_equal(np.asarray(mine).reshape(theirs.shape), theirs)


def test_corpus_has_hdf5_caffemodels() -> None:
    assert len(H5_MODELS) >= 2
