"""A failing write (disk full mid-file, failing rename) leaves the old file intact, no temp file
behind, and a CaffeportError that names the target."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import caffeport.io.atomic as atomic
from caffeport.errors import CaffeportError
from caffeport.io import load_caffemodel, save_caffemodel
from caffeport.proto import caffe_pb2
from caffeport.solver import get_solver


def _disk_full_chunks():
    yield b"x" * 100
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_mid_write_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "w.caffemodel"
    save_caffemodel({"ip": [np.ones((2, 3), np.float32)]}, target)
    before = target.read_bytes()
    with pytest.raises(CaffeportError, match=r"cannot write .*w\.caffemodel: No space left"):
        atomic.atomic_write(target, _disk_full_chunks())
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.caffemodel"]


SOLVER_NET = """
layer { name: "data" type: "Input" top: "data" top: "label" input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_snapshot_on_full_disk_leaves_no_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    param = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="fixed", max_iter=2, display=0,
                                      snapshot_prefix=str(tmp_path / "snap"), snapshot_after_train=False)
    text_format.Parse(SOLVER_NET, param.net_param)
    solver = get_solver(param)
    solver.net.blobs["data"].data[...] = np.arange(12, dtype=np.float32).reshape(4, 3)
    solver.net.blobs["label"].data[...] = [0, 1, 0, 1]
    solver.step(1)
    solver.snapshot()  # a good snapshot first
    good = load_caffemodel(tmp_path / "snap_iter_1.caffemodel")

    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    solver.step(1)
    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(CaffeportError, match="No space left"):
        solver.snapshot()
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["snap_iter_1.caffemodel", "snap_iter_1.solverstate"], names
    np.testing.assert_array_equal(load_caffemodel(tmp_path / "snap_iter_1.caffemodel")["ip"][0], good["ip"][0])
