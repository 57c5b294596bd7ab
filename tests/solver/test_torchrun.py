"""``caffeport train`` under torchrun: 2 "nodes" x 1 process on localhost over gloo (env:// rendezvous).

The reference is the same equivalence as tests/solver/test_parallel.py: two ranks with batch B whose
records are dealt out by global rank and whose gradients are averaged train exactly like one solver
with batch 2B (which ``--gpu cpu:2`` is tested against there).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from caffeport.io import read_solverstate
from caffeport.solver import get_solver
from tests.solver.test_parallel import NET, _assert_same, _case, _weights, cases  # noqa: F401

TORCHRUN = Path(sys.executable).with_name("torchrun")
REPO = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Node:
    """One torchrun agent ("node") running ``caffeport train``; its output goes to a file (no pipe
    to fill up while the other node is waited for)."""

    def __init__(self, rank: int, port: int, solver: Path, **env: str):
        # (no --log: torchrun's own parser would claim it as an abbreviation of --log-dir)
        cmd = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "caffeport", "train", str(solver)]
        self.out_path = solver.parent / f"node{rank}.out"
        full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env)
        with open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                         start_new_session=True)

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


def test_two_torchrun_nodes_equal_one_process_with_double_batch(cases: Path) -> None:  # noqa: F811
    two = _case(cases / "torchrun", batch=2)
    port = _port()
    nodes = [_Node(r, port, two) for r in (0, 1)]
    try:
        results = [n.wait(timeout=90) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [rc for rc, _ in results] == [0, 0], [out[-2000:] for _, out in results]
    text = results[0][1]  # rank 0's log lines (stderr)
    assert "Snapshotting" not in results[1][1]  # rank 1 does not log
    assert "torchrun rank 0" in text and "Starting 2 solvers (gloo)" in text
    assert text.count("Snapshotting to binary proto file") == 2  # rank 0 alone snapshots
    assert text.count("Testing net (#0)") == 3
    one = _case(cases / "one_tr", batch=4)
    get_solver(one).solve()
    for it in (3, 6):
        _assert_same(_weights(cases / "torchrun" / "snaps" / f"dp_iter_{it}.caffemodel"),
                     _weights(cases / "one_tr" / "snaps" / f"dp_iter_{it}.caffemodel"))


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
