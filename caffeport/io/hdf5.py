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
from caffeport.io.safe import element_count, max_file_bytes, regular_file
from caffeport.proto import caffe_pb2

__all__ = [
    "H5_ERRORS",
    "check_dataset",
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


# h5py raises these (and OSError) on corrupt files: a truncated B-tree, a bad object header, a
# dataset whose dtype cannot be read. They become one CaffeportError naming the file.
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, OverflowError,
              AttributeError, UnicodeDecodeError)


def _h5_errors_named(what: str):
    """Decorator: any h5py/numpy error while reading becomes a CaffeportError naming the file."""
    import functools

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(path: PathLike, *args, **kwargs):
            try:
                return fn(path, *args, **kwargs)
            except H5_ERRORS as e:
                raise CaffeportError(f"{path}: corrupt HDF5 {what}: {e!r}") from None

        return wrapper

    return deco


def _open(path: PathLike, what: str):
    h5py = _h5py()
    regular_file(path, what)
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise CaffeportError(f"{what} file not found: {path}") from None
    except H5_ERRORS as e:
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
    out = []
    for k in order:
        ds = group[k]
        if not hasattr(ds, "shape") or not hasattr(ds, "dtype"):
            raise CaffeportError(f"{group.file.filename}: {group.name}/{k} is not a dataset")
        check_dataset(ds, f"{group.file.filename}: dataset {group.name}/{k}")
        out.append(np.asarray(ds[()], dtype=np.float32))
    return out


def check_dataset(ds, where: str) -> None:
    """Refuse a dataset whose declared size is absurd before reading it (HDF5 can declare 2^31 x 4
    float64 in a few hundred bytes: chunks never written read as fill values)."""
    if ds.dtype.kind not in "fiub":
        raise CaffeportError(f"{where}: dtype {ds.dtype} is not numeric")
    n = element_count(ds.shape or (), where)
    nbytes = n * max(ds.dtype.itemsize, 4)
    size = os.path.getsize(ds.file.filename)
    limit = max_file_bytes()
    if nbytes > limit or (nbytes > size * 1024 + (64 << 20)):
        raise CaffeportError(f"{where}: shape {tuple(ds.shape)} ({nbytes} bytes) is implausible for a file of "
                             f"{size} bytes")


def _atomic_h5(path: PathLike, fill) -> None:
    h5py = _h5py()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        fill(f)


@_h5_errors_named("caffemodel")
def read_caffemodel_h5(path: PathLike) -> OrderedDict[str, list[np.ndarray]]:
    """``{layer: [float32 arrays]}`` for the layers with parameters in a ``.caffemodel.h5``."""
    with _open(path, "caffemodel") as f:
        if "data" not in f or not hasattr(f["data"], "items"):
            raise CaffeportError(f"{path}: HDF5 file has no 'data' group, not a Caffe .caffemodel.h5")
        out: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        try:
            for name, g in _layer_groups(f["data"]):
                blobs = _indexed(g)
                if blobs:
                    out[name] = blobs
        except H5_ERRORS as e:
            raise CaffeportError(f"{path}: corrupt HDF5 caffemodel: {e!r}") from None
        return out


@_h5_errors_named("caffemodel")
def read_caffemodel_h5_net(path: PathLike) -> caffe_pb2.NetParameter:
    """A NetParameter with one ``layer {name blobs}`` per layer of an HDF5 caffemodel (no types:
    the HDF5 format stores only names and blobs)."""
    from caffeport.io.blobs import array_to_blobproto

    net = caffe_pb2.NetParameter()
    with _open(path, "caffemodel") as f:
        if "data" not in f:
            raise CaffeportError(f"{path}: HDF5 file has no 'data' group, not a Caffe .caffemodel.h5")
        try:
            for name, g in _layer_groups(f["data"]):
                lp = net.layer.add(name=name)
                for arr in _indexed(g):
                    lp.blobs.add().CopyFrom(array_to_blobproto(arr))
        except H5_ERRORS as e:
            raise CaffeportError(f"{path}: corrupt HDF5 caffemodel: {e!r}") from None
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


@_h5_errors_named("solverstate")
def read_solverstate_h5(path: PathLike) -> tuple[int, int, str, list[np.ndarray]]:
    """(iter, current_step, learned_net, history) from a ``.solverstate.h5``."""
    with _open(path, "solverstate") as f:
        try:
            for key in ("iter", "current_step"):
                if key in f:
                    check_dataset(f[key], f"{path}: dataset {key}")
            it = int(np.asarray(f["iter"][()]).reshape(-1)[0])
            step = int(np.asarray(f["current_step"][()]).reshape(-1)[0]) if "current_step" in f else 0
            ln = f["learned_net"][()] if "learned_net" in f else b""
            learned = ln.decode("utf-8", errors="replace") if isinstance(ln, bytes) else str(ln)
            history = _indexed(f["history"]) if "history" in f else []
        except KeyError as e:
            raise CaffeportError(f"{path}: not a Caffe HDF5 solverstate (missing {e})") from None
        except H5_ERRORS as e:
            raise CaffeportError(f"{path}: corrupt HDF5 solverstate: {e!r}") from None
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
