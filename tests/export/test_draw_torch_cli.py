"""draw (DOT content, rendering choices), PyTorch files (state_dict round trip, programs), and the
export commands end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffeport.cli import main
from caffeport.errors import CaffeportError
from caffeport.export import draw as draw_mod
from caffeport.export.draw import build_graph, draw_net_file, to_dot
from caffeport.export.torch_export import (
    export_program,
    load_state_dict,
    net_state_dict,
    save_state_dict,
    state_dict_to_blobs,
)
from caffeport.io import read_net
from caffeport.net import Net
from tests.export.test_surgery import CATS_DOGS, _small_net
from tests.golden import CORPUS

TRAIN_VAL = CATS_DOGS / "caffenet_train_val_2.prototxt"
LENET = CORPUS / "2_bvlc_caffe" / "head" / "examples" / "mnist" / "lenet_train_test.prototxt"


# --------------------------------------------------------------------------------------------------
# draw
# --------------------------------------------------------------------------------------------------
def test_dot_content() -> None:
    g = build_graph(read_net(TRAIN_VAL), phase="TEST")
    dot = to_dot(g, "TB")
    assert dot.startswith('digraph "CaffeNet" {') and "rankdir=TB;" in dot
    assert "conv1\\n(Convolution)\\nkernel 11, stride 4, pad 0\\nnum_output 96" in dot
    assert "pool1\\n(Pooling)\\nMAX kernel 3, stride 2, pad 0" in dot
    assert "conv2\\n(Convolution)\\nkernel 5, stride 1, pad 2\\nnum_output 256, group 2" in dot
    assert "relu1\\n(ReLU, in-place)" in dot and 'style="filled,rounded,dashed"' in dot
    assert dot.count("shape=octagon") == len(g.nodes) - len(read_net(TRAIN_VAL).layer) + 1  # one data layer
    assert dot.count("(Data)") == 1  # TEST only
    all_phases = to_dot(build_graph(read_net(TRAIN_VAL), phase="ALL", display_lrm=True))
    assert all_phases.count("(Data)") == 2 and "lr_mult 2, decay_mult 0" in all_phases
    # every edge joins declared nodes, and the in-place chain is acyclic: conv1 -> relu1 -> conv1'
    ids = {n.id for n in g.nodes}
    assert all(a in ids and b in ids for a, b in g.edges)
    relu1 = next(n.id for n in g.nodes if n.label.startswith("relu1\n"))
    into = [a for a, b in g.edges if b == relu1]
    out = [b for a, b in g.edges if a == relu1]
    assert len(into) == 1 and len(out) == 1 and into != out


def test_draw_files(tmp_path, monkeypatch) -> None:
    out = tmp_path / "net.dot"
    assert draw_net_file(TRAIN_VAL, out, phase="TRAIN") == "dot text"
    assert "(Data)" in out.read_text() and "only TRAIN" in out.read_text()
    monkeypatch.setattr(draw_mod.shutil, "which", lambda name: None)
    with pytest.raises(CaffeportError, match="apt-get install graphviz"):
        draw_net_file(TRAIN_VAL, tmp_path / "net.svg")
    png = tmp_path / "net.png"
    assert draw_net_file(TRAIN_VAL, png, phase="TEST").startswith("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(CaffeportError, match="unknown picture format"):
        draw_net_file(TRAIN_VAL, tmp_path / "net.jpg")


# --------------------------------------------------------------------------------------------------
# PyTorch files
# --------------------------------------------------------------------------------------------------
def test_state_dict_round_trip(tmp_path) -> None:
    net = _small_net(3)
    path = tmp_path / "w.pt"
    save_state_dict(net, path)
    sd = torch.load(path, weights_only=True)
    assert list(sd)[:2] == ["conv1.0", "conv1.1"] and tuple(sd["fc6.0"].shape) == (16, 288)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    fresh = _small_net(4)
    x = np.random.default_rng(0).standard_normal((2, 3, 67, 67)).astype(np.float32)
    assert not np.allclose(fresh.forward(data=x)["prob"], net.forward(data=x)["prob"])
    fresh.copy_from(state_dict_to_blobs(load_state_dict(path)))
    np.testing.assert_array_equal(fresh.forward(data=x)["prob"], net.forward(data=x)["prob"])
    assert set(net_state_dict(net)) == set(sd)


@pytest.mark.parametrize("kind,suffix", [("torchscript", ".pt"), ("export", ".pt2")])
def test_programs(tmp_path, kind: str, suffix: str) -> None:
    net = _small_net(5)
    path = tmp_path / f"m{suffix}"
    err = export_program(net, path, kind)
    assert err < 1e-5 and path.exists()


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def test_cli_export_onnx_from_train_test(tmp_path) -> None:
    out = tmp_path / "lenet.onnx"
    r = CliRunner().invoke(main, ["export-onnx", str(LENET), "-o", str(out), "--input-shape", "data:4,1,28,28",
                                  "--dynamic-batch"])
    assert r.exit_code == 0, r.output
    assert "max relative error" in r.output and out.exists()
    import onnx

    m = onnx.load(str(out))
    assert [i.name for i in m.graph.input] == ["data"] and [o.name for o in m.graph.output] == ["prob"]


def test_cli_deploy_truncate_convolutionalize_draw(tmp_path) -> None:
    runner = CliRunner()
    dep = tmp_path / "deploy.prototxt"
    r = runner.invoke(main, ["deploy", str(TRAIN_VAL), "-o", str(dep), "--input-shape", "data:1,3,227,227"])
    assert r.exit_code == 0, r.output
    assert read_net(dep) == read_net(CATS_DOGS / "caffenet_deploy_2.prototxt")
    r = runner.invoke(main, ["deploy", str(TRAIN_VAL), "-o", str(dep)])
    assert r.exit_code == 1 and "--input-shape" in r.output
    small = tmp_path / "small.prototxt"
    from caffeport.io import save_caffemodel, write_net

    net = _small_net(6)
    write_net(net.net_param, small)
    w = tmp_path / "small.caffemodel"
    save_caffemodel(net.state_blobs(), w)
    r = runner.invoke(main, ["truncate", str(small), "--blob", "pool1", "-o", str(tmp_path / "t.prototxt"),
                             "-w", str(w), "--weights-out", str(tmp_path / "t.caffemodel")])
    assert r.exit_code == 0, r.output
    assert [lp.name for lp in read_net(tmp_path / "t.prototxt").layer] == ["data", "conv1", "relu1", "pool1"]
    r = runner.invoke(main, ["convolutionalize", str(small), "-w", str(w), "-o", str(tmp_path / "c.prototxt"),
                             "--weights-out", str(tmp_path / "c.caffemodel")])
    assert r.exit_code == 0, r.output
    conv = Net(tmp_path / "c.prototxt", tmp_path / "c.caffemodel")
    x = np.random.default_rng(0).standard_normal((2, 3, 67, 67)).astype(np.float32)
    np.testing.assert_allclose(conv.forward(data=x)["prob"][:, :, 0, 0], net.forward(data=x)["prob"], rtol=1e-5,
                               atol=1e-6)
    r = runner.invoke(main, ["draw", str(small), str(tmp_path / "s.dot"), "--rankdir", "TB"])
    assert r.exit_code == 0 and "rankdir=TB" in (tmp_path / "s.dot").read_text()
    r = runner.invoke(main, ["export-torch", str(small), "-w", str(w), "-o", str(tmp_path / "s.pt")])
    assert r.exit_code == 0, r.output
    assert set(torch.load(tmp_path / "s.pt", weights_only=True)) == set(net_state_dict(net))
