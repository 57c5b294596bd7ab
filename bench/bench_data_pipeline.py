"""Data-pipeline throughput: a CaffeNet-style Data layer over a synthetic LMDB of 256x256 raw datums.

transform_param: crop_size 227, mirror, mean_file (256x256); batch 32, TRAIN phase. Prints images/s for
the layer's forward (prefetch thread on) and for the synchronous producer alone (no asserts).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from caffeport.io import write_blobproto
from caffeport.io.lmdb_store import LMDBWriter, array_to_datum
from caffeport.layers.base import BuildContext, layer_class
from caffeport.proto import caffe_pb2

N_RECORDS = 512
BATCH = 32
N_BATCHES = 40


def _setup(root: Path) -> None:
    rng = np.random.default_rng(0)
    with LMDBWriter(root / "train_lmdb") as w:
        for i in range(N_RECORDS):
            img = rng.integers(0, 256, (3, 256, 256), dtype=np.uint8)
            w.put(f"{i:08d}_img{i}.jpg", array_to_datum(img, i % 1000).SerializeToString())
    mean = rng.uniform(90, 130, (3, 256, 256)).astype(np.float32)
    write_blobproto(mean[np.newaxis], root / "mean.binaryproto", legacy=True)


def _layer(root: Path, prefetch: int):
    lp = caffe_pb2.LayerParameter()
    text_format.Merge(
        'name: "data" type: "Data" top: "data" top: "label" '
        'transform_param { crop_size: 227 mirror: true mean_file: "mean.binaryproto" } '
        f'data_param {{ source: "train_lmdb" batch_size: {BATCH} backend: LMDB prefetch: {prefetch} }}',
        lp,
    )
    return layer_class("Data")(lp, [], BuildContext(phase=caffe_pb2.TRAIN, root=root))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _setup(root)
        for prefetch, label in ((0, "synchronous"), (4, "prefetch 4")):
            layer = _layer(root, prefetch)
            layer.forward()  # warm-up (starts the thread, touches the pages)
            t0 = time.perf_counter()
            for _ in range(N_BATCHES):
                layer.forward()
            dt = time.perf_counter() - t0
            layer.close()
            print(
                f"data pipeline ({label}): {N_BATCHES * BATCH / dt:8.0f} images/s  "
                f"(256x256 raw -> crop 227 + mirror + mean_file, batch {BATCH})"
            )


if __name__ == "__main__":
    main()
