"""Every golden `kind: upgrade` case: our upgrade == Caffe's upgrade tool output (as messages)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from caffeport.cli import main as cli
from caffeport.errors import CaffeportError
from caffeport.io import load_caffemodel, read_net, read_solver
from caffeport.io.prototxt import parse_net_text, read_text_or_binary
from caffeport.io.upgrade import V1_TYPE_NAMES, upgrade_net
from caffeport.proto import caffe_pb2
from tests.golden import case_dir, case_info, cases, npz

UPGRADE = cases("upgrade")


def test_there_are_upgrade_cases():
    assert len(UPGRADE) >= 5


def _expected(name: str):
    info = case_info(name)
    d = case_dir(name)
    solver = info["command"][0].startswith("upgrade_solver")
    msg = caffe_pb2.SolverParameter() if solver else caffe_pb2.NetParameter()
    return d / info["input"], read_text_or_binary(d / info["expected"], msg), solver


@pytest.mark.parametrize("name", UPGRADE)
def test_golden_upgrade(name):
    src, want, solver = _expected(name)
    got = read_solver(src, resolve_paths=False) if solver else read_net(src)
    assert got == want


@pytest.mark.parametrize("name", UPGRADE)
def test_golden_upgrade_cli(name, tmp_path):
    src, want, solver = _expected(name)
    out = tmp_path / ("out.caffemodel" if str(src).endswith(".caffemodel") else "out.prototxt")
    r = CliRunner().invoke(cli, ["upgrade", str(src), str(out)])
    assert r.exit_code == 0, r.output
    msg = caffe_pb2.SolverParameter() if solver else caffe_pb2.NetParameter()
    assert read_text_or_binary(out, msg) == want


def test_binary_caffemodel_params_match_expected():
    """Weights loaded from the V1 binary, aligned to the modern net's shapes, equal Caffe's load."""
    name = "upgrade_v1_binary_caffemodel"
    d = case_dir(name)
    exp = npz(name, "expected_params.npz")
    got = load_caffemodel(d / "v1.caffemodel")
    n = 0
    for key, ref in exp.items():
        _, layer, i = key.split("/")
        a = got[layer][int(i)]
        assert a.size == ref.size
        # legacy 4-D blobs match the modern shape after dropping leading 1s (Caffe's ShapeEquals)
        assert a.shape[len(a.shape) - ref.ndim :] == ref.shape and all(x == 1 for x in a.shape[: a.ndim - ref.ndim])
        np.testing.assert_array_equal(a.reshape(ref.shape), ref)
        n += 1
    assert n == len(exp) > 0
    # and the upgraded binary carries the same values
    up = load_caffemodel(d / "expected.caffemodel")
    assert {k: [x.tolist() for x in v] for k, v in up.items()} == {k: [x.tolist() for x in v] for k, v in got.items()}


def test_v1_type_table_covers_the_enum():
    assert set(V1_TYPE_NAMES) == set(caffe_pb2.V1LayerParameter.LayerType.keys())


def test_v0_padding_merge_and_errors():
    text = """input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 } bottom: "pad1" top: "conv1" }
"""
    net = parse_net_text(text)
    assert [lp.name for lp in net.layer] == ["input", "conv1"]
    conv = net.layer[1]
    assert list(conv.bottom) == ["data"] and list(conv.convolution_param.pad) == [2]
    with pytest.raises(CaffeportError, match="unknown V0 layer type 'convv'"):
        parse_net_text('layers { layer { name: "c" type: "convv" } }')
    with pytest.raises(CaffeportError, match="unknown bottom blob"):
        parse_net_text('layers { layer { name: "c" type: "conv" } bottom: "nowhere" top: "c" }')


def test_input_shape_upgrade_and_batchnorm():
    net = parse_net_text(
        'input: "a" input_shape { dim: 1 dim: 2 } input: "b" input_shape { dim: 3 }\n'
        'layer { name: "bn" type: "BatchNorm" bottom: "a" top: "a" param { name: "m" lr_mult: 1 } param {} param {} }'
    )
    assert net.layer[0].type == "Input" and list(net.layer[0].top) == ["a", "b"]
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 2], [3]]
    bn = net.layer[1]
    assert [(p.name, p.lr_mult, p.decay_mult) for p in bn.param] == [("m", 0, 0), ("", 0, 0), ("", 0, 0)]


def test_upgrade_net_in_place_returns_message():
    net = caffe_pb2.NetParameter()
    net.layers.add(name="r", type=caffe_pb2.V1LayerParameter.RELU)
    assert upgrade_net(net) is net and net.layer[0].type == "ReLU"
