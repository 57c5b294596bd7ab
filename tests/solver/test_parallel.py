"""Data-parallel training (``caffeport train --gpu ...``, Caffe's multi-GPU) on CPU processes (gloo).

The reference is Caffe's own equivalence: with a loss normalised by the batch, W solvers with batch B
whose data layers deal the records out one by one (Caffe 1.0 ``Skip()``) and whose averaged
gradients drive one shared update train exactly like one solver with batch W·B on the same records.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from caffeport.cli import main
from caffeport.data.sources import DatumBatches, HDF5Batches, RecordStride
from caffeport.data.transformer import DataTransformer
from caffeport.errors import CaffeportError
from caffeport.io import load_caffemodel
from caffeport.proto import caffe_pb2
from caffeport.solver import get_solver
from caffeport.solver.parallel import ENV_DEVICE, plan_devices

N_RECORDS = 12  # = 3 iterations of the 4-record global batch: a resume at iteration 3 re-reads record 0

NET = """
name: "dp"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label" include {{ phase: TRAIN }}
  hdf5_data_param {{ source: "{root}/train.txt" batch_size: {batch} }} }}
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label" include {{ phase: TEST }}
  hdf5_data_param {{ source: "{root}/train.txt" batch_size: 6 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 5 weight_filler {{ type: "gaussian" std: 0.5 }}
                         bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc" include {{ phase: TEST }} }}
"""

SOLVER = """net: "{net}"
base_lr: 0.2
momentum: 0.9
weight_decay: 0.001
lr_policy: "step"
gamma: 0.5
stepsize: 4
max_iter: 6
display: 1
test_iter: 1
test_interval: 3
snapshot: 3
snapshot_prefix: "{prefix}"
random_seed: 17
"""


def _case(d: Path, batch: int) -> Path:
    """Solver + net reading the shared HDF5 records with ``batch`` per solver; snapshots in ``d/snaps``."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "snaps").mkdir(exist_ok=True)
    root = d.parent
    (d / "net.prototxt").write_text(NET.format(root=root, batch=batch))
    (d / "solver.prototxt").write_text(SOLVER.format(net=d / "net.prototxt", prefix=d / "snaps" / "dp"))
    return d / "solver.prototxt"


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import h5py

    root = tmp_path_factory.mktemp("dp")
    rng = np.random.default_rng(3)
    with h5py.File(root / "train.h5", "w") as f:
        f["data"] = rng.normal(size=(N_RECORDS, 4)).astype(np.float32)
        f["label"] = rng.integers(0, 3, size=N_RECORDS).astype(np.float32)
    (root / "train.txt").write_text(str(root / "train.h5") + "\n")
    return root


def _weights(path: Path) -> dict[str, list[np.ndarray]]:
    return {k: [np.asarray(a, np.float64) for a in v] for k, v in load_caffemodel(path).items() if v}


def _assert_same(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert len(a[k]) == len(b[k])
        for x, y in zip(a[k], b[k]):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=k)


def test_two_cpu_processes_equal_one_with_double_batch(cases: Path) -> None:
    two = _case(cases / "two", batch=2)
    log = cases / "two" / "train.log"
    r = CliRunner().invoke(main, ["train", str(two), "--gpu", "cpu:2", "--log", str(log)])
    assert r.exit_code == 0, r.output
    snaps = sorted(p.name for p in (cases / "two" / "snaps").iterdir())
    assert snaps == ["dp_iter_3.caffemodel", "dp_iter_3.solverstate", "dp_iter_6.caffemodel", "dp_iter_6.solverstate"]
    text = log.read_text()
    # rank 0 alone logs (and tests): one line per event, not two
    assert text.count("Snapshotting to binary proto file") == 2
    assert text.count("Testing net (#0)") == 3  # iterations 0, 3 and 6
    assert text.count("] Iteration 5, lr = ") == 1
    assert "Optimization Done." in text

    one = _case(cases / "one", batch=4)
    get_solver(one).solve()
    _assert_same(_weights(cases / "two" / "snaps" / "dp_iter_3.caffemodel"),
                 _weights(cases / "one" / "snaps" / "dp_iter_3.caffemodel"))
    _assert_same(_weights(cases / "two" / "snaps" / "dp_iter_6.caffemodel"),
                 _weights(cases / "one" / "snaps" / "dp_iter_6.caffemodel"))
    init = get_solver(one)  # the weights really moved
    assert not np.allclose(init.net.params["ip1"][0].data, _weights(cases / "one" / "snaps" / "dp_iter_6.caffemodel")
                           ["ip1"][0])

    # the data-parallel snapshot resumes in a single process (batch 2·B) and ends where both runs ended
    resumed = _case(cases / "resumed", batch=4)
    s = get_solver(resumed)
    s.solve(resume_file=cases / "two" / "snaps" / "dp_iter_3.solverstate")
    assert s.iter == 6
    _assert_same(_weights(cases / "resumed" / "snaps" / "dp_iter_6.caffemodel"),
                 _weights(cases / "two" / "snaps" / "dp_iter_6.caffemodel"))


def test_worker_error_reaches_the_cli(cases: Path, tmp_path: Path) -> None:
    net = tmp_path / "net.prototxt"
    net.write_text(NET.format(root=tmp_path, batch=2))  # no train.txt there
    bad = tmp_path / "solver.prototxt"
    bad.write_text(f'net: "{net}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 1\n')
    r = CliRunner().invoke(main, ["train", str(bad), "--gpu", "cpu:2"])
    assert r.exit_code == 1
    assert "layer 'data' (HDF5Data)" in r.output and "not found" in r.output
    assert "Traceback" not in r.output


def test_only_rank_0_writes_snapshots(cases: Path) -> None:
    s = get_solver(_case(cases / "rank1", batch=2))
    s.rank = 1  # what a non-root data-parallel solver sees
    s.snapshot()
    assert list((cases / "rank1" / "snaps").iterdir()) == []


def test_plan_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DEVICE, raising=False)
    assert plan_devices(None) is None and plan_devices("cpu:1") is None
    assert [d.type for d in plan_devices("cpu:3") or []] == ["cpu"] * 3
    assert plan_devices("0") is None
    monkeypatch.setenv(ENV_DEVICE, "cpu")
    assert [d.type for d in plan_devices("0,1") or []] == ["cpu", "cpu"]
    for bad in ("cpu:x", "0,0", "a,b", "all"):
        with pytest.raises(CaffeportError):
            plan_devices(bad)


# --- record striding in the readers (Caffe 1.0 Skip(): rank r of W reads records r, r+W, ...) ------------
def test_record_stride() -> None:
    got = []
    for rank in range(3):
        st = RecordStride(rank, 3)
        pos, mine = 0, []
        for _ in range(4):
            pos += st.next_skip()
            mine.append(pos)
            pos += 1
        got.append(mine)
    assert got == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    with pytest.raises(CaffeportError):
        RecordStride(2, 2)


def test_hdf5_batches_stride(cases: Path) -> None:
    lst = cases / "train.txt"
    full = HDF5Batches(lst, ["data", "label"], 4, "<t>")
    r0 = HDF5Batches(lst, ["data", "label"], 2, "<t>", rank=0, world=2)
    r1 = HDF5Batches(lst, ["data", "label"], 2, "<t>", rank=1, world=2)
    for _ in range(5):  # across the wrap-around (12 records)
        want = full.next_batch()[0]
        a, b = r0.next_batch()[0], r1.next_batch()[0]
        np.testing.assert_array_equal(want[0::2], a)
        np.testing.assert_array_equal(want[1::2], b)


def test_datum_batches_stride(tmp_path: Path) -> None:
    from caffeport.io.lmdb_store import LMDBWriter, array_to_datum

    db = tmp_path / "db"
    with LMDBWriter(db) as w:
        for i in range(7):
            w.put(f"{i:08d}", array_to_datum(np.full((1, 2, 2), i, np.uint8), label=i).SerializeToString())

    def reader(batch: int, rank: int = 0, world: int = 1) -> DatumBatches:
        tf = DataTransformer(caffe_pb2.TransformationParameter(), caffe_pb2.TRAIN, None, "<t>",
                             np.random.default_rng(0))
        return DatumBatches(db, caffe_pb2.DataParameter.LMDB, batch, tf, True, "<t>", rank=rank, world=world)

    full, r0, r1 = reader(4), reader(2, 0, 2), reader(2, 1, 2)
    for _ in range(4):  # wraps around the 7 records
        want = full.next_batch()[1]
        assert list(r0.next_batch()[1]) == list(want[0::2])
        assert list(r1.next_batch()[1]) == list(want[1::2])
    for b in (full, r0, r1):
        b.close()


@pytest.mark.skipif(os.environ.get("CAFFEPORT_TEST_CUDA_DP") != "1", reason="needs 2 CUDA devices")
def test_two_gpus(cases: Path) -> None:  # pragma: no cover - run on a multi-GPU machine
    two = _case(cases / "gpu", batch=2)
    r = CliRunner().invoke(main, ["train", str(two), "--gpu", "0,1"])
    assert r.exit_code == 0, r.output
