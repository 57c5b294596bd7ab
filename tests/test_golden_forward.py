"""Every forward/backward golden case of real BVLC Caffe, run through caffeport.Net."""

from __future__ import annotations

import numpy as np
import pytest

from caffeport.net import Net
from caffeport.proto import caffe_pb2
from tests.golden import TEST_DEVICE, assert_close, case_info, cases, in_case, npz

FORWARD = cases("forward")


def _phase(info: dict) -> int:
    return caffe_pb2.TRAIN if info["phase"] == "TRAIN" else caffe_pb2.TEST


@pytest.mark.parametrize("name", FORWARD)
def test_forward_backward(name: str) -> None:
    info = case_info(name)
    atol, rtol = info["atol"], info["rtol"]
    with in_case(name) as d:
        net = Net(d / "net.prototxt", d / "weights.caffemodel" if (d / "weights.caffemodel").exists() else None,
                  phase=_phase(info), allow_python_layers=True,  # golden fixtures are trusted code
                  device=TEST_DEVICE)
        inputs = npz(name, "inputs.npz")
        net.forward(**inputs)
        ref = npz(name, "forward.npz")
        for key, value in ref.items():
            if key.startswith("param/"):
                layer, i = key[len("param/"):].rsplit("/", 1)
                got = net.params[layer][int(i)].data
            else:
                got = net.blobs[key].data
            assert_close(got, value, atol, rtol, f"{name}: forward {key}")
        if not info.get("backward"):
            return
        bwd = npz(name, "backward.npz")
        topdiffs = {k[len("topdiff/"):]: v for k, v in bwd.items() if k.startswith("topdiff/")}
        net.backward(**{k: np.broadcast_to(v, net.blobs[k].shape) for k, v in topdiffs.items()})
        for key, value in bwd.items():
            if key.startswith("diff/"):
                got = net.blobs[key[len("diff/"):]].diff
            elif key.startswith("param/"):
                layer, i = key[len("param/"):].rsplit("/", 1)
                got = net.params[layer][int(i)].diff
            else:
                continue
            assert_close(got, value, atol, rtol, f"{name}: backward {key}")
