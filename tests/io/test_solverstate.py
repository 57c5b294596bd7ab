"""Solver snapshots: corpus and golden solverstates load; binary and HDF5 round trips."""

from __future__ import annotations

import numpy as np
import pytest

from caffeport.errors import CaffeportError
from caffeport.io import SolverStateData, load_caffemodel, read_solverstate, write_solverstate
from caffeport.proto import caffe_pb2
from tests.golden import CORPUS, GOLDEN

STATES = sorted(CORPUS.rglob("*.solverstate")) + sorted(CORPUS.rglob("*.solverstate.h5"))
GOLDEN_STATES = sorted(GOLDEN.glob("*/final.solverstate"))


@pytest.mark.parametrize("path", STATES, ids=[str(p.relative_to(CORPUS)) for p in STATES])
def test_corpus_solverstates(path):
    st = read_solverstate(path)
    assert st.iter > 0 and st.learned_net and st.history
    model = load_caffemodel(path.with_name(path.name.replace("solverstate", "caffemodel")))
    # one history blob per parameter blob, same shapes, in net order (SGD)
    shapes = [a.shape for blobs in model.values() for a in blobs]
    assert sorted(h.shape for h in st.history) == sorted(shapes)
    if path.suffix == ".solverstate":
        ref = caffe_pb2.SolverState.FromString(path.read_bytes())
        assert (ref.iter, ref.current_step, ref.learned_net) == (st.iter, st.current_step, st.learned_net)
        for h, r in zip(st.history, ref.history):
            np.testing.assert_array_equal(h.ravel(), np.asarray(r.data, np.float32))


@pytest.mark.parametrize("path", GOLDEN_STATES, ids=[p.parent.name for p in GOLDEN_STATES])
def test_golden_solverstates(path):
    st = read_solverstate(path)
    assert st.learned_net.endswith("final.caffemodel")
    ref = caffe_pb2.SolverState.FromString(path.read_bytes())
    assert st.iter == ref.iter and st.current_step == ref.current_step and len(st.history) == len(ref.history)


@pytest.mark.parametrize("name", ["s.solverstate", "s.solverstate.h5"])
def test_roundtrip(tmp_path, name):
    rng = np.random.default_rng(0)
    st = SolverStateData(
        1234, 2, "x_iter_1234.caffemodel", [rng.random((3, 2, 2), dtype=np.float32), np.zeros(5, np.float32)]
    )
    p = tmp_path / name
    write_solverstate(st, p)
    back = read_solverstate(p)
    assert (back.iter, back.current_step, back.learned_net) == (1234, 2, "x_iter_1234.caffemodel")
    for a, b in zip(st.history, back.history):
        np.testing.assert_array_equal(a, b)
    if name.endswith(".solverstate"):
        ref = caffe_pb2.SolverState.FromString(p.read_bytes())
        assert ref.iter == 1234 and list(ref.history[0].shape.dim) == [3, 2, 2]


def test_write_from_message(tmp_path):
    m = caffe_pb2.SolverState(iter=5, learned_net="a.caffemodel", current_step=1)
    h = m.history.add()
    h.shape.dim.append(2)
    h.data.extend([1.0, 2.0])
    write_solverstate(m, tmp_path / "m.solverstate")
    assert caffe_pb2.SolverState.FromString((tmp_path / "m.solverstate").read_bytes()) == m


def test_truncated_solverstate(tmp_path):
    src = STATES[0].read_bytes()
    p = tmp_path / "t.solverstate"
    p.write_bytes(src[: len(src) // 2])
    with pytest.raises(CaffeportError, match="t.solverstate"):
        read_solverstate(p)
