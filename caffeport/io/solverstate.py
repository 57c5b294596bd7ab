"""Solver snapshots (``.solverstate`` binary SolverState, or ``.solverstate.h5``).

``SolverState = {iter, learned_net, history[], current_step}``. ``history`` holds one blob per
learnable parameter (SGD/Nesterov/AdaGrad/RMSProp: one set; AdaDelta/Adam: two sets, the second
appended after the first, as Caffe's solvers lay them out). ``learned_net`` is the caffemodel
path Caffe wrote next to it (as Caffe wrote it: usually relative to Caffe's working directory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2

__all__ = ["SolverStateData", "read_solverstate", "write_solverstate"]

PathLike = str | os.PathLike


@dataclass
class SolverStateData:
    """A decoded solver snapshot."""

    iter: int = 0
    current_step: int = 0
    learned_net: str = ""
    history: list[np.ndarray] = field(default_factory=list)


def read_solverstate(path: PathLike) -> SolverStateData:
    """Read a binary or HDF5 solverstate (picked from the file content)."""
    from caffeport.io import blobs as B

    if B.is_hdf5(path):
        from caffeport.io.hdf5 import read_solverstate_h5

        it, step, ln, hist = read_solverstate_h5(path)
        return SolverStateData(it, step, ln, hist)
    data = B._read_file(path, "solverstate")
    buf = memoryview(data)
    st = SolverStateData()
    try:
        for fn, wt, val, _ in B._fields(buf, 0, len(buf)):
            if fn == 1 and wt == 0:
                st.iter = B._signed32(val)
            elif fn == 2 and wt == 2:
                st.learned_net = bytes(buf[val[0] : val[1]]).decode("utf-8", errors="replace")
            elif fn == 3 and wt == 2:
                st.history.append(B._decode_blob(buf, val[0], val[1]))
            elif fn == 4 and wt == 0:
                st.current_step = B._signed32(val)
            else:
                raise B._Corrupt(f"unexpected field {fn} (wire type {wt})")
    except (B._Corrupt, ValueError, OverflowError, IndexError) as e:
        raise CaffeportError(f"{path}: not a valid solverstate (truncated or corrupt?): {e}") from None
    return st


def write_solverstate(state: SolverStateData | caffe_pb2.SolverState, path: PathLike) -> None:
    """Write a solverstate: HDF5 layout when ``path`` ends in ``.h5``, binary SolverState otherwise.
    History blobs are written with an N-D ``shape`` (as Caffe's ``Blob::ToProto``). Atomic."""
    if isinstance(state, caffe_pb2.SolverState):
        from caffeport.io.blobs import blobproto_to_array

        state = SolverStateData(
            state.iter, state.current_step, state.learned_net, [blobproto_to_array(b, True) for b in state.history]
        )
    if str(path).lower().endswith((".h5", ".hdf5")):
        from caffeport.io.hdf5 import write_solverstate_h5

        write_solverstate_h5(path, state.iter, state.current_step, state.learned_net, state.history)
        return
    from caffeport.io import blobs as B

    chunks: list[bytes] = [B._enc_varint(1 << 3) + B._enc_varint(int(state.iter))]
    ln = state.learned_net.encode("utf-8")
    chunks.append(B._enc_len(2, len(ln)) + ln)
    for h in state.history:
        chunks.extend(B._blob_field(3, np.asarray(h)))
    chunks.append(B._enc_varint(4 << 3) + B._enc_varint(int(state.current_step)))
    B.atomic_write(Path(path), chunks)
