"""kill -9 during training: ``caffeport train`` (snapshot every iteration) is killed at random moments;
every snapshot on disk must then be complete (it parses, its iteration matches its name) or absent, and
resuming from the newest with ``--snapshot`` must log the losses of an uninterrupted run.

The net sees its whole HDF5 set (24 rows) each iteration, so the losses do not depend on where the data
cursor was when the process died (Caffe does not snapshot data positions either)."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from caffeport.io import load_caffemodel, read_solverstate
from caffeport.solver import get_solver
from tests.golden import case_dir

ITERS = 16
KILLS = 2
LOSS = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = (\S+)")


def _case(d: Path) -> Path:
    shutil.copytree(case_dir("solver_sgd_momentum_step"), d)
    for p in d.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    net = (d / "train.prototxt").read_text().replace("batch_size: 4", "batch_size: 24")
    (d / "train.prototxt").write_text(net)
    s = (d / "solver.prototxt").read_text()
    s = re.sub(r"max_iter: \d+", f"max_iter: {ITERS}", s)
    s = re.sub(r"display: \d+", "display: 1", s)
    s = re.sub(r"snapshot: \d+", "snapshot: 1", s)
    (d / "solver.prototxt").write_text(s)
    return d


def _cmd(d: Path, log: str, snapshot: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "caffeport", "train", "solver.prototxt", "--log", log]
    return cmd + (["--snapshot", snapshot.name] if snapshot else [])


def _losses(log: Path) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in LOSS.finditer(log.read_text())} if log.exists() else {}


def _snapshots(d: Path) -> dict[int, Path]:
    """Visible solverstates by iteration, after checking every visible snapshot file is complete."""
    states = {}
    for p in d.glob("snapshot_iter_*"):
        m = re.fullmatch(r"snapshot_iter_(\d+)\.(caffemodel|solverstate)", p.name)
        assert m, f"unexpected file {p.name}"
        it = int(m.group(1))
        if m.group(2) == "caffemodel":
            assert set(load_caffemodel(p)) == {"conv1", "ip1", "ip2"}, p
        else:
            st = read_solverstate(p)  # parses completely
            assert st.iter == it and len(st.history) == 6, p
            assert (d / Path(st.learned_net).name).exists(), f"{p} names a missing {st.learned_net}"
            states[it] = p
    return states


def test_kill_during_snapshots_then_resume(tmp_path: Path) -> None:
    rng = random.Random(11)
    # the uninterrupted run, in this process (one process start fewer): the loss of iteration i is the
    # loss blob after step i -> i+1, which is what `caffeport train` logs as "Iteration i, loss = ..."
    ref_dir = _case(tmp_path / "ref")
    old = os.getcwd()
    os.chdir(ref_dir)
    try:
        solver = get_solver(ref_dir / "solver.prototxt")
        ref = {}
        for it in range(ITERS):
            solver.step(1)
            ref[it] = float(solver.net.blobs["loss"].data)
        solver.snapshot()
    finally:
        os.chdir(old)

    d = _case(tmp_path / "killed")
    newest: Path | None = None
    seen: dict[int, float] = {}
    kills = 0
    for seg in range(KILLS + 1):
        log = f"seg{seg}.log"
        proc = subprocess.Popen(_cmd(d, log, newest), cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if seg < KILLS:
            start = int(newest.name.split("_")[-1].split(".")[0]) if newest else 0
            target = min(ITERS - 2, start + rng.randint(2, 6))
            want = d / f"snapshot_iter_{target}.caffemodel"
            deadline = time.time() + 60
            while not want.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.001)
            time.sleep(rng.random() * 0.01)  # a random moment near the snapshot write
            proc.kill()  # SIGKILL
            kills += proc.wait() == -9
        else:
            assert proc.wait(timeout=120) == 0
        states = _snapshots(d)
        for it, loss in _losses(d / log).items():
            if it not in ref:  # the final "Iteration 16, loss" line after the last update (log: 6 digits)
                continue
            seen[it] = loss
            np.testing.assert_allclose(loss, ref[it], rtol=1e-5, err_msg=f"segment {seg} iteration {it}")
        if states:
            newest = states[max(states)]
    assert kills == KILLS
    assert set(range(ITERS)) <= set(seen), sorted(seen)
    final = read_solverstate(d / f"snapshot_iter_{ITERS}.solverstate")
    ref_final = read_solverstate(ref_dir / f"snapshot_iter_{ITERS}.solverstate")
    for a, b in zip(final.history, ref_final.history):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
