"""``extract_features``: run a net in TEST phase and store blobs as float Datums, like Caffe's tool.

``extract_features(weights, net, "conv1,ip1", "feat_conv1,feat_ip1", num_batches, "lmdb")`` builds the
net (its Data layer supplies the batches), runs ``num_batches`` forward passes and writes, for each
named blob, one database whose records are the blob's items in order: ``float_data`` with the blob's
legacy ``channels/height/width`` (axes beyond the blob's count as 1), keys ``%010d`` counting from 0,
commits every 1000 records.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

import numpy as np

from caffeport.errors import CaffeportError
from caffeport.io.lmdb_store import open_writer
from caffeport.proto import caffe_pb2

__all__ = ["extract_features", "feature_datum"]


def feature_datum(item: np.ndarray, shape: Sequence[int]) -> caffe_pb2.Datum:
    """One item of a blob of ``shape`` (N, ...) as Caffe's extract_features Datum."""
    legacy = [int(shape[i]) if i < len(shape) else 1 for i in range(1, 4)]
    d = caffe_pb2.Datum()
    d.channels, d.height, d.width = legacy
    d.float_data.extend(np.asarray(item, dtype=np.float32).ravel().tolist())
    return d


def _split(arg: str | Sequence[str]) -> list[str]:
    return [s for s in arg.split(",")] if isinstance(arg, str) else list(arg)


def extract_features(
    weights: str | os.PathLike[str],
    net_file: str | os.PathLike[str],
    blob_names: str | Sequence[str],
    db_names: str | Sequence[str],
    num_batches: int,
    backend: str = "lmdb",
    device: str = "CPU",
    device_id: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Write one database per blob; returns ``{db name: records written}``."""
    import torch

    from caffeport.net import Net

    say = log or (lambda m: print(m, file=sys.stderr))
    blobs = _split(blob_names)
    dbs = _split(db_names)
    if len(blobs) != len(dbs):
        raise CaffeportError(
            f"extract_features: {len(blobs)} blob names but {len(dbs)} database names; they must match"
        )
    if num_batches <= 0:
        raise CaffeportError(f"extract_features: num_mini_batches must be positive, got {num_batches}")
    dev = "cpu"
    if device.upper() == "GPU":
        if not torch.cuda.is_available():
            raise CaffeportError("extract_features: GPU asked for but no CUDA device is available")
        dev = f"cuda:{device_id}"
    elif device.upper() != "CPU":
        raise CaffeportError(f"extract_features: device must be CPU or GPU, got {device!r}")
    net = Net(str(net_file), weights=str(weights), phase=caffe_pb2.TEST)
    if dev != "cpu":
        net.to(dev)
    for b in blobs:
        if b not in net.blobs:
            raise CaffeportError(f"extract_features: unknown feature blob name '{b}' in the network '{net_file}'")
    for d in dbs:
        if os.path.exists(d):
            raise CaffeportError(f"extract_features: output database '{d}' already exists")
    writers = [open_writer(d, backend, commit_every=1000) for d in dbs]
    counts = [0] * len(dbs)
    try:
        for batch in range(num_batches):
            net.forward()
            for i, b in enumerate(blobs):
                arr = np.asarray(net.blobs[b].data)
                for n in range(arr.shape[0]):
                    datum = feature_datum(arr[n], arr.shape)
                    writers[i].put(f"{counts[i]:010d}", datum.SerializeToString())
                    counts[i] += 1
            say(f"extract_features: batch {batch + 1}/{num_batches}")
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        for L in getattr(net, "layers", []):
            close = getattr(L, "close", None)
            if callable(close):
                close()
    for w in writers:
        w.close()
    return dict(zip(dbs, counts))
