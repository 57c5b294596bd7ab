"""Real caffemodels from the corpus: load, shapes vs their prototxt, cross-check with protobuf."""

from __future__ import annotations

import numpy as np
import pytest

from caffeport.errors import CaffeportError
from caffeport.io import load_caffemodel, load_caffemodel_net, read_net, save_caffemodel
from caffeport.io.blobs import scan_net_blobs
from caffeport.proto import caffe_pb2
from tests.golden import CORPUS
from tests.io._shapes import align_end, expected_param_shapes

R = CORPUS / "4_real_caffemodels"
CAFFEMODELS = sorted(p for p in CORPUS.rglob("*.caffemodel")) + sorted(CORPUS.rglob("*.caffemodel.h5"))

# caffemodel -> the deploy prototxt the manifest names for it
_EP, _MT, _RY, _JW, _YU, _UF = (
    "everpeace_caffe_2014/examples/",
    "mtcnn_kpzhang93/code/codes/MTCNNv2/model/",
    "ry0_cifar10_impact_scar/",
    "jwcom79_cifar10_hdf5/examples/cifar10/",
    "libfacedetection_yufacedetectnet/models/caffe/",
    "ultraface_linzaer/caffe/model/",
)
MATCHING = {
    _EP + "cifar10/cifar10_quick_iter_5000.caffemodel": _EP + "cifar10/cifar10_quick.prototxt",
    _EP + "cifar10/cifar10_full_iter_70000.caffemodel": _EP + "cifar10/cifar10_full.prototxt",
    _EP + "mnist/lenet_iter_10000.caffemodel": _EP + "mnist/lenet.prototxt",
    "ethereon_caffe-tensorflow_lenet/examples/mnist/lenet_iter_10000.caffemodel": (
        "ethereon_caffe-tensorflow_lenet/examples/mnist/lenet.prototxt"
    ),
    "ikkiChung_cifar10_quick_prediction/examples/cifar10/cifar10_quick_iter_5000.caffemodel": (
        _EP + "cifar10/cifar10_quick.prototxt"
    ),
    _MT + "det1.caffemodel": _MT + "det1.prototxt",
    _MT + "det2.caffemodel": _MT + "det2.prototxt",
    _MT + "det3.caffemodel": _MT + "det3.prototxt",
    _MT + "det4.caffemodel": _MT + "det4.prototxt",
    _RY + "caffemodel/normal/cifar10_impact_scar_quick_iter_10000.caffemodel": _RY + "cifar10_quick.prototxt",
    _RY + "caffemodel/padded/cifar10_impact_scar_quick_padded_iter_10000.caffemodel": (
        _RY + "cifar10_quick_padded.prototxt"
    ),
    _JW + "cifar10_quick_iter_5000.caffemodel.h5": _JW + "cifar10_quick.prototxt",
    _JW + "cifar10_full_iter_70000.caffemodel.h5": _JW + "cifar10_full.prototxt",
    _YU + "yufacedetectnet-open-v1.caffemodel": _YU + "yufacedetectnet-open-v1.prototxt",
    _YU + "yufacedetectnet-open-v2.caffemodel": _YU + "yufacedetectnet-open-v2.prototxt",
    _UF + "RFB-320/RFB-320.caffemodel": _UF + "RFB-320/RFB-320.prototxt",
    _UF + "Slim-320/slim-320.caffemodel": _UF + "Slim-320/slim-320.prototxt",
    "vanillacnn_ishay2b/ZOO/vanillaCNN.caffemodel": "vanillacnn_ishay2b/ZOO/vanilla_deploy.prototxt",
}


def _ids(paths):
    return [str(p.relative_to(CORPUS)) for p in paths]


def test_corpus_has_caffemodels():
    assert len(CAFFEMODELS) >= 18


@pytest.mark.parametrize("path", CAFFEMODELS, ids=_ids(CAFFEMODELS))
def test_load_matches_protobuf_decode(path):
    """The fast scanner gives exactly what protobuf's own parser gives (independent decode)."""
    got = load_caffemodel(path)
    assert got, "no parameter blobs found"
    if path.name.endswith(".h5"):
        import h5py

        with h5py.File(path, "r") as f:
            for name, blobs in got.items():
                for i, a in enumerate(blobs):
                    np.testing.assert_array_equal(a, f["data"][name][str(i)][()])
        return
    msg = caffe_pb2.NetParameter()
    msg.ParseFromString(path.read_bytes())
    ref = {}
    for lp in msg.layer:
        if len(lp.blobs):
            ref[lp.name] = lp.blobs
    for lp in msg.layers:
        if len(lp.blobs):
            ref[lp.name] = lp.blobs
    assert list(got) == list(ref)
    for name, blobs in ref.items():
        assert len(got[name]) == len(blobs)
        for a, b in zip(got[name], blobs):
            legacy = any(b.HasField(f) for f in ("num", "channels", "height", "width"))
            shape = (b.num, b.channels, b.height, b.width) if legacy else tuple(b.shape.dim)
            assert a.shape == shape and a.dtype == np.float32
            np.testing.assert_array_equal(a.ravel(), np.asarray(b.data, dtype=np.float32))


@pytest.mark.parametrize("model", sorted(MATCHING), ids=sorted(MATCHING))
def test_shapes_match_prototxt(model):
    weights = load_caffemodel(R / model)
    expected = expected_param_shapes(read_net(R / MATCHING[model]))
    checked = 0
    for layer, shapes in expected.items():
        assert layer in weights, f"layer {layer} missing from {model}"
        got = [a.shape for a in weights[layer]]
        assert len(got) == len(shapes), (layer, got, shapes)
        for g, e in zip(got, shapes):
            assert align_end(g, e), f"{layer}: caffemodel {g}, prototxt implies {e}"
            checked += 1
    assert checked >= 4, f"only {checked} blobs could be checked"


def test_v1_legacy_shapes_are_legacy_4d():
    w = load_caffemodel(R / "everpeace_caffe_2014/examples/cifar10/cifar10_quick_iter_5000.caffemodel")
    assert w["conv1"][1].shape == (1, 1, 1, 32)
    assert w["ip1"][0].shape == (1, 1, 64, 1024)


def test_load_caffemodel_net_is_upgraded():
    net = load_caffemodel_net(R / "everpeace_caffe_2014/examples/mnist/lenet_iter_10000.caffemodel")
    assert len(net.layers) == 0 and len(net.layer) > 0
    types = {lp.name: lp.type for lp in net.layer}
    assert types["conv1"] == "Convolution" and types["ip2"] == "InnerProduct"


def test_h5_and_binary_copies_agree():
    """jwcom79's HDF5 cifar10_quick and the same architecture's binary have the same shapes."""
    h5 = load_caffemodel(R / "jwcom79_cifar10_hdf5/examples/cifar10/cifar10_quick_iter_5000.caffemodel.h5")
    assert [(k, [a.shape for a in v]) for k, v in h5.items()] == [
        ("conv1", [(32, 3, 5, 5), (32,)]),
        ("conv2", [(32, 32, 5, 5), (32,)]),
        ("conv3", [(64, 32, 5, 5), (64,)]),
        ("ip1", [(64, 1024), (64,)]),
        ("ip2", [(10, 64), (10,)]),
    ]


@pytest.mark.parametrize("suffix", [".caffemodel", ".caffemodel.h5"])
def test_roundtrip_dict(tmp_path, suffix):
    rng = np.random.default_rng(1)
    w = {
        "conv/1": [rng.standard_normal((4, 3, 2, 2), dtype=np.float32), rng.standard_normal(4).astype(np.float32)],
        "ip": [rng.standard_normal((5, 7)).astype(np.float32)],
        "scalar": [np.array(3.5, np.float32)],
    }
    p = tmp_path / f"m{suffix}"
    save_caffemodel(w, p)
    back = load_caffemodel(p)
    assert sorted(back) == sorted(w)
    for k in w:
        for a, b in zip(w[k], back[k]):
            assert a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    if suffix == ".caffemodel":  # protobuf reads what we wrote
        msg = caffe_pb2.NetParameter.FromString(p.read_bytes())
        assert [lp.name for lp in msg.layer] == list(w)
        assert list(msg.layer[0].blobs[0].shape.dim) == [4, 3, 2, 2]


def test_roundtrip_netparameter(tmp_path):
    net = read_net(R / "everpeace_caffe_2014/examples/mnist/lenet_iter_10000.caffemodel")
    p = tmp_path / "lenet.caffemodel"
    save_caffemodel(net, p)
    assert read_net(p) == net
    a, b = load_caffemodel(p), load_caffemodel(R / "everpeace_caffe_2014/examples/mnist/lenet_iter_10000.caffemodel")
    assert all(np.array_equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def _wire_blob(fields: bytes) -> bytes:
    # NetParameter { layer { name: "l" blobs { <fields> } } }
    def ld(fn, payload):
        return bytes([(fn << 3) | 2]) + _varint(len(payload)) + payload

    layer = ld(1, b"l") + ld(7, fields)
    return (b"\xa2\x06") + _varint(len(layer)) + layer  # field 100, wire type 2


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def test_unpacked_and_double_encodings():
    """Repeated floats may be unpacked; double_data wins; all cross-checked against protobuf."""
    vals = np.arange(6, dtype=np.float32) * 0.5
    shape = b"\x3a" + _varint(4) + b"\x0a\x02\x02\x03"  # shape { dim: [2, 3] } packed
    unpacked = b"".join(b"\x2d" + v.tobytes() for v in vals)
    data = _wire_blob(shape + unpacked)
    got = scan_net_blobs(data)["l"][0]
    ref = caffe_pb2.NetParameter.FromString(data).layer[0].blobs[0]
    np.testing.assert_array_equal(got.ravel(), np.asarray(ref.data, np.float32))
    assert got.shape == (2, 3)
    dbl = np.arange(6, dtype=np.float64) / 3
    packed_d = b"\x42" + _varint(48) + dbl.tobytes()
    got = scan_net_blobs(_wire_blob(shape + packed_d))["l"][0]
    np.testing.assert_array_equal(got.ravel(), dbl.astype(np.float32))
    unpacked_d = b"".join(b"\x41" + v.tobytes() for v in dbl)
    legacy = b"\x08\x01\x10\x01\x18\x02\x20\x03"  # num 1 channels 1 height 2 width 3
    got = scan_net_blobs(_wire_blob(legacy + unpacked_d))["l"][0]
    assert got.shape == (1, 1, 2, 3)
    np.testing.assert_array_equal(got.ravel(), dbl.astype(np.float32))
    # packed data split over two chunks, and an unpacked shape dim
    two = b"\x3a\x04\x08\x02\x08\x03" + b"\x2a\x0c" + vals[:3].tobytes() + b"\x2a\x0c" + vals[3:].tobytes()
    got = scan_net_blobs(_wire_blob(two))["l"][0]
    ref = caffe_pb2.NetParameter.FromString(_wire_blob(two)).layer[0].blobs[0]
    np.testing.assert_array_equal(got.ravel(), np.asarray(ref.data, np.float32))
    assert got.shape == tuple(ref.shape.dim) == (2, 3)


def test_nvcaffe_fp16_raw_data():
    vals = np.array([1.5, -2.0, 0.25, 8.0], np.float16)
    blob = caffe_pb2.BlobProto(raw_data_type=caffe_pb2.FLOAT16, raw_data=vals.tobytes())
    blob.shape.dim.extend([2, 2])
    net = caffe_pb2.NetParameter()
    net.layer.add(name="x").blobs.add().CopyFrom(blob)
    got = scan_net_blobs(net.SerializeToString())["x"][0]
    np.testing.assert_array_equal(got, vals.astype(np.float32).reshape(2, 2))


def test_count_mismatch_is_an_error():
    bad = _wire_blob(b"\x3a\x04\x0a\x02\x02\x03" + b"\x2a\x08" + np.zeros(2, np.float32).tobytes())
    with pytest.raises(CaffeportError, match="expected 6"):
        scan_net_blobs(bad, "bad.caffemodel")


@pytest.mark.parametrize("cut", [1, 9, 100, 1000, -3])
def test_truncated_caffemodel(tmp_path, cut):
    src = (R / "mtcnn_kpzhang93/code/codes/MTCNNv2/model/det1.caffemodel").read_bytes()
    p = tmp_path / "trunc.caffemodel"
    p.write_bytes(src[:cut] if cut > 0 else src[:cut])
    with pytest.raises(CaffeportError, match="trunc.caffemodel"):
        load_caffemodel(p)


def test_garbage_and_missing_files(tmp_path):
    p = tmp_path / "junk.caffemodel"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CaffeportError, match="junk.caffemodel"):
        load_caffemodel(p)
    with pytest.raises(CaffeportError, match="not found"):
        load_caffemodel(tmp_path / "nope.caffemodel")
    e = tmp_path / "empty.caffemodel"
    e.write_bytes(b"")
    with pytest.raises(CaffeportError, match="empty"):
        load_caffemodel(e)
    t = tmp_path / "text.caffemodel"
    t.write_text('name: "x"\n')
    with pytest.raises(CaffeportError, match="text"):
        load_caffemodel(t)
    h = tmp_path / "bad.caffemodel.h5"
    h.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 50)
    with pytest.raises(CaffeportError, match="bad.caffemodel.h5"):
        load_caffemodel(h)


def test_failed_write_leaves_no_file(tmp_path):
    p = tmp_path / "out.caffemodel"
    with pytest.raises((TypeError, ValueError)):
        save_caffemodel({"l": [object()]}, p)
    assert not p.exists()
    assert list(tmp_path.iterdir()) == []
    save_caffemodel({"l": [np.ones(3, np.float32)]}, p)
    before = p.read_bytes()
    with pytest.raises((TypeError, ValueError)):
        save_caffemodel({"l": [object()]}, p)
    assert p.read_bytes() == before  # the old file is untouched
