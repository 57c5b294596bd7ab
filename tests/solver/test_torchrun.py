"""``caffeport train`` under torchrun: 2 "nodes" x 1 process on localhost over gloo (env:// rendezvous).

The reference is the same equivalence as tests/solver/test_parallel.py: two ranks with batch B whose
records are dealt out by global rank and whose gradients are averaged train exactly like one solver
with batch 2B (which ``--gpu cpu:2`` is tested against there). Each node runs in its own working
directory with a relative ``snapshot_prefix`` (as two machines without a shared file system), so the
other node's folder shows that only rank 0 writes snapshots, and a resume whose ``--snapshot`` exists
on node 0 only shows that only rank 0 reads it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caffeport.io import read_solverstate
from caffeport.solver import get_solver
from tests.solver.test_parallel import NET, SOLVER, _assert_same, _case, _weights, cases  # noqa: F401

TORCHRUN = Path(sys.executable).with_name("torchrun")
REPO = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Node:
    """One torchrun agent ("node") running ``caffeport train``; its output goes to a file (no pipe
    to fill up while the other node is waited for)."""

    def __init__(self, rank: int, port: int, solver: Path, *args: str, cwd: Path | None = None, **env: str):
        # (no --log: torchrun's own parser would claim it as an abbreviation of --log-dir)
        cmd = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "caffeport", "train", str(solver),
               *args]
        self.out_path = (cwd or solver.parent) / f"node{rank}.out"
        full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env)
        with open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                         start_new_session=True, cwd=cwd)

    def wait(self, timeout: float) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return rc, self.out_path.read_text()

    def workers(self) -> list[int]:
        """The agent's descendants (torchrun starts its workers in their own process group)."""
        kids: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        out, todo = [], [self.proc.pid]
        while todo:
            for c in kids.get(todo.pop(), []):
                out.append(c)
                todo.append(c)
        return out

    def kill_workers(self) -> None:
        for pid in self.workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        self.kill_workers()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def _job(d: Path, *args: str) -> list[tuple[int, str]]:
    """A 2-node torchrun job of ``d/solver.prototxt``, node r running in ``d/node<r>`` (relative
    ``snapshot_prefix: "snaps/dp"``); returns (exit code, output) per node."""
    port = _port()
    nodes = []
    for r in (0, 1):
        (d / f"node{r}" / "snaps").mkdir(parents=True, exist_ok=True)
    try:
        nodes = [_Node(r, port, d / "solver.prototxt", *args, cwd=d / f"node{r}") for r in (0, 1)]
        return [n.wait(timeout=90) for n in nodes]
    finally:
        for n in nodes:
            n.kill()


def _two_node_case(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "net.prototxt").write_text(NET.format(root=d.parent, batch=2))
    (d / "solver.prototxt").write_text(SOLVER.format(net=d / "net.prototxt", prefix="snaps/dp"))
    return d


def _losses(log: str) -> dict[int, str]:
    """{iteration: smoothed loss as logged} from rank 0's ``Iteration N (...), loss = X`` lines."""
    return {int(m[1]): m[2] for m in re.finditer(r"\] Iteration (\d+) \([^)]*\), loss = (\S+)", log)}


@pytest.fixture(scope="module")
def uninterrupted(cases: Path) -> tuple[Path, list[tuple[int, str]]]:  # noqa: F811
    """6 iterations (snapshots at 3 and 6) of a 2-node job, batch 2 per rank."""
    d = _two_node_case(cases / "torchrun")
    return d, _job(d)


def test_two_torchrun_nodes_equal_one_process_with_double_batch(cases: Path, uninterrupted) -> None:  # noqa: F811
    d, results = uninterrupted
    assert [rc for rc, _ in results] == [0, 0], [out[-2000:] for _, out in results]
    text = results[0][1]  # rank 0's log lines (stderr)
    assert "Snapshotting" not in results[1][1]  # rank 1 does not log
    assert "torchrun rank 0" in text and "Starting 2 solvers (gloo)" in text
    assert text.count("Snapshotting to binary proto file") == 2  # rank 0 alone snapshots
    assert text.count("Testing net (#0)") == 3
    assert sorted(_losses(text)) == [0, 1, 2, 3, 4, 5]
    # only rank 0 writes snapshots: node 1's folder stays empty
    assert sorted(p.name for p in (d / "node0" / "snaps").iterdir()) == [
        "dp_iter_3.caffemodel", "dp_iter_3.solverstate", "dp_iter_6.caffemodel", "dp_iter_6.solverstate"]
    assert list((d / "node1" / "snaps").iterdir()) == []
    one = _case(cases / "one_tr", batch=4)
    get_solver(one).solve()
    for it in (3, 6):
        _assert_same(_weights(d / "node0" / "snaps" / f"dp_iter_{it}.caffemodel"),
                     _weights(cases / "one_tr" / "snaps" / f"dp_iter_{it}.caffemodel"))


def test_torchrun_resume_equals_the_uninterrupted_job(cases: Path, uninterrupted) -> None:  # noqa: F811
    """``--snapshot snaps/dp_iter_3.solverstate`` (a path that exists on node 0 only) resumes the
    whole job: iterations 3-5 log the losses of the uninterrupted job, and the final caffemodel and
    solverstate are the uninterrupted job's, bit for bit; node 1 reads and writes no snapshot."""
    first, ref = uninterrupted
    assert [rc for rc, _ in ref] == [0, 0], [out[-2000:] for _, out in ref]
    d = _two_node_case(cases / "torchrun_resumed")
    (d / "node0" / "snaps").mkdir(parents=True)
    for ext in ("caffemodel", "solverstate"):
        shutil.copy(first / "node0" / "snaps" / f"dp_iter_3.{ext}", d / "node0" / "snaps")
    results = _job(d, "--snapshot", "snaps/dp_iter_3.solverstate")
    assert [rc for rc, _ in results] == [0, 0], [out[-3000:] for _, out in results]
    text = results[0][1]
    assert "Resuming from snaps/dp_iter_3.solverstate" in text
    assert text.count("Snapshotting to binary proto file") == 1  # iteration 6 only
    assert "Snapshotting" not in results[1][1]
    want = _losses(ref[0][1])
    got = _losses(text)
    assert sorted(got) == [3, 4, 5] and got == {k: want[k] for k in (3, 4, 5)}
    assert sorted(p.name for p in (d / "node0" / "snaps").iterdir()) == [
        "dp_iter_3.caffemodel", "dp_iter_3.solverstate", "dp_iter_6.caffemodel", "dp_iter_6.solverstate"]
    assert list((d / "node1" / "snaps").iterdir()) == []
    a = _weights(d / "node0" / "snaps" / "dp_iter_6.caffemodel")
    b = _weights(first / "node0" / "snaps" / "dp_iter_6.caffemodel")
    assert a.keys() == b.keys() and all(np.array_equal(x, y) for k in a for x, y in zip(a[k], b[k]))
    sa = read_solverstate(d / "node0" / "snaps" / "dp_iter_6.solverstate")
    sb = read_solverstate(first / "node0" / "snaps" / "dp_iter_6.solverstate")
    assert sa.iter == sb.iter == 6 and sa.current_step == sb.current_step
    assert len(sa.history) == len(sb.history) == 4
    assert all(np.array_equal(x, y) for x, y in zip(sa.history, sb.history))
    # the weights really moved between iterations 3 and 6
    assert not np.array_equal(_weights(first / "node0" / "snaps" / "dp_iter_3.caffemodel")["ip1"][0], a["ip1"][0])


def test_dead_rank_ends_the_job_with_one_message(cases: Path) -> None:  # noqa: F811
    d = cases / "dies"
    solver = _case(d, batch=2)
    text = solver.read_text().replace("max_iter: 6", "max_iter: 100000000").replace("snapshot: 3", "snapshot: 50")
    solver.write_text(text.replace("test_interval: 3", "test_interval: 100000000").replace("display: 1", "display: 0"))
    port = _port()
    nodes = [_Node(r, port, solver, CAFFEPORT_DIST_TIMEOUT="15") for r in (0, 1)]
    try:
        first = d / "snaps" / "dp_iter_50.solverstate"
        deadline = time.time() + 60
        while not first.exists() and time.time() < deadline and nodes[0].proc.poll() is None:
            time.sleep(0.2)
        assert first.exists(), nodes[0].out_path.read_text()[-3000:]
        nodes[1].kill_workers()  # rank 1 dies
        rc, out = nodes[0].wait(timeout=60)
    finally:
        for n in nodes:
            n.kill()
    assert rc != 0
    lines = [ln for ln in out.splitlines() if ln.startswith("caffeport: error:")]
    assert len(lines) == 1, out[-3000:]  # one message from caffeport (torchrun's agent adds its own report)
    assert "rank 0 of 2: another rank stopped answering" in lines[0] and "--snapshot" in lines[0], lines
    # the newest snapshot pair on disk is complete and readable
    states = sorted(d.joinpath("snaps").glob("dp_iter_*.solverstate"), key=lambda p: int(p.stem.split("_")[-1]))
    last = states[-1]
    assert read_solverstate(last).iter == int(last.stem.split("_")[-1])
    assert _weights(last.with_suffix(".caffemodel"))["ip1"][0].shape == (5, 4)
