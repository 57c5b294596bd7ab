"""``compute_image_mean``: the per-element mean of a Datum database, as Caffe's tool computes it.

Sums are accumulated in float32 record by record (uint8 pixels, or ``float_data``), then divided by
the record count in float32, and written as a ``BlobProto`` with the *legacy* ``num/channels/height/
width`` fields (num = 1), not ``shape`` - exactly what ``tools/compute_image_mean.cpp`` writes.
Encoded records are decoded natively (the file's own channel count). Every record must have the same
size as the first.
"""

from __future__ import annotations

import os

import numpy as np

from caffeport.errors import CaffeportError
from caffeport.io.lmdb_store import datum_to_array, open_reader, parse_datum

__all__ = ["compute_image_mean", "channel_means"]


def channel_means(mean: np.ndarray) -> list[float]:
    """Per-channel averages of a (C,H,W) mean image (what Caffe's tool logs)."""
    return [float(np.mean(mean[c].astype(np.float64))) for c in range(mean.shape[0])]


def compute_image_mean(
    db: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    backend: str = "lmdb",
) -> np.ndarray:
    """The mean image (C,H,W float32) of database ``db``; written to ``output`` (.binaryproto) if given."""
    where = f"compute_image_mean: '{db}'"
    reader = open_reader(db, backend, where)
    total: np.ndarray | None = None
    count = 0
    try:
        for key, value in reader.items():
            d = parse_datum(value, f"{where} record {key!r}")
            arr = datum_to_array(d, where=f"{where} record {key!r}")
            if total is None:
                total = np.zeros(arr.shape, dtype=np.float32)
            elif arr.shape != total.shape:
                raise CaffeportError(
                    f"{where}: record {key!r} has shape (C,H,W) {arr.shape}, the first record {total.shape}; "
                    "all images must have the same size"
                )
            np.add(total, arr, out=total, dtype=np.float32)
            count += 1
    finally:
        reader.close()
    if total is None or count == 0:
        raise CaffeportError(f"{where} has no records")
    mean = (total / np.float32(count)).astype(np.float32)
    if output is not None:
        from caffeport.io import write_blobproto

        # Legacy num/channels/height/width fields, as tools/compute_image_mean.cpp writes them.
        write_blobproto(mean[np.newaxis], output, legacy=True)
    return mean
