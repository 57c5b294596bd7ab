"""caffe.draw: BVLC python/caffe/test/test_draw.py ported (every net prototxt under BVLC's models/
and examples/, here ../shared/corpus/2_bvlc_caffe/head, is drawn), with the drawing checked
against the prototxt itself; pycaffe's phase rule, edge labels, rankdir, the pydot and no-pydot
paths and the file writers."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pydot
import pytest
from google.protobuf import text_format

import caffeport.compat as caffe
import caffeport.compat.draw
from caffeport.errors import CaffeportError
from tests.golden import CORPUS

pb2 = caffe.proto.caffe_pb2
HEAD = CORPUS / "2_bvlc_caffe/head"
LENET = HEAD / "examples/mnist/lenet_train_test.prototxt"


def net_files() -> list[Path]:
    """As BVLC's getFilenames: the .prototxt files under models/ and examples/ without 'solver'."""
    out = [p for d in ("models", "examples") for p in sorted((HEAD / d).rglob("*.prototxt"))
           if "solver" not in p.name]
    assert len(out) >= 25
    return out


def _read(path: Path) -> pb2.NetParameter:
    net = pb2.NetParameter()
    text_format.Merge(path.read_text(), net)
    return net


def test_draw_net() -> None:
    """Every BVLC net draws; its DOT has one node per layer and one edge per bottom and top.
    (BVLC's test renders PNGs; the PNG path is exercised on LeNet below, as matplotlib's
    layout of all 29 nets would take most of a minute.)"""
    for path in net_files():
        net = _read(path)
        dot = caffe.draw.draw_net(net, "LR", ext="raw").decode()
        assert len(re.findall(r"^  layer\d+ \[", dot, re.M)) == len(net.layer), path
        n_edges = sum(len(lp.bottom) + len(lp.top) for lp in net.layer)
        assert len(re.findall(r" -> ", dot)) == n_edges, path


def test_draw_net_png_and_files(tmp_path: Path) -> None:
    net = _read(LENET)
    assert caffe.draw.draw_net(net, "LR")[:8] == b"\x89PNG\r\n\x1a\n"
    caffe.draw.draw_net_to_file(net, str(tmp_path / "lenet.png"), "TB", phase=caffe.TEST)
    assert (tmp_path / "lenet.png").read_bytes()[:4] == b"\x89PNG"
    caffe.draw.draw_net_to_file(net, str(tmp_path / "lenet.raw"))
    assert (tmp_path / "lenet.raw").read_text().startswith('digraph "LeNet" {')
    with pytest.raises(CaffeportError, match="unknown picture format"):
        caffe.draw.draw_net_to_file(net, str(tmp_path / "lenet.bmpx"))
    assert not (tmp_path / "lenet.bmpx").exists()


def test_svg_without_graphviz_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CaffeportError, match="Graphviz"):
        caffe.draw.draw_net_to_file(_read(LENET), str(tmp_path / "lenet.svg"))
    assert not (tmp_path / "lenet.svg").exists()


def _layer_labels(graph: pydot.Dot) -> list[str]:
    return [n.get("label").strip('"').split("\\n")[0] for n in graph.get_nodes() if n.get_name().startswith("layer")]


def test_pydot_graph_phase_and_edge_labels() -> None:
    net = _read(LENET)
    g = caffe.draw.get_pydot_graph(net, "LR", phase=caffe.TEST)
    assert isinstance(g, pydot.Dot)
    names = [lp.name for lp in net.layer]
    assert _layer_labels(caffe.draw.get_pydot_graph(net, "LR")) == names
    assert _layer_labels(g) == names[1:]  # layer 0 is the TRAIN-only data layer
    assert "accuracy" in _layer_labels(g)
    assert "accuracy" not in _layer_labels(caffe.draw.get_pydot_graph(net, "LR", phase=caffe.TRAIN))
    labels = {(e.get_source(), e.get_destination()): e.get("label") for e in g.get_edges()}
    assert labels[("layer0", "blob1")] == '"Batch 100"'  # TEST data layer: batch 100
    assert labels[("layer1", "blob3")] == '"20"'  # conv1 num_output
    unlabeled = caffe.draw.get_pydot_graph(net, "LR", label_edges=False)
    assert all(e.get("label") is None for e in unlabeled.get_edges())


def test_pycaffe_phase_rule_and_include_exclude_error() -> None:
    net = text_format.Parse("""
      layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 } } }
      layer { name: "staged" type: "ReLU" bottom: "x" top: "y" include { stage: "deploy" } }
      layer { name: "notest" type: "ReLU" bottom: "x" top: "z" exclude { phase: TEST } }
    """, pb2.NetParameter())
    # an include rule without a phase reads as phase TRAIN (pycaffe compares the field's default)
    assert _layer_labels(caffe.draw.get_pydot_graph(net, "LR", phase=caffe.TRAIN)) == ["in", "staged", "notest"]
    assert _layer_labels(caffe.draw.get_pydot_graph(net, "LR", phase=caffe.TEST)) == ["in"]
    bad = pb2.NetParameter()
    bad.CopyFrom(net)
    bad.layer[1].exclude.add(phase=caffe.TEST)
    with pytest.raises(ValueError, match="has both include and exclude"):
        caffe.draw.get_pydot_graph(bad, "LR", phase=caffe.TEST)
    caffe.draw.get_pydot_graph(bad, "LR")  # phase None: no filtering, no error (as pycaffe)


def test_rankdir_and_lr_mults() -> None:
    net = _read(LENET)
    tb = caffe.draw.get_pydot_graph(net, "TB", display_lrm=True)
    conv1 = next(n for n in tb.get_nodes() if n.get_name() == "layer2")
    assert conv1.get("label") == '"conv1 (Convolution) kernel 5, stride 1, pad 0 num_output 20 ' \
                                 'param 0: lr_mult 1, decay_mult 1 param 1: lr_mult 2, decay_mult 1"'
    assert "rankdir=TB" in tb.to_string()
    with pytest.raises(CaffeportError, match="rankdir"):
        caffe.draw.draw_net(net, "XY", ext="raw")


def test_without_pydot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pydot", None)  # import pydot -> ImportError
    net = _read(LENET)
    g = caffe.draw.get_pydot_graph(net, "LR", phase=caffe.TEST)
    assert isinstance(g, caffeport.compat.draw.DotGraph)
    text = caffe.draw.draw_net(net, "LR", ext="raw", phase=caffe.TEST).decode()
    assert g.to_string() == text
    assert len(re.findall(r"^  (layer|blob)\d+ \[", text, re.M)) == 10 + 11  # TEST layers + blob versions
    g.write(tmp_path / "g.dot")
    assert (tmp_path / "g.dot").read_text() == text
    assert g.create_png()[:4] == b"\x89PNG"


def test_pycaffe_helpers() -> None:
    conv = text_format.Parse('name: "c" type: "Convolution" param { lr_mult: 3 } '
                             'convolution_param { num_output: 7 kernel_size: 3 stride: 2 }', pb2.LayerParameter())
    assert caffe.draw.get_edge_label(conv) == "7"
    assert caffe.draw.get_layer_lr_mult(conv) == (3.0, 1.0)
    assert caffe.draw.get_layer_label(conv, "LR", display_lrm=True) == \
        '"c\\n(Convolution)\\nkernel size: 3\\nstride: 2\\npad: 0\\nlr mult: 3.0, 1.0"'
    assert caffe.draw.get_pooling_types_dict() == {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}
    assert caffe.draw.choose_color_by_layertype("Pooling") == "#FF9900"
    with pytest.raises(ValueError, match="do not have a learning rate multiplier"):
        caffe.draw.get_layer_lr_mult(pb2.LayerParameter(type="ReLU"))
