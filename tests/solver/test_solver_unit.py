"""Solver behaviour on a tiny Input-fed net, checked against an independent numpy model of Caffe's
update rules, plus resume, snapshots, errors and log format."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from caffeport.errors import CaffeportError
from caffeport.io import read_solverstate
from caffeport.proto import caffe_pb2
from caffeport.solver import Glog, get_solver
from tests.solver._tiny import feed, numpy_train, write_case

RULE_CASES = {
    "SGD": ('type: "SGD" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01', dict(momentum=0.9)),
    "Nesterov": ('type: "Nesterov" base_lr: 0.05 momentum: 0.95 weight_decay: 0.01', dict(momentum=0.95)),
    "AdaGrad": ('type: "AdaGrad" base_lr: 0.1 delta: 1e-6 weight_decay: 0.01', dict(delta=1e-6)),
    "RMSProp": ('type: "RMSProp" base_lr: 0.01 rms_decay: 0.9 delta: 1e-6 weight_decay: 0.01',
                dict(rms_decay=0.9, delta=1e-6)),
    "AdaDelta": ('type: "AdaDelta" base_lr: 1.0 momentum: 0.95 delta: 1e-6 weight_decay: 0.01',
                 dict(momentum=0.95, delta=1e-6)),
    "Adam": ('type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999 weight_decay: 0.01', dict(momentum=0.9)),
}


@pytest.mark.parametrize("kind", sorted(RULE_CASES))
def test_update_rule_matches_numpy_model(kind: str, tmp_path: Path) -> None:
    text, kw = RULE_CASES[kind]
    base_lr = float(re.search(r"base_lr: ([\d.e-]+)", text).group(1))
    path = write_case(tmp_path, text + '\nlr_policy: "fixed"\nmax_iter: 15\nsnapshot_after_train: false')
    s = get_solver(path)
    assert type(s).__name__ == f"{kind}Solver"
    feed(s)
    w0 = s.net.params["ip"][0].data.copy()
    b0 = s.net.params["ip"][1].data.copy()
    losses = []
    s.add_callback(on_gradients_ready=lambda: losses.append(s.last_loss))
    s.solve()
    w, b, ref_losses = numpy_train(w0, b0, kind, 15, base_lr=base_lr, weight_decay=0.01, **kw)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.net.params["ip"][0].data, w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s.net.params["ip"][1].data, b, rtol=1e-4, atol=1e-5)


def test_l1_and_step_policy_match_numpy(tmp_path: Path) -> None:
    path = write_case(tmp_path, 'type: "SGD" base_lr: 0.1 momentum: 0.9 weight_decay: 0.02 regularization_type: "L1"\n'
                                'lr_policy: "step" gamma: 0.5 stepsize: 4\nmax_iter: 12\nsnapshot_after_train: false')
    s = get_solver(path)
    feed(s)
    w0, b0 = (s.net.params["ip"][i].data.copy() for i in range(2))
    s.solve()
    w, b, _ = numpy_train(w0, b0, "SGD", 12, base_lr=0.1, momentum=0.9, weight_decay=0.02, reg="L1",
                          lr_at=lambda it: 0.1 * 0.5 ** (it // 4))
    np.testing.assert_allclose(s.net.params["ip"][0].data, w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s.net.params["ip"][1].data, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_resume_equals_uninterrupted(tmp_path: Path, fmt: str) -> None:
    """2N iterations in one go == N iterations, snapshot, a fresh solver restored, N more."""
    text = ('type: "Adam" base_lr: 0.05 momentum: 0.9 weight_decay: 0.001\nlr_policy: "multistep" gamma: 0.5 '
            f'stepvalue: 3 stepvalue: 7\nmax_iter: 12\nsnapshot: 6\nsnapshot_format: {fmt}')
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    full = get_solver(write_case(a_dir, text))
    feed(full)
    w_init = {k: [b.data.copy() for b in v] for k, v in full.net.params.items()}
    full_losses: list[float] = []
    full.add_callback(on_gradients_ready=lambda: full_losses.append(full.last_loss))
    full.solve()

    path_b = write_case(b_dir, text)
    first = get_solver(path_b)
    first.net.copy_from(w_init)
    feed(first)
    first.step(6)  # writes snap_iter_6.*
    ext = ".solverstate.h5" if fmt == "HDF5" else ".solverstate"
    state = b_dir / f"snap_iter_6{ext}"
    assert state.exists()
    st = read_solverstate(state)
    assert st.iter == 6 and st.current_step == 1 and len(st.history) == 4  # Adam: m and v per blob

    resumed = get_solver(path_b)
    feed(resumed)
    losses: list[float] = []
    resumed.add_callback(on_gradients_ready=lambda: losses.append(resumed.last_loss))
    resumed.solve(resume_file=state)
    assert resumed.iter == 12 and resumed.current_step == 2
    np.testing.assert_allclose(losses, full_losses[6:], rtol=1e-6, atol=1e-7)
    for name, blobs in full.net.params.items():
        for i, blob in enumerate(blobs):
            np.testing.assert_allclose(resumed.net.params[name][i].data, blob.data, rtol=1e-6, atol=1e-7)


def test_iter_size_and_clip(tmp_path: Path) -> None:
    """iter_size 3 on identical batches = one pass with the same grads; clipping to a tiny norm
    makes the first SGD step exactly lr * clip in L2 norm."""
    path = write_case(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed" clip_gradients: 0.01\n'
                                'iter_size: 3\nmax_iter: 1\nsnapshot_after_train: false')
    s = get_solver(path)
    feed(s)
    w0 = [b.data.copy() for b in s.net.params["ip"]]
    grads: list[np.ndarray] = []
    s.add_callback(on_gradients_ready=lambda: grads.extend(b.diff.copy() for b in s.net.params["ip"]))
    s.solve()
    assert len(s.last_forward_losses) == 3 and len(set(s.last_forward_losses)) == 1
    # lr_mult 2 on the bias: step = lr * lr_mult * clipped grad / iter_size
    norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
    scale = 0.01 / norm
    for i, (g, mult) in enumerate(zip(grads, (1.0, 2.0))):
        expected = w0[i] - 0.1 * mult * g * scale / 3
        np.testing.assert_allclose(s.net.params["ip"][i].data, expected, rtol=1e-5, atol=1e-7)


def test_nan_loss_stops_with_snapshot(tmp_path: Path) -> None:
    path = write_case(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" max_iter: 5')
    s = get_solver(path)
    x = np.ones((4, 3), np.float32)
    feed(s, x=x)
    s.step(2)
    s.net.blobs["x"].data[0, 0] = np.nan
    with pytest.raises(CaffeportError, match="iteration 2"):
        s.solve()
    assert (tmp_path / "snap_iter_2.caffemodel").exists()
    assert (tmp_path / "snap_iter_2.solverstate").exists()


def test_missing_net_file(tmp_path: Path) -> None:
    (tmp_path / "solver.prototxt").write_text('net: "nope.prototxt"\nbase_lr: 0.1 lr_policy: "fixed"\n')
    with pytest.raises(CaffeportError, match="nope.prototxt"):
        get_solver(tmp_path / "solver.prototxt")


def test_bad_solver_settings(tmp_path: Path) -> None:
    with pytest.raises(CaffeportError, match="AdaGrad"):
        get_solver(write_case(tmp_path, 'type: "AdaGrad" momentum: 0.9 base_lr: 0.1 lr_policy: "fixed"'))
    with pytest.raises(CaffeportError, match="unknown solver type"):
        get_solver(write_case(tmp_path, 'type: "Adamw" base_lr: 0.1 lr_policy: "fixed"'))
    with pytest.raises(CaffeportError, match="test_iter"):
        get_solver(write_case(tmp_path, 'test_net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed"'))


def test_legacy_solver_type_message(tmp_path: Path) -> None:
    write_case(tmp_path, "")
    msg = caffe_pb2.SolverParameter(net=str(tmp_path / "net.prototxt"), base_lr=0.1, lr_policy="fixed",
                                    solver_type=caffe_pb2.SolverParameter.NESTEROV)
    s = get_solver(msg)
    assert type(s).__name__ == "NesterovSolver"


GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")


def test_log_lines_parse_like_caffe(tmp_path: Path) -> None:
    path = write_case(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" max_iter: 4 display: 2\n'
                                'test_iter: 2 test_interval: 2\nsnapshot: 4')
    log = Glog()
    log.lines = []
    s = get_solver(path, log=log)
    feed(s)
    s.solve()
    lines = log.lines
    assert all(GLOG.match(line) for line in lines)
    msgs = [GLOG.sub("", line) for line in lines]
    assert any(m.startswith("Solving tiny") for m in msgs)
    assert "Iteration 0, Testing net (#0)" in msgs and "Iteration 4, Testing net (#0)" in msgs
    assert any(re.fullmatch(r"Iteration 2 \([\d.e+-]+ iter/s, [\d.e+-]+s/2 iters\), loss = [\d.e+-]+", m) for m in msgs)
    assert "Iteration 2, lr = 0.1" in msgs
    assert f"Snapshotting to binary proto file {tmp_path / 'snap'}_iter_4.caffemodel" in msgs
    assert f"Snapshotting solver state to binary proto file {tmp_path / 'snap'}_iter_4.solverstate" in msgs
    assert msgs[-1] == "Optimization Done."
    # parse_log.py's regexes and parse_log.sh's awk fields
    train = [m for m in msgs if re.search(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)", m)]
    assert train and all(" (* 1 = " in m and m.endswith(" loss)") for m in train)
    test_lines = [line for line in lines if "Test net output #0" in line]
    assert len(test_lines) == 3  # iterations 0, 2, 4
    for line in test_lines:
        float(line.split()[10])  # awk '{print $11}'
    lr_lines = [line for line in lines if ", lr = " in line]
    assert [float(line.split()[8]) for line in lr_lines] == [0.1, 0.1]  # awk '{print $9}'
    final = [m for m in msgs if re.fullmatch(r"Iteration 4, loss = [\d.e+-]+", m)]
    assert len(final) == 1


def test_frozen_blob_with_decay_keeps_adam_history_like_caffe(tmp_path: Path) -> None:
    """A frozen (lr_mult 0) blob with decay_mult 1 is not moved, but Caffe's Adam still feeds
    weight_decay * w into its moments: m_k = (1 - b1^k) wd w, v_k = (1 - b2^k) (wd w)^2."""
    net = (Path(__file__).parent / "_tiny.py").read_text()  # reuse the net text with the bias frozen
    net_text = re.search(r'NET = """(.*?)"""', net, re.S).group(1).replace(
        "param { lr_mult: 2 decay_mult: 0 }", "param { lr_mult: 0 decay_mult: 1 }")
    path = write_case(tmp_path, 'type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999 weight_decay: 0.1\n'
                                'lr_policy: "fixed" max_iter: 5', net_text=net_text)
    s = get_solver(path)
    feed(s)
    b0 = s.net.params["ip"][1].data.copy()
    s.solve()
    np.testing.assert_array_equal(s.net.params["ip"][1].data, b0)
    st = read_solverstate(tmp_path / "snap_iter_5.solverstate")
    g = 0.1 * b0.astype(np.float64)
    np.testing.assert_allclose(st.history[1], (1 - 0.9**5) * g, rtol=1e-5)
    np.testing.assert_allclose(st.history[3], (1 - 0.999**5) * g * g, rtol=1e-4)


def test_test_states_select_layers(tmp_path: Path) -> None:
    """Two test nets from the train net file, one per test_state; a stage-only layer is in one."""
    from tests.solver._tiny import NET

    net_text = NET + ('layer { name: "extra" type: "Power" bottom: "p" top: "p2" '
                      'include { phase: TEST stage: "val" } }\n')
    path = write_case(tmp_path, 'base_lr: 0.01 lr_policy: "fixed" max_iter: 1\ntest_iter: 1 test_iter: 1\n'
                                'test_interval: 1\ntest_state { stage: "val" }\ntest_state { }', net_text=net_text)
    s = get_solver(path)
    assert len(s.test_nets) == 2
    assert "extra" in s.test_nets[0].layer_dict and "extra" not in s.test_nets[1].layer_dict
    assert "p2" in s.test_nets[0].outputs
    # test nets share the train net's storage: an update is seen without copying
    s.net.params["ip"][0].data[...] = 3.0
    assert (s.test_nets[1].params["ip"][0].data == 3.0).all()


def test_snapshot_prefix_folder_must_exist(tmp_path: Path) -> None:
    path = write_case(tmp_path, 'base_lr: 0.01 lr_policy: "fixed" max_iter: 1 snapshot: 1')
    text = path.read_text().replace(str(tmp_path / "snap"), str(tmp_path / "no" / "such" / "snap"))
    path.write_text(text)
    with pytest.raises(CaffeportError, match="snapshot prefix"):
        get_solver(path)


def test_display_smooths_loss_over_average_loss(tmp_path: Path) -> None:
    path = write_case(tmp_path, 'base_lr: 0.05 momentum: 0.9 lr_policy: "fixed" max_iter: 8 display: 1 '
                                'average_loss: 3\nsnapshot_after_train: false')
    log = Glog()
    log.lines = []
    s = get_solver(path, log=log)
    feed(s)
    losses: list[float] = []
    s.add_callback(on_gradients_ready=lambda: losses.append(s.last_loss))
    s.solve()
    shown = [float(m.group(1)) for line in log.lines
             if (m := re.search(r"Iteration \d+ \(.*\), loss = (\S+)", line))]
    ref = [np.mean(losses[max(0, k - 2):k + 1]) for k in range(8)]
    np.testing.assert_allclose(shown, ref, rtol=2e-5)
