"""export-weights: .npz of '<layer>/<kind>' arrays in Caffe or channels-last (Keras) layouts.

The channels-last arrays are checked by recomputing the net's forward in NHWC with numpy (and once
with torch) from ONLY the exported arrays, as a Keras model would, and comparing with caffeport's
NCHW forward; the caffe layout round-trips exactly into ``Net.copy_from``."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from caffeport.cli import main
from caffeport.errors import CaffeportError
from caffeport.export import weights as weights_mod
from caffeport.export.weights import (
    caffe_to_channels_last,
    export_weights,
    load_weights,
    weights_to_blobs,
)
from caffeport.io.prototxt import parse_net_text
from caffeport.net import Net
from caffeport.surgery import truncate
from tests.export.helpers import net_from_text

# conv (3->4, 3x3 pad 1) -> relu -> conv (4->6, group 2, 3x2 kernel, stride 1) -> relu -> max pool 2
# -> fc6 (after the spatial pool blob: its rows need the C,H,W -> H,W,C permutation) -> relu -> fc7.
# H != W everywhere so that an H/W mix-up cannot pass.
SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 10 dim: 7 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 6 kernel_h: 3 kernel_w: 2 group: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
%(flatten)s
layer { name: "fc6" type: "InnerProduct" bottom: "%(fc_in)s" top: "fc6" inner_product_param { num_output: 7 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" inner_product_param { num_output: 5 } }
"""
DIRECT = SMALL % {"flatten": "", "fc_in": "pool"}
# fc6 fed through Flatten + Dropout: still Caffe's C,H,W order, still permuted.
FLATTENED = SMALL % {"flatten": 'layer { name: "flat" type: "Flatten" bottom: "pool" top: "flat" }\n'
                                'layer { name: "drop" type: "Dropout" bottom: "flat" top: "flat" }',
                     "fc_in": "flat"}


def _x(shape=(2, 3, 10, 7), seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- an independent channels-last (NHWC) forward, as TensorFlow/Keras computes it ----------------
def _conv_nhwc(x: np.ndarray, k: np.ndarray, b: np.ndarray, pad: int = 0, groups: int = 1) -> np.ndarray:
    """Keras Conv2D (stride 1): x (N,H,W,C), kernel (kh,kw,C/g,O), by summing shifted matmuls."""
    kh, kw, cg, o = k.shape
    og = o // groups
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    y = np.zeros((x.shape[0], ho, wo, o))
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, i:i + ho, j:j + wo, g * cg:(g + 1) * cg]
                y[..., g * og:(g + 1) * og] += patch @ k[i, j, :, g * og:(g + 1) * og]
    return y + b


def _maxpool2_nhwc(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _small_forward_nhwc(a: dict[str, np.ndarray], x_nchw: np.ndarray) -> np.ndarray:
    x = x_nchw.transpose(0, 2, 3, 1)  # NHWC
    h = np.maximum(_conv_nhwc(x, a["conv1/kernel"], a["conv1/bias"], pad=1), 0)
    h = np.maximum(_conv_nhwc(h, a["conv2/kernel"], a["conv2/bias"], groups=2), 0)
    h = _maxpool2_nhwc(h)
    h = h.reshape(h.shape[0], -1)  # Keras Flatten of NHWC: H, W, C order
    h = np.maximum(h @ a["fc6/kernel"] + a["fc6/bias"], 0)  # Dense: (K, N)
    return h @ a["fc7/kernel"] + a["fc7/bias"]


@pytest.mark.parametrize("text", [DIRECT, FLATTENED], ids=["direct", "through-flatten"])
def test_channels_last_forward_matches_caffe(text: str) -> None:
    net = net_from_text(text, seed=3)
    a = caffe_to_channels_last(net)
    assert a["conv1/kernel"].shape == (3, 3, 3, 4)
    assert a["conv2/kernel"].shape == (3, 2, 2, 6)  # (kh, kw, I/g, O)
    c, hh, ww = net._shapes["pool"][1:]
    assert (c, hh, ww) == (6, 4, 3)
    assert a["fc6/kernel"].shape == (c * hh * ww, 7) and a["fc7/kernel"].shape == (7, 5)
    x = _x()
    want = net.forward(data=x)["fc7"]
    got = _small_forward_nhwc(a, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The permutation matters: fc6's plain transpose (the porting bug) gives another answer.
    bug = dict(a, **{"fc6/kernel": net.params["fc6"][0].data.T})
    assert not np.allclose(_small_forward_nhwc(bug, x), want, atol=1e-3)


def test_channels_last_conv_via_torch() -> None:
    """The exported (kh, kw, I/g, O) kernels, transposed back by hand, are torch's conv weights."""
    net = net_from_text(DIRECT, seed=4)
    a = caffe_to_channels_last(net)
    x = torch.from_numpy(_x(seed=2))
    k1 = torch.from_numpy(a["conv1/kernel"]).permute(3, 2, 0, 1)  # (kh,kw,I,O) -> (O,I,kh,kw)
    k2 = torch.from_numpy(a["conv2/kernel"]).permute(3, 2, 0, 1)
    h = F.relu(F.conv2d(x, k1, torch.from_numpy(a["conv1/bias"]), padding=1))
    h = F.relu(F.conv2d(h, k2, torch.from_numpy(a["conv2/bias"]), groups=2))
    h = F.max_pool2d(h, 2)
    h_nhwc = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)
    h = F.relu(h_nhwc @ torch.from_numpy(a["fc6/kernel"]) + torch.from_numpy(a["fc6/bias"]))
    got = (h @ torch.from_numpy(a["fc7/kernel"]) + torch.from_numpy(a["fc7/bias"])).numpy()
    np.testing.assert_allclose(got, net.forward(data=x.numpy())["fc7"], rtol=1e-4, atol=1e-5)


def test_channels_last_deconv_matches_conv2d_transpose() -> None:
    """Deconvolution (I, O/g, kh, kw) -> Conv2DTranspose (kh, kw, O/g, I), checked with a scatter-add
    NHWC transposed convolution (tf.nn.conv2d_transpose's definition)."""
    net = net_from_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 5 dim: 3 } } }
layer { name: "up" type: "Deconvolution" bottom: "data" top: "up"
        convolution_param { num_output: 6 kernel_h: 3 kernel_w: 4 stride: 2 pad: 1 group: 2 } }
""", seed=5)
    k = caffe_to_channels_last(net)["up/kernel"]
    b = caffe_to_channels_last(net)["up/bias"]
    assert k.shape == (3, 4, 3, 4)  # (kh, kw, O/g, I)
    x = _x((2, 4, 5, 3), seed=6)
    xh = x.transpose(0, 2, 3, 1).astype(np.float64)
    kh, kw, og, cin = k.shape
    cg = cin // 2
    s, p = 2, 1
    n, h, w, _ = xh.shape
    full = np.zeros((n, s * (h - 1) + kh, s * (w - 1) + kw, og * 2))
    for g in range(2):
        for i in range(kh):
            for j in range(kw):
                # full[n, y*s+i, x*s+j, o] += sum_c x[n, y, x, c] * k[i, j, o, c]
                contrib = xh[..., g * cg:(g + 1) * cg] @ k[i, j, :, g * cg:(g + 1) * cg].T
                full[:, i:i + s * (h - 1) + 1:s, j:j + s * (w - 1) + 1:s, g * og:(g + 1) * og] += contrib
    ho, wo = net._shapes["up"][2:]
    got = full[:, p:p + ho, p:p + wo] + b
    want = net.forward(data=x)["up"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


BN_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { eps: 0.001 } }
layer { name: "sc" type: "Scale" bottom: "bn" top: "sc" scale_param { bias_term: true } }
layer { name: "pr" type: "PReLU" bottom: "sc" top: "pr" }
"""


@pytest.mark.parametrize("layout", ["caffe", "channels_last"])
def test_batchnorm_scale_prelu(layout: str, tmp_path) -> None:
    net = net_from_text(BN_NET, seed=7)
    rng = np.random.default_rng(8)
    mean, var, sf = rng.standard_normal(3), rng.random(3) + 0.5, 2.5
    net.params["bn"][0].data = (mean * sf).astype(np.float32)
    net.params["bn"][1].data = (var * sf).astype(np.float32)
    net.params["bn"][2].data = np.array([sf], np.float32)
    a = export_weights(net, tmp_path / "w.npz", layout=layout)
    assert sorted(a) == ["bn/mean", "bn/var", "pr/alpha", "sc/beta", "sc/gamma"]
    np.testing.assert_allclose(a["bn/mean"], mean, rtol=1e-6)  # scale factor divided out
    np.testing.assert_allclose(a["bn/var"], var, rtol=1e-6)
    x = _x((2, 3, 4, 5), seed=9)
    xh = x.transpose(0, 2, 3, 1)  # NHWC, per-channel vectors broadcast on the last axis
    y = (xh - a["bn/mean"]) / np.sqrt(a["bn/var"] + 1e-3) * a["sc/gamma"] + a["sc/beta"]
    y = np.where(y > 0, y, y * a["pr/alpha"])
    np.testing.assert_allclose(y, net.forward(data=x)["pr"].transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
    if layout == "caffe":  # back into a fresh net: same forward (the factor becomes 1)
        other = net_from_text(BN_NET, seed=99)
        other.copy_from(weights_to_blobs(other, tmp_path / "w.npz"))
        np.testing.assert_allclose(other.forward(data=x)["pr"], net.forward(data=x)["pr"], rtol=1e-5, atol=1e-6)


def test_caffe_layout_round_trips_exactly(tmp_path) -> None:
    net = net_from_text(DIRECT, seed=11)
    path = tmp_path / "w.npz"
    export_weights(net, path)
    with zipfile.ZipFile(path) as z:  # plain .npy members, no pickles
        assert sorted(z.namelist()) == sorted(f"{k}.npy" for k in ("conv1/kernel", "conv1/bias", "conv2/kernel",
                                                                   "conv2/bias", "fc6/kernel", "fc6/bias",
                                                                   "fc7/kernel", "fc7/bias"))
    with np.load(path, allow_pickle=False) as z:
        for layer, blobs in net.params.items():
            assert np.array_equal(z[f"{layer}/kernel"], blobs[0].data)
            assert np.array_equal(z[f"{layer}/bias"], blobs[1].data)
    other = net_from_text(DIRECT, seed=12)
    assert not np.array_equal(other.params["fc6"][0].data, net.params["fc6"][0].data)
    assert other.copy_from(weights_to_blobs(other, path)) == ["conv1", "conv2", "fc6", "fc7"]
    for layer, blobs in net.params.items():
        for mine, theirs in zip(blobs, other.params[layer]):
            assert np.array_equal(mine.data, theirs.data)
    x = _x()
    assert np.array_equal(other.forward(data=x)["fc7"], net.forward(data=x)["fc7"])
    assert os.listdir(tmp_path) == ["w.npz"]  # no temp file left


def test_partial_loading_into_notop(tmp_path) -> None:
    """A full net's file loads into its "notop" cut (truncate): the conv layers only."""
    net = net_from_text(DIRECT, seed=13)
    export_weights(net, tmp_path / "full.npz")
    cut, _ = truncate(parse_net_text(DIRECT), "pool")
    notop = Net(cut)
    blobs = weights_to_blobs(notop, tmp_path / "full.npz")
    assert list(blobs) == ["conv1", "conv2"]
    assert notop.copy_from(blobs) == ["conv1", "conv2"]
    x = _x()
    np.testing.assert_array_equal(notop.forward(data=x)["pool"], net.forward(data=x, blobs=["pool"])["pool"])
    # and a notop file leaves the top of a full net alone
    export_weights(notop, tmp_path / "notop.npz")
    fresh = net_from_text(DIRECT, seed=14)
    fc6 = fresh.params["fc6"][0].data.copy()
    assert fresh.copy_from(weights_to_blobs(fresh, tmp_path / "notop.npz")) == ["conv1", "conv2"]
    assert np.array_equal(fresh.params["fc6"][0].data, fc6)
    assert np.array_equal(fresh.params["conv2"][0].data, net.params["conv2"][0].data)


def test_errors_and_atomic_write(tmp_path, monkeypatch) -> None:
    net = net_from_text(DIRECT, seed=15)
    with pytest.raises(CaffeportError, match="unknown weights layout"):
        export_weights(net, tmp_path / "w.npz", layout="nhwc")
    with pytest.raises(CaffeportError, match=r"\.npz"):
        export_weights(net, tmp_path / "w.bin")
    path = tmp_path / "w.npz"
    path.write_bytes(b"old")

    def broken(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(weights_mod.np, "savez", broken)
    with pytest.raises(CaffeportError, match=r"cannot write .*w\.npz: disk full"):
        export_weights(net, path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["w.npz"]
    monkeypatch.undo()
    # a Scale over (C, H) of an NCHW blob has no channels-last layout: an error naming the layer
    odd = net_from_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 4 } } }
layer { name: "s" type: "Scale" bottom: "data" top: "s" scale_param { axis: 1 num_axes: 2 } }
""")
    with pytest.raises(CaffeportError, match="layer 's' \\(Scale\\).*channels_last"):
        caffe_to_channels_last(odd)
    # a channels-last file is not a caffe-layout file
    export_weights(net, path, layout="channels_last")
    with pytest.raises(CaffeportError, match="does not fit"):
        weights_to_blobs(net, path)
    with pytest.raises(CaffeportError, match="not found"):
        load_weights(tmp_path / "missing.npz")


def test_cli_export_weights(tmp_path) -> None:
    net = net_from_text(DIRECT, seed=16)
    proto = tmp_path / "small.prototxt"
    proto.write_text(DIRECT)
    model = tmp_path / "small.caffemodel"
    net.save(model)
    runner = CliRunner()
    out = tmp_path / "keras.npz"
    r = runner.invoke(main, ["export-weights", str(proto), "-w", str(model), "-o", str(out),
                             "--layout", "channels_last", "--input-shape", "data:1,3,10,7"])
    assert r.exit_code == 0, r.output
    assert "8 arrays from 4 layers, channels_last layout" in r.output
    with np.load(out, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    w6 = net.params["fc6"][0].data  # (7, C*H*W) in C,H,W order
    c, h, w = net._shapes["pool"][1:]
    assert np.array_equal(a["fc6/kernel"], w6.reshape(7, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, 7))
    assert np.array_equal(a["fc7/kernel"], net.params["fc7"][0].data.T)
    assert np.array_equal(a["conv2/kernel"], net.params["conv2"][0].data.transpose(2, 3, 1, 0))
    x = _x((1, 3, 10, 7), seed=17)
    np.testing.assert_allclose(_small_forward_nhwc(a, x), net.forward(data=np.concatenate([x, x]))["fc7"][:1],
                               rtol=1e-4, atol=1e-5)
    out2 = tmp_path / "caffe.npz"
    r = runner.invoke(main, ["export-weights", str(proto), "--weights", str(model), "--output", str(out2)])
    assert r.exit_code == 0, r.output
    with np.load(out2, allow_pickle=False) as z:
        assert np.array_equal(z["fc6/kernel"], w6)
    r = runner.invoke(main, ["export-weights", str(proto), "-w", str(model), "-o", str(out2), "--layout", "nhwc"])
    assert r.exit_code == 2 and "nhwc" in r.output
    r = runner.invoke(main, ["export-weights", str(tmp_path / "nope.prototxt"), "-o", str(out2)])
    assert r.exit_code != 0 and "not found" in r.output
