"""Caffe's data-source layers: Data, ImageData, HDF5Data, MemoryData, DummyData (and WindowData).

All of them have no bottoms, declare their top shapes at set-up (``top_shapes``) and return the next
batch as float32 tensors from ``forward()``; labels are a (N,) blob, as in Caffe.

Paths: Caffe opens ``source`` / ``mean_file`` relative to the *process's working directory*.
caffeport tries the cwd first and then the folder of the net file (``ctx.root``), so a net also works
when run from elsewhere. Errors name the layer and the path that was looked for.

Differences from Caffe worth knowing:

- random crops / mirrors / ``shuffle`` / ``rand_skip`` use numpy's RNG (seeded from torch's), not
  Caffe's boost stream, so they match Caffe in distribution, not draw for draw;
- each Data layer has its own cursor (Caffe >= 2017);
- data-parallel training (``torch.distributed`` initialised, e.g. ``caffeport train --gpu 0,1``):
  TRAIN-phase Data and HDF5Data layers of rank r of W read records r, r+W, r+2W... as Caffe 1.0's
  ``Skip()`` does; ImageData does not stride (neither does Caffe's), TEST nets never do;
- WindowData draws its windows with numpy's RNG too (Caffe's draws are not reproduced); its crops
  are Caffe's arithmetic (see ``caffeport.data.window``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caffeport.data.loader import Prefetcher
from caffeport.data.sources import (
    DatumBatches,
    HDF5Batches,
    ImageListBatches,
    resolve_data_path,
)
from caffeport.data.transformer import DataTransformer
from caffeport.errors import CaffeportError, CaffeportWarning
from caffeport.fillers import fill
from caffeport.layers.base import Layer, Shape, blob_shape, register
from caffeport.proto import caffe_pb2

__all__ = ["Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData"]


class _DataLayerBase(Layer):
    """Shared plumbing: path resolution, the transformer, the prefetcher and tensor output."""

    is_data = True
    min_bottoms = 0
    max_bottoms = 0

    def _where(self) -> str:
        return f"{self.ctx.source}: layer '{self.name}' ({self.param.type})"

    def _resolve(self, path: str) -> Path:
        return resolve_data_path(path, Path(self.ctx.root))

    def _solver_rank(self) -> tuple[int, int]:
        """(rank, solver count) for record striding: Caffe's ``solver_rank``/``solver_count`` in the
        TRAIN phase when torch.distributed is initialised; (0, 1) otherwise."""
        dist = torch.distributed
        if self.phase != caffe_pb2.TRAIN or not (dist.is_available() and dist.is_initialized()):
            return 0, 1
        return dist.get_rank(), dist.get_world_size()

    def _rng(self) -> np.random.Generator:
        seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
        return np.random.default_rng(seed)

    def _transformer(self, legacy: Any | None = None) -> DataTransformer:
        """The layer's DataTransformer; ``legacy`` is a data_param/image_data_param whose old
        scale/mean_file/crop_size/mirror fields Caffe's upgrade moves into transform_param."""
        tp = caffe_pb2.TransformationParameter()
        tp.CopyFrom(self.param.transform_param)
        if legacy is not None:
            for f in ("scale", "mean_file", "crop_size", "mirror"):
                if legacy.HasField(f) and not tp.HasField(f):
                    setattr(tp, f, getattr(legacy, f))
        mean_path = None
        if tp.HasField("mean_file"):
            mean_path = self._resolve(tp.mean_file)
            if not mean_path.is_file():
                raise self.error(
                    f"mean_file '{tp.mean_file}' not found (looked in the cwd and in '{self.ctx.root}')"
                )
        return DataTransformer(tp, self.phase, mean_path, self._where(), self._rng())

    def _init_output(self) -> None:
        # An empty buffer that follows .to(device), so batches land where the net lives.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    def _to_tensors(self, arrays: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, ...]:
        dev = self._anchor.device
        outs = []
        for a in arrays:
            t = torch.from_numpy(a)
            if dev.type != "cpu":
                t = t.pin_memory().to(dev, non_blocking=True)
            outs.append(t)
        return tuple(outs)


class _Prefetched(_DataLayerBase):
    """A data layer whose ``batches`` source is read ahead by ``prefetcher``: tops are the image
    batch ``self._shape`` and, when asked for, its labels."""

    batches: Any
    prefetcher: Prefetcher
    _shape: Shape

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shapes: list[Shape] = [tuple(self._shape)]
        if len(self.param.top) > 1:
            shapes.append((self._shape[0],))
        return shapes

    def forward(self) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return self._to_tensors(self.prefetcher.get())

    def close(self) -> None:
        self.prefetcher.close()
        self.batches.close()


@register("Data")
class Data(_Prefetched):
    """Caffe's DataLayer: Datum records from an LMDB (or LevelDB) in key order, transformed.

    Tops: ``data`` (N,C,h,w) and optional ``label`` (N,). Batches are prefetched by a background thread
    ``data_param.prefetch`` batches ahead (default 4). ``backend`` defaults to LEVELDB as in Caffe.
    """

    min_tops = 1
    max_tops = 2

    def setup(self, bottom_shapes: list[Shape]) -> None:
        dp = self.param.data_param
        if not dp.source:
            raise self.error("data_param.source is not set")
        if dp.batch_size <= 0:
            raise self.error("data_param.batch_size must be set and positive")
        self._init_output()
        self.tf = self._transformer(dp)
        path = self._resolve(dp.source)
        rank, world = self._solver_rank()
        self.batches = DatumBatches(
            path, dp.backend, dp.batch_size, self.tf, len(self.param.top) > 1, self._where(), dp.rand_skip,
            rank=rank, world=world,
        )
        self._shape = self.batches.first_shape()
        self.prefetcher = Prefetcher(self.batches.next_batch, dp.prefetch, f"caffeport-data-{self.name}")



@register("ImageData")
class ImageData(_Prefetched):
    """Caffe's ImageDataLayer: images listed in ``source`` ("<path> <label>" per line), read with
    OpenCV (BGR, or gray when ``is_color: false``), resized with INTER_LINEAR when ``new_height`` and
    ``new_width`` are set, transformed. ``root_folder`` is prefixed to each path verbatim."""

    min_tops = 1
    max_tops = 2

    def setup(self, bottom_shapes: list[Shape]) -> None:
        ip = self.param.image_data_param
        if not ip.source:
            raise self.error("image_data_param.source is not set")
        self._init_output()
        self.tf = self._transformer(ip)
        path = self._resolve(ip.source)
        if not path.is_file():
            raise self.error(f"source '{ip.source}' not found (looked in the cwd and in '{self.ctx.root}')")
        self.batches = ImageListBatches(
            path,
            ip.root_folder,
            ip.batch_size,
            self.tf,
            len(self.param.top) > 1,
            self._where(),
            ip.new_height,
            ip.new_width,
            ip.is_color,
            ip.shuffle,
            ip.rand_skip,
            base=Path(self.ctx.root),
        )
        self._shape = self.batches.first_shape()
        self.prefetcher = Prefetcher(self.batches.next_batch, 4, f"caffeport-imagedata-{self.name}")



@register("HDF5Data")
class HDF5Data(_DataLayerBase):
    """Caffe's HDF5DataLayer: each top is the HDF5 dataset of the same name; ``source`` lists .h5 files.

    Listed files resolve against the cwd (Caffe), then the list file's folder, then the net's folder.
    Batches are copied row by row across file boundaries and wrap around; there is no transform
    (Caffe refuses ``transform_param`` here, and so does caffeport).
    """

    min_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        hp = self.param.hdf5_data_param
        if self.param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data; remove transform_param")
        if not hp.source:
            raise self.error("hdf5_data_param.source is not set")
        if hp.batch_size <= 0:
            raise self.error("hdf5_data_param.batch_size must be set and positive")
        self._init_output()
        path = self._resolve(hp.source)
        if not path.is_file():
            raise self.error(f"source '{hp.source}' not found (looked in the cwd and in '{self.ctx.root}')")
        rank, world = self._solver_rank()
        self.batches = HDF5Batches(
            path, list(self.param.top), hp.batch_size, self._where(), hp.shuffle, self._rng(),
            Path(self.ctx.root), rank=rank, world=world,
        )

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return self.batches.top_shapes()

    def forward(self) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return self._to_tensors(self.batches.next_batch())


@register("MemoryData")
class MemoryData(_DataLayerBase):
    """Caffe's MemoryDataLayer: batches sliced from arrays given with :meth:`set_input_arrays`.

    Tops ``data`` (N,C,H,W) and ``label`` (N,). Like pycaffe, the number of rows must be a multiple of
    ``batch_size``; batches advance by ``batch_size`` and wrap. No transform is applied to the arrays
    (Caffe's ``Reset`` does not transform either).
    """

    min_tops = 1
    max_tops = 2

    def setup(self, bottom_shapes: list[Shape]) -> None:
        mp = self.param.memory_data_param
        self.n, self.c, self.h, self.w = (int(mp.batch_size), int(mp.channels), int(mp.height), int(mp.width))
        if min(self.n, self.c, self.h, self.w) <= 0:
            raise self.error(
                "memory_data_param batch_size, channels, height and width must all be specified and positive"
            )
        self._init_output()
        self._data: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._pos = 0

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shapes: list[Shape] = [(self.n, self.c, self.h, self.w)]
        if len(self.param.top) > 1:
            shapes.append((self.n,))
        return shapes

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Use ``data`` (rows, C, H, W) and ``labels`` (rows,) as the source; rows % batch_size == 0."""
        d = np.ascontiguousarray(data, dtype=np.float32)
        lab = np.ascontiguousarray(labels, dtype=np.float32).reshape(-1)
        if d.ndim != 4 or d.shape[1:] != (self.c, self.h, self.w):
            raise self.error(f"data must have shape (rows, {self.c}, {self.h}, {self.w}), got {d.shape}")
        if lab.shape[0] != d.shape[0]:
            raise self.error(f"{d.shape[0]} data rows but {lab.shape[0]} labels")
        if d.shape[0] == 0 or d.shape[0] % self.n:
            raise self.error(
                f"the number of rows ({d.shape[0]}) must be a positive multiple of batch_size {self.n}"
            )
        self._data, self._labels, self._pos = d, lab, 0

    def reset(self, data: np.ndarray, labels: np.ndarray) -> None:
        self.set_input_arrays(data, labels)

    def forward(self) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        if self._data is None or self._labels is None:
            raise self.error("MemoryData needs its arrays: call set_input_arrays(data, labels) first")
        p, n = self._pos, self.n
        out = (self._data[p : p + n].copy(), self._labels[p : p + n].copy())
        self._pos = (p + n) % self._data.shape[0]
        return self._to_tensors(out if len(self.param.top) > 1 else out[:1])


@register("DummyData")
class DummyData(_DataLayerBase):
    """Caffe's DummyDataLayer: tops of the given shapes filled by ``data_filler`` (default constant 0).

    One filler (or none) applies to every top; otherwise one per top. Shapes come from ``shape``
    (one for all tops or one per top) or the legacy ``num/channels/height/width`` lists. Non-constant
    fillers draw fresh values at every forward, like Caffe.
    """

    min_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        dp = self.param.dummy_data_param
        n_top = len(self.param.top)
        nf = len(dp.data_filler)
        if nf not in (0, 1, n_top):
            raise self.error(f"{nf} data_filler entries for {n_top} tops (need 0, 1 or {n_top})")
        legacy = bool(len(dp.num) or len(dp.channels) or len(dp.height) or len(dp.width))
        shapes: list[Shape] = []
        if legacy:
            if len(dp.shape):
                raise self.error("both shape and the legacy num/channels/height/width fields are set")
            for fld in ("num", "channels", "height", "width"):
                k = len(getattr(dp, fld))
                if k not in (1, n_top):
                    raise self.error(f"dummy_data_param.{fld} has {k} entries; need 1 or {n_top}")
            for i in range(n_top):
                shapes.append(
                    tuple(
                        int(getattr(dp, f)[0 if len(getattr(dp, f)) == 1 else i])
                        for f in ("num", "channels", "height", "width")
                    )
                )
        else:
            if len(dp.shape) not in (1, n_top):
                raise self.error(f"{len(dp.shape)} shapes for {n_top} tops (need 1 or {n_top})")
            for i in range(n_top):
                shapes.append(blob_shape(dp.shape[0 if len(dp.shape) == 1 else i]))
        self.shapes = shapes
        if nf == 0:
            f = caffe_pb2.FillerParameter()
            f.type = "constant"
            f.value = 0
            self.fillers = [f] * n_top
        elif nf == 1:
            self.fillers = [dp.data_filler[0]] * n_top
        else:
            self.fillers = list(dp.data_filler)
        self._init_output()
        self._const: dict[int, torch.Tensor] = {}
        for i, (s, f) in enumerate(zip(self.shapes, self.fillers)):
            if (f.type or "constant") == "constant":
                self._const[i] = fill(s, f)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return list(self.shapes)

    def forward(self) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        dev = self._anchor.device
        outs = []
        for i, (s, f) in enumerate(zip(self.shapes, self.fillers)):
            t = self._const[i].clone() if i in self._const else fill(s, f)
            outs.append(t.to(dev))
        return tuple(outs)


@register("WindowData")
class WindowData(_Prefetched):
    """Caffe's WindowDataLayer (R-CNN fine-tuning): windows from a window file, warped to crop_size.

    Tops ``data`` (N, 3, crop, crop) and ``label`` (N,) (Caffe requires exactly these two). Each batch
    is ``N - int(N * fg_fraction)`` background windows (label 0) then foreground ones (their class),
    drawn at random with numpy's RNG (Caffe's draws cannot be reproduced; the distribution is the
    same); the crop/warp/pad/mean/scale arithmetic is Caffe's, see :mod:`caffeport.data.window`.
    ``crop_size`` (required), ``mirror``, ``mean_file``/``mean_value`` come from ``transform_param``,
    ``scale`` from ``window_data_param``, as Caffe 1.0 reads them. Image paths are ``root_folder`` +
    the path in the file, looked for in the cwd and then in the net's folder.
    """

    min_tops = 2
    max_tops = 2

    def setup(self, bottom_shapes: list[Shape]) -> None:
        from caffeport.data.transformer import read_mean_file
        from caffeport.data.window import WindowBatches, read_window_file

        wp = self.param.window_data_param
        tp = self.param.transform_param
        if not wp.source:
            raise self.error("window_data_param.source is not set")
        if wp.batch_size <= 0:
            raise self.error("window_data_param.batch_size must be set and positive")
        crop = int(tp.crop_size)
        if crop <= 0:
            hint = (" (window_data_param.crop_size is set, but Caffe 1.0 reads transform_param.crop_size)"
                    if wp.HasField("crop_size") else "")
            raise self.error(f"WindowData needs transform_param.crop_size > 0{hint}")
        if wp.context_pad and crop <= 2 * wp.context_pad:
            raise self.error(f"context_pad {wp.context_pad} leaves nothing of crop_size {crop}")
        ignored = [f"window_data_param.{f}" for f in ("mean_file", "mirror", "crop_size") if wp.HasField(f)]
        if tp.HasField("scale"):
            ignored.append("transform_param.scale")
        if ignored:
            warnings.warn(
                f"{self._where()}: Caffe's WindowData ignores {', '.join(ignored)} (it reads crop_size, "
                "mirror and the mean from transform_param, scale from window_data_param)",
                CaffeportWarning, stacklevel=2,
            )
        mean = None
        if tp.HasField("mean_file"):
            if len(tp.mean_value):
                raise self.error("cannot specify mean_file and mean_value at the same time")
            mpath = self._resolve(tp.mean_file)
            if not mpath.is_file():
                raise self.error(
                    f"mean_file '{tp.mean_file}' not found (looked in the cwd and in '{self.ctx.root}')"
                )
            try:
                mean = read_mean_file(mpath)
            except CaffeportError as e:
                raise self.error(str(e)) from None
        src = self._resolve(wp.source)
        if not src.is_file():
            raise self.error(f"window file '{wp.source}' not found (looked in the cwd and in '{self.ctx.root}')")
        windows = read_window_file(src, wp.root_folder, wp.fg_threshold, wp.bg_threshold, self._where())
        if windows.channels != 3:
            raise self.error(
                f"window file '{wp.source}': the last image lists {windows.channels} channels; Caffe shapes "
                "the data top with it but always reads images as 3-channel colour, so it must be 3"
            )
        paths = []
        for name, _size, line in windows.images:
            p = self._resolve(name)
            if not p.is_file():
                raise self.error(f"window file '{wp.source}' line {line}: image '{name}' not found "
                                 f"(looked in the cwd and in '{self.ctx.root}')")
            paths.append(p)
        self._init_output()
        self.batches = WindowBatches(
            windows, paths, wp.batch_size, crop, wp.context_pad, wp.crop_mode, tp.mirror, wp.scale,
            wp.fg_fraction, mean, np.asarray(tp.mean_value, np.float32) if len(tp.mean_value) else None,
            wp.cache_images, self._rng(), self._where(),
        )
        self.prefetcher = Prefetcher(self.batches.next_batch, 4, f"caffeport-windowdata-{self.name}")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        n = self.batches.batch_size
        return [self.batches.shape(), (n,)]

