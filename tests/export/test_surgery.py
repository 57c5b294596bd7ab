"""deploy derivation, convolutionalize and truncate, checked against hand-written files and the
original nets' outputs."""

from __future__ import annotations

import numpy as np
import pytest

from caffeport.errors import CaffeportError
from caffeport.export.common import randomize_weights
from caffeport.io import read_net
from caffeport.io.prototxt import parse_net_text
from caffeport.net import Net
from caffeport.surgery import convolutionalize, deploy_net, truncate
from tests.golden import CORPUS

CATS_DOGS = CORPUS / "1_tutorial_cats_dogs" / "caffe_models" / "caffe_model_2"


def test_deploy_matches_hand_written_cats_dogs() -> None:
    derived = deploy_net(read_net(CATS_DOGS / "caffenet_train_val_2.prototxt"),
                         input_shapes={"data": (1, 3, 227, 227)})
    hand = read_net(CATS_DOGS / "caffenet_deploy_2.prototxt")
    assert [(lp.name, lp.type) for lp in derived.layer] == [(lp.name, lp.type) for lp in hand.layer]
    for a, b in zip(derived.layer, hand.layer):
        assert a == b, f"layer {a.name} differs:\n{a}\nvs hand-written:\n{b}"


def test_deploy_needs_a_shape_when_the_data_is_unreadable() -> None:
    with pytest.raises(CaffeportError, match="--input-shape data:"):
        deploy_net(read_net(CATS_DOGS / "caffenet_train_val_2.prototxt"))


def test_deploy_batch_and_lmdb_shape(tmp_path) -> None:
    from caffeport.io.lmdb_store import LMDBWriter, array_to_datum

    db = tmp_path / "train_lmdb"
    with LMDBWriter(db) as w:
        w.put("00000000", array_to_datum(np.zeros((3, 40, 36), np.uint8), 1).SerializeToString())
    text = f"""
    layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
             transform_param {{ crop_size: 32 }} data_param {{ source: "{db}" batch_size: 16 backend: LMDB }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
             param {{ lr_mult: 1 }} inner_product_param {{ num_output: 4 weight_filler {{ type: "xavier" }} }} }}
    layer {{ name: "side" type: "InnerProduct" bottom: "data" top: "side" inner_product_param {{ num_output: 2 }} }}
    layer {{ name: "acc_side" type: "Accuracy" bottom: "side" bottom: "label" top: "acc2" }}
    layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include {{ phase: TEST }} }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
    """
    d = deploy_net(parse_net_text(text), root=tmp_path)
    assert [lp.name for lp in d.layer] == ["data", "ip", "prob"]  # 'side' only fed a dropped Accuracy
    assert list(d.layer[0].input_param.shape[0].dim) == [16, 3, 32, 32]
    assert list(d.layer[2].bottom) == ["ip"] and list(d.layer[2].top) == ["prob"]
    assert not d.layer[1].param and not d.layer[1].inner_product_param.HasField("weight_filler")
    d1 = deploy_net(parse_net_text(text), root=tmp_path, batch=1, keep_training_fields=True)
    assert list(d1.layer[0].input_param.shape[0].dim) == [1, 3, 32, 32]
    assert d1.layer[1].param[0].lr_mult == 1


SMALL_CAFFENET = """
name: "mini"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 67 dim: 67 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 7 stride: 4 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 group: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "fc6" type: "InnerProduct" bottom: "conv2" top: "fc6" inner_product_param { num_output: 16 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" inner_product_param { num_output: 12 } }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""


def _small_net(seed: int = 0) -> Net:
    net = Net(parse_net_text(SMALL_CAFFENET))
    randomize_weights(net, seed)
    return net


def test_convolutionalize_equals_original() -> None:
    net = _small_net()
    conv_msg, weights = convolutionalize(net.net_param, net.state_blobs(), net._shapes)
    assert [lp.type for lp in conv_msg.layer if lp.name.startswith("fc")] == ["Convolution"] * 3
    assert weights["fc6-conv"][0].shape == (16, 8, 6, 6) and weights["fc7-conv"][0].shape == (12, 16, 1, 1)
    conv = Net(conv_msg)
    conv.copy_from(weights)
    x = np.random.default_rng(0).standard_normal((2, 3, 67, 67)).astype(np.float32)
    want = net.forward(data=x)["prob"]
    got = conv.forward(data=x)["prob"]
    assert got.shape == (2, 5, 1, 1)
    np.testing.assert_allclose(got[:, :, 0, 0], want, rtol=1e-5, atol=1e-6)
    # On a larger image the class map's centre is the original net on the centre crop (stride 8).
    big = conv_msg
    big.layer[0].input_param.shape[0].dim[2] = 83
    big.layer[0].input_param.shape[0].dim[3] = 83
    conv_big = Net(big)
    conv_big.copy_from(weights)
    xb = np.random.default_rng(1).standard_normal((2, 3, 83, 83)).astype(np.float32)
    cmap = conv_big.forward(data=xb)["prob"]
    assert cmap.shape == (2, 5, 3, 3)
    centre = net.forward(data=xb[:, :, 8:75, 8:75])["prob"]
    np.testing.assert_allclose(cmap[:, :, 1, 1], centre, rtol=1e-5, atol=1e-6)
    assert not np.allclose(cmap[:, :, 0, 0], centre, atol=1e-4)


def test_truncate_keeps_only_what_the_blob_needs() -> None:
    net = _small_net()
    text = SMALL_CAFFENET.replace('layer { name: "fc6"', 'layer { name: "side" type: "InnerProduct" bottom: "pool1" '
                                  'top: "side" inner_product_param { num_output: 3 } }\nlayer { name: "fc6"')
    msg = parse_net_text(text)
    weights = dict(net.state_blobs())
    cut, w2 = truncate(msg, "conv2", weights)
    assert [lp.name for lp in cut.layer] == ["data", "conv1", "relu1", "pool1", "conv2", "relu2"]
    assert set(w2) == {"conv1", "conv2"}
    notop = Net(cut)
    notop.copy_from(w2)
    x = np.random.default_rng(2).standard_normal((2, 3, 67, 67)).astype(np.float32)
    want = net.forward(data=x, blobs=["conv2"])["conv2"]
    got = notop.forward(data=x)["conv2"]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(CaffeportError, match="conv3"):
        truncate(msg, "conv3")


def test_truncate_train_val_keeps_both_data_layers() -> None:
    msg = read_net(CATS_DOGS / "caffenet_train_val_2.prototxt")
    cut, _ = truncate(msg, "pool5")
    names = [lp.name for lp in cut.layer]
    assert names.count("data") == 2 and names[-1] == "pool5" and "fc6" not in names


# --------------------------------------------------------------------------------------------------
# Input-fed TEST nets (data AND label as Input layers, plus Accuracy and a loss)
# --------------------------------------------------------------------------------------------------
INPUT_FED = """
name: "input_fed"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        param { lr_mult: 1 } convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "label_copy" type: "Power" bottom: "label" top: "label2" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label2" top: "acc" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

INPUT_FED_DEPLOY = """
name: "input_fed"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""

# One Input layer with both tops (per-top shapes).
INPUT_FED_ONE_LAYER = """
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_deploy_of_input_fed_net_matches_hand_written() -> None:
    derived = deploy_net(parse_net_text(INPUT_FED))
    assert derived == parse_net_text(INPUT_FED_DEPLOY), str(derived)
    one = deploy_net(parse_net_text(INPUT_FED_ONE_LAYER), batch=2)
    assert [(lp.name, list(lp.top)) for lp in one.layer] == [("in", ["data"]), ("ip", ["ip"]), ("prob", ["prob"])]
    assert [list(s.dim) for s in one.layer[0].input_param.shape] == [[2, 3, 6, 6]]
    shaped = deploy_net(parse_net_text(INPUT_FED), input_shapes={"data": (1, 3, 9, 9)})
    assert list(shaped.layer[0].input_param.shape[0].dim) == [1, 3, 9, 9]
    with pytest.raises(CaffeportError, match="'nope'"):
        deploy_net(parse_net_text(INPUT_FED), input_shapes={"nope": (1, 2)})


def _numpy_prob(weights: dict, x: np.ndarray) -> np.ndarray:
    """The deploy net's output written out with numpy: conv 3x3 valid, ReLU, fc, softmax."""
    w, b = weights["conv"]
    n, c, h, wd = x.shape
    conv = np.zeros((n, w.shape[0], h - 2, wd - 2))
    for i in range(h - 2):
        for j in range(wd - 2):
            conv[:, :, i, j] = np.einsum("nckl,ockl->no", x[:, :, i:i + 3, j:j + 3], w) + b
    conv = np.maximum(conv, 0)
    wf, bf = weights["ip"]
    ip = conv.reshape(n, -1) @ wf.T + bf
    e = np.exp(ip - ip.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_input_fed_net_exports_through_the_cli(tmp_path) -> None:
    import onnxruntime as ort
    import torch
    from click.testing import CliRunner

    from caffeport.cli import main
    from caffeport.io import save_caffemodel

    model = tmp_path / "test.prototxt"
    model.write_text(INPUT_FED)
    rng = np.random.default_rng(3)
    f32 = np.float32
    weights = {"conv": [rng.standard_normal((4, 3, 3, 3)).astype(f32), rng.standard_normal(4).astype(f32)],
               "ip": [rng.standard_normal((5, 64)).astype(f32) * 0.3, rng.standard_normal(5).astype(f32)]}
    w = tmp_path / "w.caffemodel"
    save_caffemodel(weights, w)
    x = rng.standard_normal((4, 3, 6, 6)).astype(np.float32)
    want = _numpy_prob(weights, x.astype(np.float64))
    runner = CliRunner()
    r = runner.invoke(main, ["export-onnx", str(model), "-w", str(w), "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["data"] and [o.name for o in sess.get_outputs()] == ["prob"]
    np.testing.assert_allclose(sess.run(["prob"], {"data": x})[0], want, rtol=1e-4, atol=1e-6)
    r = runner.invoke(main, ["export-torch", str(model), "-w", str(w), "--export", "-o", str(tmp_path / "m.pt2")])
    assert r.exit_code == 0, r.output
    got = torch.export.load(str(tmp_path / "m.pt2")).module()(torch.from_numpy(x))[0]
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-6)
    r = runner.invoke(main, ["export-torch", str(model), "-w", str(w), "--python", "-o", str(tmp_path / "gen.py")])
    assert r.exit_code == 0, r.output
    from caffeport.export.pysource import load_generated

    gen = load_generated((tmp_path / "gen.py").read_text()).Net()
    gen.load_state_dict(torch.load(tmp_path / "gen.pt", weights_only=True))
    got = gen.eval()(data=torch.from_numpy(x))
    assert list(got) == ["prob"]
    np.testing.assert_allclose(got["prob"].detach().numpy(), want, rtol=1e-4, atol=1e-6)
    r = runner.invoke(main, ["deploy", str(model), "-o", str(tmp_path / "d.prototxt"), "--batch", "1"])
    assert r.exit_code == 0, r.output
    d = read_net(tmp_path / "d.prototxt")
    assert [lp.name for lp in d.layer] == ["data", "conv", "relu", "ip", "prob"]
    assert list(d.layer[0].input_param.shape[0].dim) == [1, 3, 6, 6]
