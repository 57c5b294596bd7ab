"""The BVLC Caffe data-layer golden cases: every batch of Data/ImageData/HDF5Data must match Caffe's.

Each case is run twice: through the layer directly (no Net needed) and through ``caffeport.net.Net``
with the case folder as cwd, calling ``forward()`` as often as Caffe did.
"""

from __future__ import annotations

import pytest

from caffeport.io.prototxt import read_net
from caffeport.layers.base import BuildContext, layer_class
from caffeport.proto import caffe_pb2
from tests.golden import assert_close, case_info, cases, in_case, npz

# Every case whose outputs.npz holds data-layer batches (kind "data", and the tool cases' read-back).
DATA_CASES = cases("data") + cases("tool")


def _check(name: str, k: int, tops: dict, ref: dict, atol: float, rtol: float) -> int:
    n = 0
    for top, got in tops.items():
        key = f"{top}@{k}"
        if key in ref:
            assert_close(got, ref[key], atol, rtol, f"{name}: {key}")
            n += 1
    return n


@pytest.mark.parametrize("name", DATA_CASES)
def test_data_layer_direct(name: str) -> None:
    info = case_info(name)
    ref = npz(name, "outputs.npz")
    with in_case(name) as d:
        net = read_net(d / "net.prototxt")
        lp = net.layer[0]
        cls = layer_class(lp.type)
        assert cls is not None and cls.is_data
        layer = cls(lp, [], BuildContext(phase=caffe_pb2.TEST, root=d, source=str(d / "net.prototxt")))
        shapes = layer.top_shapes([])
        checked = 0
        for k in range(info["n_forward"]):
            outs = layer.forward()
            assert [tuple(o.shape) for o in outs] == [tuple(s) for s in shapes]
            checked += _check(name, k, {t: o.numpy() for t, o in zip(lp.top, outs)}, ref, info["atol"],
                              info["rtol"])
        assert checked > 0


@pytest.mark.parametrize("name", cases("data"))
def test_data_case_through_net(name: str) -> None:
    from caffeport.net import Net

    info = case_info(name)
    ref = npz(name, "outputs.npz")
    with in_case(name) as d:
        net = Net(d / "net.prototxt", phase=caffe_pb2.TEST)
        checked = 0
        for k in range(info["n_forward"]):
            net.forward()
            tops = {key.split("@")[0]: net.blobs[key.split("@")[0]].data for key in ref if key.endswith(f"@{k}")}
            checked += _check(name, k, tops, ref, info["atol"], info["rtol"])
        assert checked > 0
