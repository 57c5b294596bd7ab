"""``caffeport train/test/time`` on a copy of a golden solver case (HDF5 data)."""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from caffeport.cli import main
from caffeport.io import read_solverstate
from caffeport.solver import SignalActions, get_solver
from tests.golden import case_dir, npz
from tests.solver._tiny import feed, write_case

CASE = "solver_sgd_momentum_step"


@pytest.fixture()
def case(tmp_path: Path) -> Path:
    d = tmp_path / "case"
    shutil.copytree(case_dir(CASE), d)
    for p in d.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    old = os.getcwd()
    os.chdir(d)
    yield d
    os.chdir(old)


def _run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output  # stdout and stderr interleaved


def test_train_positional_log_and_snapshot(case: Path) -> None:
    code, out = _run("train", "solver.prototxt", "--iterations", "3", "--log", "train.log")
    assert code == 0, out
    assert (case / "snapshot_iter_3.caffemodel").exists() and (case / "snapshot_iter_3.solverstate").exists()
    log = (case / "train.log").read_text().splitlines()
    assert any(line.endswith("] Optimization Done.") for line in log)
    assert read_solverstate(case / "snapshot_iter_3.solverstate").iter == 3


def test_train_resume_flag(case: Path) -> None:
    code, out = _run("train", "--solver", "solver.prototxt", "--iterations", "2")
    assert code == 0, out
    code, out = _run("train", "-solver=solver.prototxt", "-snapshot=snapshot_iter_2.solverstate", "-iterations=4")
    assert code == 0, out
    st = read_solverstate(case / "snapshot_iter_4.solverstate")
    assert st.iter == 4 and st.current_step == 0  # step policy, stepsize 4: current_step of iteration 3


def test_train_errors(case: Path) -> None:
    code, out = _run("train", "solver.prototxt", "--weights", "init.caffemodel", "--snapshot", "x.solverstate")
    assert code == 1 and "not both" in out
    code, out = _run("train", "missing.prototxt")
    assert code == 1 and "missing.prototxt" in out
    code, out = _run("train", "solver.prototxt", "--net", "nonexistent.prototxt")
    assert code == 1 and "nonexistent.prototxt" in out
    code, out = _run("train", "solver.prototxt", "--sigint_effect", "explode")
    assert code == 1 and "sigint_effect" in out


def test_test_command_first_batch_matches_caffe(case: Path) -> None:
    code, out = _run("test", "--model", "train.prototxt", "--weights", "init.caffemodel", "--iterations", "3")
    assert code == 0, out
    batches = [float(m) for m in re.findall(r"Batch \d+, loss = (\S+)", out)]
    assert len(batches) == 3
    # batch 0 with the initial weights is what Caffe's solver saw at iteration 0
    np.testing.assert_allclose(batches[0], npz(CASE, "trace.npz")["loss"][0], rtol=1e-5)
    mean = float(re.search(r"\] Loss: (\S+)", out).group(1))
    np.testing.assert_allclose(mean, np.mean(batches), rtol=1e-5)
    assert re.search(r"\] loss = \S+ \(\* 1 = \S+ loss\)", out)


def test_time_command(case: Path) -> None:
    code, out = _run("time", "--model", "train.prototxt", "--iterations", "2")
    assert code == 0, out
    for layer in ("data", "conv1", "ip2", "loss"):
        assert re.search(rf"\] +{layer}\tforward: [\d.e+-]+ ms\.", out)
        assert re.search(rf"\] +{layer}\tbackward: [\d.e+-]+ ms\.", out)
    assert "Average Forward-Backward:" in out and "*** Benchmark ends ***" in out


def test_signal_effects(tmp_path: Path) -> None:
    """SIGHUP -> snapshot after the current iteration; SIGINT -> stop (then the final snapshot)."""
    path = write_case(tmp_path, 'base_lr: 0.01 lr_policy: "fixed" max_iter: 10')
    s = get_solver(path)
    feed(s)
    actions = SignalActions("stop", "snapshot")
    s.action = actions

    def on_start() -> None:
        if s.iter == 2:
            os.kill(os.getpid(), signal.SIGHUP)
        if s.iter == 5:
            os.kill(os.getpid(), signal.SIGINT)

    s.add_callback(on_start)
    with actions:
        s.solve()
    assert s.iter == 6 and s.requested_early_exit
    assert (tmp_path / "snap_iter_3.solverstate").exists()
    assert (tmp_path / "snap_iter_6.solverstate").exists()
    assert not (tmp_path / "snap_iter_10.solverstate").exists()
