"""Solver snapshots exactly as Caffe names and lays them out.

``<snapshot_prefix>_iter_<N>.caffemodel`` (binary NetParameter with every layer's blobs) and
``<snapshot_prefix>_iter_<N>.solverstate`` (``SolverState{iter, learned_net, history[], current_step}``),
or ``.caffemodel.h5`` / ``.solverstate.h5`` for ``snapshot_format: HDF5``. ``learned_net`` is the
caffemodel path as written (relative paths stay relative to the working directory, as in Caffe).
Both files are written to a temporary file and renamed into place, so an interrupted snapshot
never leaves a truncated file behind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2

__all__ = ["snapshot_filename", "write_model", "write_state", "read_state", "resolve_learned_net"]

PathLike = str | os.PathLike


def snapshot_filename(prefix: str, it: int, extension: str) -> str:
    """Caffe's ``SnapshotFilename``: ``prefix + "_iter_" + iter + extension``."""
    return f"{prefix}_iter_{int(it)}{extension}"


def write_model(net, path: str, hdf5: bool, with_diff: bool = False) -> None:
    """Write the train net's weights (Caffe's ``Net::ToProto`` / ``ToHDF5``) atomically."""
    from caffeport.io import save_caffemodel

    if hdf5:
        save_caffemodel(net.state_blobs(), path)
        return
    if not with_diff:
        net.save(path)  # blobs spliced in as packed float32, no protobuf copies
        return
    proto = net.to_proto()
    if with_diff:  # snapshot_diff: Caffe also writes each blob's diff (the last update value)
        layers = {lp.name: lp for lp in proto.layer}
        for lname, layer in net.layer_dict.items():
            lp = layers.get(lname)
            if lp is None:
                continue
            for bp, p in zip(lp.blobs, layer.blobs):
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                bp.diff.extend(g.detach().cpu().numpy().astype(np.float32).ravel().tolist())
    save_caffemodel(proto, path)


def write_state(path: str, it: int, current_step: int, learned_net: str,
                history: Sequence[torch.Tensor]) -> None:
    """Write a ``.solverstate`` (binary) or ``.solverstate.h5`` (HDF5, from the extension)."""
    from caffeport.io import SolverStateData, write_solverstate

    hist = [h.detach().cpu().numpy().astype(np.float32, copy=True) for h in history]
    write_solverstate(SolverStateData(int(it), int(current_step), learned_net, hist), path)


def read_state(path: PathLike):
    """Read a solverstate (binary or HDF5): ``SolverStateData(iter, current_step, learned_net, history)``."""
    from caffeport.io import read_solverstate

    p = Path(path)
    if not p.exists():
        raise CaffeportError(f"solver state file not found: {p}")
    return read_solverstate(p)


def resolve_learned_net(learned_net: str, state_path: PathLike) -> Path:
    """Where the caffemodel named in a solverstate is: as written (Caffe reads it relative to the
    working directory), else next to the solverstate (snapshots moved with their folder)."""
    cand = Path(learned_net)
    if cand.exists():
        return cand
    beside = Path(state_path).resolve().parent / cand.name
    if beside.exists():
        return beside
    raise CaffeportError(
        f"{state_path}: learned_net \"{learned_net}\" not found (looked relative to the working directory "
        f"and next to the solverstate)"
    )


def state_to_message(it: int, current_step: int, learned_net: str,
                     history: Sequence[np.ndarray]) -> caffe_pb2.SolverState:
    """A ``SolverState`` message (for callers that want the protobuf)."""
    from caffeport.io import array_to_blobproto

    st = caffe_pb2.SolverState(iter=int(it), current_step=int(current_step), learned_net=learned_net)
    for h in history:
        st.history.add().CopyFrom(array_to_blobproto(np.asarray(h, dtype=np.float32)))
    return st
