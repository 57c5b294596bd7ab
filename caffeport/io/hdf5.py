"""Caffe's HDF5 snapshot formats (``snapshot_format: HDF5``).

* ``.caffemodel.h5`` (``Net::ToHDF5``): group ``data`` with one group per layer (every layer, even
  those without parameters) holding datasets ``"0"``, ``"1"``, ... with the blobs' N-D shapes;
  optionally a parallel ``diff`` group (ignored here).
* ``.solverstate.h5`` (``SGDSolver::SnapshotSolverStateToHDF5``): int datasets ``iter`` and
  ``current_step`` (1 element), string dataset ``learned_net``, group ``history`` with ``"0"``...

HDF5 keeps no creation order for these groups, so layers come back sorted by name (harmless: Caffe
matches weights by layer name).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from caffeport.errors import CaffeportError
from caffeport.io.atomic import atomic_path
from caffeport.proto import caffe_pb2

__all__ = [
    "read_caffemodel_h5",
    "read_caffemodel_h5_net",
    "write_caffemodel_h5",
    "read_solverstate_h5",
    "write_solverstate_h5",
]

PathLike = str | os.PathLike


def _h5py():
    import h5py

    return h5py


def _open(path: PathLike, what: str):
    h5py = _h5py()
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise CaffeportError(f"{what} file not found: {path}") from None
    except OSError as e:
        raise CaffeportError(f"{path}: cannot read as HDF5 {what} (truncated or corrupt?): {e}") from None


def _layer_groups(data, prefix: str = ""):
    """(layer name, group) pairs. A layer name containing '/' (``inception_3a/1x1``) is stored by
    HDF5 as nested groups; a group holding only groups is walked into and the names re-joined."""
    h5py = _h5py()
    for name, g in data.items():
        if not isinstance(g, h5py.Group):
            continue
        subgroups = [k for k, v in g.items() if isinstance(v, h5py.Group)]
        if subgroups and len(subgroups) == len(g):
            yield from _layer_groups(g, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", g


def _indexed(group) -> list[np.ndarray]:
    keys = list(group.keys())
    try:
        order = sorted(keys, key=int)
    except ValueError:
        raise CaffeportError(
            f"{group.file.filename}: {group.name}: expected datasets named 0, 1, ... got {keys}"
        ) from None
    return [np.asarray(group[k][()], dtype=np.float32) for k in order]


def _atomic_h5(path: PathLike, fill) -> None:
    h5py = _h5py()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        fill(f)


def read_caffemodel_h5(path: PathLike) -> OrderedDict[str, list[np.ndarray]]:
    """``{layer: [float32 arrays]}`` for the layers with parameters in a ``.caffemodel.h5``."""
    with _open(path, "caffemodel") as f:
        if "data" not in f:
            raise CaffeportError(f"{path}: HDF5 file has no 'data' group, not a Caffe .caffemodel.h5")
        out: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        try:
            for name, g in _layer_groups(f["data"]):
                blobs = _indexed(g)
                if blobs:
                    out[name] = blobs
        except OSError as e:
            raise CaffeportError(f"{path}: corrupt HDF5 caffemodel: {e}") from None
        return out


def read_caffemodel_h5_net(path: PathLike) -> caffe_pb2.NetParameter:
    """A NetParameter with one ``layer {name blobs}`` per layer of an HDF5 caffemodel (no types:
    the HDF5 format stores only names and blobs)."""
    from caffeport.io.blobs import array_to_blobproto

    net = caffe_pb2.NetParameter()
    with _open(path, "caffemodel") as f:
        if "data" not in f:
            raise CaffeportError(f"{path}: HDF5 file has no 'data' group, not a Caffe .caffemodel.h5")
        for name, g in _layer_groups(f["data"]):
            lp = net.layer.add(name=name)
            for arr in _indexed(g):
                lp.blobs.add().CopyFrom(array_to_blobproto(arr))
    return net


def write_caffemodel_h5(weights: Mapping[str, Sequence[np.ndarray]], path: PathLike) -> None:
    """Write ``{layer: [arrays]}`` in Caffe's HDF5 caffemodel layout (float32), atomically."""

    def fill(f) -> None:
        data = f.create_group("data")
        for name, blobs in weights.items():
            g = data.create_group(str(name))
            for i, b in enumerate(blobs):
                g.create_dataset(str(i), data=np.asarray(b, dtype=np.float32))

    _atomic_h5(path, fill)


def read_solverstate_h5(path: PathLike) -> tuple[int, int, str, list[np.ndarray]]:
    """(iter, current_step, learned_net, history) from a ``.solverstate.h5``."""
    with _open(path, "solverstate") as f:
        try:
            it = int(np.asarray(f["iter"][()]).reshape(-1)[0])
            step = int(np.asarray(f["current_step"][()]).reshape(-1)[0]) if "current_step" in f else 0
            ln = f["learned_net"][()] if "learned_net" in f else b""
            learned = ln.decode("utf-8", errors="replace") if isinstance(ln, bytes) else str(ln)
            history = _indexed(f["history"]) if "history" in f else []
        except KeyError as e:
            raise CaffeportError(f"{path}: not a Caffe HDF5 solverstate (missing {e})") from None
    return it, step, learned, history


def write_solverstate_h5(
    path: PathLike, iter: int, current_step: int, learned_net: str, history: Sequence[np.ndarray]
) -> None:
    """Write Caffe's HDF5 solverstate layout, atomically."""

    def fill(f) -> None:
        f.create_dataset("iter", data=np.array([iter], dtype=np.int32))
        f.create_dataset("learned_net", data=np.bytes_(learned_net.encode("utf-8")))
        f.create_dataset("current_step", data=np.array([current_step], dtype=np.int32))
        g = f.create_group("history")
        for i, h in enumerate(history):
            g.create_dataset(str(i), data=np.asarray(h, dtype=np.float32))

    _atomic_h5(path, fill)
