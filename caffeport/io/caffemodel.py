"""Caffemodel files, whichever format: binary NetParameter (decoded by :mod:`caffeport.io.blobs`)
or HDF5 (:mod:`caffeport.io.hdf5`), picked from the content when reading and from the suffix when
writing, as Caffe's ``CopyTrainedLayersFrom`` / ``snapshot_format`` do."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from caffeport.errors import CaffeportError
from caffeport.io.atomic import atomic_write
from caffeport.io.blobs import _read_file, encode_net_blobs, is_hdf5, net_blobs_from_message, scan_net_blobs
from caffeport.io.hdf5 import read_caffemodel_h5, write_caffemodel_h5
from caffeport.io.prototxt import is_binary, read_net
from caffeport.proto import caffe_pb2

__all__ = ["load_caffemodel", "load_caffemodel_net", "save_caffemodel"]

PathLike = str | os.PathLike


def load_caffemodel(path: PathLike) -> OrderedDict[str, list[np.ndarray]]:
    """``{layer name: [float32 arrays]}`` from a ``.caffemodel`` (binary) or ``.caffemodel.h5``.

    The format is picked from the file content. Only layers holding blobs appear. Shapes are
    Caffe's: N-D ``shape`` or the legacy 4-D (num, channels, height, width).
    """
    if is_hdf5(path):
        return read_caffemodel_h5(path)
    data = _read_file(path, "caffemodel")
    if not data:
        raise CaffeportError(f"{path}: empty file, not a caffemodel")
    if not is_binary(data):
        raise CaffeportError(f"{path}: looks like a text prototxt, not a binary caffemodel")
    return scan_net_blobs(data, str(path))


def load_caffemodel_net(path: PathLike) -> caffe_pb2.NetParameter:
    """The whole caffemodel as an upgraded NetParameter (binary via protobuf, or HDF5 -> blobs only)."""
    return read_net(path)


def save_caffemodel(weights: caffe_pb2.NetParameter | Mapping[str, Sequence[np.ndarray]], path: PathLike) -> None:
    """Write weights as a caffemodel: HDF5 when ``path`` ends in ``.h5``, binary NetParameter otherwise.

    ``weights`` is a NetParameter (written as is) or ``{layer name: [arrays]}`` (written as
    ``layer { name blobs { shape data } }`` entries, which Caffe's ``CopyTrainedLayersFrom`` reads
    by name). Written atomically.
    """
    if str(path).lower().endswith((".h5", ".hdf5")):
        if isinstance(weights, caffe_pb2.NetParameter):
            weights = net_blobs_from_message(weights)
        write_caffemodel_h5(weights, path)
        return
    if isinstance(weights, caffe_pb2.NetParameter):
        atomic_write(path, weights.SerializeToString())
    else:
        atomic_write(path, encode_net_blobs(weights))
