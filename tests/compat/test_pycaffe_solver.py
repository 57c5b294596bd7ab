"""BVLC python/caffe/test/test_solver.py, ported (``caffe`` = caffeport.compat), plus pycaffe's solver
surface: compat nets, callbacks, live views across steps, Caffe's relative net paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import caffeport.compat as caffe
from caffeport.errors import CaffeportError
from tests.compat.test_pycaffe_net import simple_net_file

SOLVER = """net: '{net}'
test_iter: 10 test_interval: 10 base_lr: 0.01 momentum: 0.9
weight_decay: 0.0005 lr_policy: 'inv' gamma: 0.0001 power: 0.75
display: 100 max_iter: {max_iter} snapshot_after_train: false
snapshot_prefix: "model" """


@pytest.fixture
def solver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> caffe.SGDSolver:
    monkeypatch.chdir(tmp_path)  # snapshot_prefix "model" is relative to the working directory
    net_f = simple_net_file(tmp_path, 13)
    f = tmp_path / "solver.prototxt"
    f.write_text(SOLVER.format(net=net_f, max_iter=20))
    s = caffe.SGDSolver(str(f))
    caffe.get_solver(str(f))  # also make sure get_solver runs
    caffe.set_mode_cpu()
    rng = np.random.default_rng(0)
    s.net.blobs["label"].data[...] = rng.integers(13, size=s.net.blobs["label"].data.shape)
    s.test_nets[0].blobs["label"].data[...] = rng.integers(13, size=s.test_nets[0].blobs["label"].data.shape)
    os.remove(f)
    os.remove(net_f)
    return s


def test_solve(solver: caffe.SGDSolver) -> None:
    assert solver.iter == 0
    solver.solve(None)
    assert solver.iter == 20  # pycaffe's test uses max_iter 100; 20 keeps the suite fast


def test_apply_update(solver: caffe.SGDSolver) -> None:
    net = solver.net
    data = net.layers[1].blobs[0].data[...]
    data[...] = 0
    net.layers[1].blobs[0].diff[...] = 1
    solver.apply_update()  # the initial learning rate is 0.01
    assert (data - -0.01 * np.ones(data.shape)).max() < 1e-7
    assert solver.iter == 0  # ApplyUpdate does not count an iteration
    assert solver.lr == pytest.approx(0.01)


def test_net_memory(solver: caffe.SGDSolver) -> None:
    nets = [solver.net] + list(solver.test_nets)
    assert len(nets) == 2
    del solver
    total = 0.0
    for net in nets:
        for ps in net.params.values():
            for p in ps:
                total += p.data.sum() + p.diff.sum()
        for bl in net.blobs.values():
            total += bl.data.sum() + bl.diff.sum()
    assert np.isfinite(total)


def test_snapshot(solver: caffe.SGDSolver) -> None:
    solver.snapshot()
    for fn in ["model_iter_0.caffemodel", "model_iter_0.solverstate"]:
        assert os.path.isfile(fn)


def test_solver_nets_are_compat_nets(solver: caffe.SGDSolver) -> None:
    assert type(solver).__name__ == "SGDSolver"
    for net in [solver.net, *solver.test_nets]:
        assert isinstance(net, caffe.Net)
        assert [lay.type for lay in net.layers] == ["DummyData", "Convolution", "InnerProduct", "SoftmaxWithLoss"]
        assert hasattr(net, "forward_all")
    assert solver.param.base_lr == pytest.approx(0.01) and solver.param.max_iter == 20


def test_views_stay_live_across_steps_and_callbacks(solver: caffe.SGDSolver) -> None:
    net = solver.net
    w = net.params["ip"][0].data  # taken once
    loss_view = net.blobs["loss"].data
    conv_diff = net.blobs["conv"].diff
    calls: list[str] = []
    grads: list[np.ndarray] = []
    solver.add_callback(lambda: calls.append("start"), lambda: grads.append(net.params["ip"][0].diff.copy()))
    before = w.copy()
    solver.step(1)
    assert calls == ["start"] and len(grads) == 1
    # SGD at iter 0: v = lr * (grad + decay * w); w -= v (momentum history starts at zero)
    np.testing.assert_allclose(w, before - 0.01 * (grads[0] + 0.0005 * before), rtol=1e-5, atol=1e-7)
    # the loss view holds the step's loss: recompute it from the blobs the step left
    ip = net.blobs["ip_blob"].data.astype(np.float64)
    lab = net.blobs["label"].data.astype(int).ravel()
    p = np.exp(ip - ip.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    flt_min = float(np.finfo(np.float32).tiny)  # Caffe's SoftmaxWithLoss clamps the probability at FLT_MIN
    ref = -np.log(np.maximum(p[np.arange(len(lab)), lab], flt_min)).mean()
    # abs: with confident random weights float32 rounds p to 1 and the loss to 0 where float64 gives ~1e-10
    assert float(loss_view) == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert conv_diff.any()  # a diff view taken before the step shows the step's diff
    net.forward()
    net.backward()
    np.testing.assert_allclose(conv_diff, net.blobs["conv"].diff)


def test_share_weights(solver: caffe.SGDSolver, tmp_path: Path) -> None:
    other = caffe.Net(simple_net_file(tmp_path, 13), caffe.TEST)
    solver.share_weights(other)
    solver.net.params["ip"][0].data[...] = 0.125
    np.testing.assert_array_equal(other.params["ip"][0].data, 0.125)


def test_relative_net_path_working_directory_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "caffe_root"
    (root / "examples" / "toy").mkdir(parents=True)
    (root / "examples" / "toy" / "net.prototxt").write_text(Path(simple_net_file(tmp_path, 7)).read_text())
    (root / "examples" / "toy" / "solver.prototxt").write_text(
        SOLVER.format(net="examples/toy/net.prototxt", max_iter=1))
    # as `caffe train --solver examples/toy/solver.prototxt` from the Caffe root
    monkeypatch.chdir(root)
    s = caffe.get_solver("examples/toy/solver.prototxt")
    assert s.net.params["ip"][0].data.shape[0] == 7
    # the solver's folder is the second place tried
    (root / "examples" / "toy" / "solver2.prototxt").write_text(SOLVER.format(net="net.prototxt", max_iter=1))
    s2 = caffe.get_solver("examples/toy/solver2.prototxt")
    assert s2.net.params["ip"][0].data.shape[0] == 7
    # neither: the error names both places
    (root / "examples" / "toy" / "solver3.prototxt").write_text(SOLVER.format(net="nope.prototxt", max_iter=1))
    with pytest.raises(CaffeportError) as err:
        caffe.get_solver("examples/toy/solver3.prototxt")
    msg = str(err.value)
    assert str(root / "nope.prototxt") in msg and str(root / "examples" / "toy" / "nope.prototxt") in msg


def test_get_solver_picks_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    net_f = simple_net_file(tmp_path, 3)
    f = tmp_path / "adam.prototxt"
    f.write_text(SOLVER.format(net=net_f, max_iter=1).replace("momentum: 0.9", "momentum: 0.9 type: 'Adam'"))
    s = caffe.get_solver(str(f))
    assert type(s).__name__ == "AdamSolver" and isinstance(s.net, caffe.Net)


def test_test_nets_share_the_train_nets_memory(solver: caffe.SGDSolver) -> None:
    solver.net.params["conv"][0].data[...] = 0.3
    np.testing.assert_array_equal(solver.test_nets[0].params["conv"][0].data, np.float32(0.3))
    solver.step(2)  # updates are seen without a test pass (pycaffe's manual loops rely on it)
    np.testing.assert_array_equal(solver.test_nets[0].params["conv"][0].data, solver.net.params["conv"][0].data)


def test_restore(solver: caffe.SGDSolver, tmp_path: Path) -> None:
    solver.step(2)
    solver.snapshot()
    w = solver.net.params["ip"][0].data.copy()
    net_f = simple_net_file(tmp_path, 13)
    f = tmp_path / "again.prototxt"
    f.write_text(SOLVER.format(net=net_f, max_iter=20))
    again = caffe.SGDSolver(str(f))
    again.restore("model_iter_2.solverstate")
    assert again.iter == 2
    np.testing.assert_array_equal(again.net.params["ip"][0].data, w)
    np.testing.assert_array_equal(again.test_nets[0].params["ip"][0].data, w)  # still shared after restore
