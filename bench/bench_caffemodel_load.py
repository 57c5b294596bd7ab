"""Caffemodel load speed: caffeport's wire scanner vs protobuf ``ParseFromString``.

Writes a synthetic caffemodel with CaffeNet's parameter shapes (~233 MiB of float32) to a temp
folder, then times ``load_caffemodel`` (fast path), ``load_caffemodel_net`` and a plain protobuf
``NetParameter.ParseFromString`` of the same bytes, in the same process.
"""

from __future__ import annotations

import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from caffeport.io import load_caffemodel, save_caffemodel
from caffeport.proto import caffe_pb2

# bvlc_reference_caffenet parameter shapes
CAFFENET = [
    ("conv1", [(96, 3, 11, 11), (96,)]),
    ("conv2", [(256, 48, 5, 5), (256,)]),
    ("conv3", [(384, 256, 3, 3), (384,)]),
    ("conv4", [(384, 192, 3, 3), (384,)]),
    ("conv5", [(256, 192, 3, 3), (256,)]),
    ("fc6", [(4096, 9216), (4096,)]),
    ("fc7", [(4096, 4096), (4096,)]),
    ("fc8", [(1000, 4096), (1000,)]),
]


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    rng = np.random.default_rng(0)
    weights = OrderedDict(
        (name, [rng.standard_normal(s, dtype=np.float32) for s in shapes]) for name, shapes in CAFFENET
    )
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "caffenet_synthetic.caffemodel"
        save_caffemodel(weights, path)
        size_mb = path.stat().st_size / 2**20
        data = path.read_bytes()

        loaded = load_caffemodel(path)
        assert all(np.array_equal(loaded[k][i], weights[k][i]) for k in weights for i in range(2))

        t_fast = _best(lambda: load_caffemodel(path))

        def pb() -> None:
            caffe_pb2.NetParameter().ParseFromString(data)

        t_pb = _best(pb, repeat=2)

        def pb_numpy() -> None:
            msg = caffe_pb2.NetParameter()
            msg.ParseFromString(data)
            for lp in msg.layer:
                for b in lp.blobs:
                    np.asarray(b.data, dtype=np.float32)

        t_pb_np = _best(pb_numpy, repeat=1)

    print(f"file: {size_mb:.1f} MiB synthetic CaffeNet caffemodel")
    print(f"load_caffemodel (scanner, incl. file read): {t_fast:.3f} s = {size_mb / t_fast:.0f} MiB/s")
    print(f"protobuf ParseFromString (bytes in memory, no numpy): {t_pb:.3f} s = {size_mb / t_pb:.0f} MiB/s")
    print(f"protobuf ParseFromString + numpy conversion of every blob: {t_pb_np:.3f} s")
    print(f"speed-up vs ParseFromString: {t_pb / t_fast:.1f}x; vs ParseFromString+numpy: {t_pb_np / t_fast:.1f}x")


if __name__ == "__main__":
    main()
