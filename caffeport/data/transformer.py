"""Caffe's ``DataTransformer`` (``src/caffe/data_transformer.cpp``): crop, mirror, mean, scale.

For every image (a C,H,W array of uint8 pixels or floats) Caffe computes, in float32::

    out[c, h, w'] = (pixel[c, h_off + h, w_off + w] - mean[c, h_off + h, w_off + w]) * scale

with ``w' = crop_w - 1 - w`` when mirrored. The details that matter:

- ``mean_file`` (a ``.binaryproto`` BlobProto) must have exactly the image's C, H, W; it is indexed at the
  *uncropped* coordinates, i.e. it is cropped at the same offset as the image. ``mean_value`` is one
  value (replicated to all channels) or one per channel. Setting both is an error.
- ``scale`` multiplies *after* the mean subtraction; without a mean the value is ``pixel * scale``.
- ``crop_size``: TRAIN picks ``h_off = Rand(H - crop + 1)``, ``w_off = Rand(W - crop + 1)``; TEST uses the
  centre ``(H - crop) // 2``.
- ``mirror``: ``mirror && Rand(2)``, in *whichever* phase sets it (also TEST).
- Random draws come from a numpy Generator (seeded from torch's RNG unless a seed is given). Caffe's
  own RNG stream (boost mt19937) is not reproduced, so random crops/mirrors match in distribution only.

The arithmetic is done in float32 in Caffe's order, so outputs are bit-identical to Caffe's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2

__all__ = ["DataTransformer", "read_mean_file"]


def read_mean_file(path: str | Path) -> np.ndarray:
    """The mean blob of a ``.binaryproto`` file as float32 (C,H,W; a leading num of 1 dropped)."""
    from caffeport.io import read_blobproto

    return read_blobproto(path)


def _legacy_chw(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """C, H, W of a mean blob: the last three axes of its shape padded to 4-D with leading 1s.

    Caffe reads ``channels()/height()/width()`` (axes 1..3 of a 4-D blob); for the usual 1,C,H,W
    mean this is the same. A 3-D C,H,W blob is accepted too (Caffe would misread it).
    """
    s = tuple(shape)
    if len(s) > 4:
        raise CaffeportError(f"mean blob has {len(s)} axes; Caffe's legacy accessors need at most 4")
    s = (1,) * (4 - len(s)) + s
    return int(s[1]), int(s[2]), int(s[3])


class DataTransformer:
    """Applies a ``TransformationParameter`` to images, exactly as Caffe's DataTransformer.

    ``mean_path`` is the already-resolved path of ``mean_file`` (the caller resolves relative paths);
    ``where`` prefixes error messages (e.g. ``"net.prototxt: layer 'data' (Data)"``).
    """

    def __init__(
        self,
        param: caffe_pb2.TransformationParameter,
        phase: int,
        mean_path: str | Path | None = None,
        where: str = "",
        rng: np.random.Generator | None = None,
    ):
        self.param = param
        self.phase = phase
        self.where = where
        self.scale = np.float32(param.scale)
        self.crop = int(param.crop_size)
        self.mirror = bool(param.mirror)
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        self.rng = rng if rng is not None else _default_rng()
        if self.force_color and self.force_gray:
            raise self._err("cannot set both force_color and force_gray")
        for fld in ("resize_param", "noise_param", "emit_constraint", "distort_param", "expand_param"):
            if param.HasField(fld):
                raise self._err(f"transform_param.{fld} is an SSD-fork option caffeport does not support")
        self.mean_file = param.mean_file if param.HasField("mean_file") else None
        self.mean: np.ndarray | None = None  # (C,H,W) float32
        self.mean_values: np.ndarray | None = None  # (k,) float32
        if self.mean_file is not None:
            if len(param.mean_value):
                raise self._err("cannot specify mean_file and mean_value at the same time")
            mp = Path(mean_path) if mean_path is not None else Path(self.mean_file)
            if not mp.is_file():
                raise self._err(f"mean_file '{self.mean_file}' not found (looked for '{mp}')")
            try:
                blob = read_mean_file(mp)
            except CaffeportError as e:
                raise self._err(str(e)) from None
            c, h, w = _legacy_chw(blob.shape)
            self.mean_shape = (c, h, w)
            self.mean = np.ascontiguousarray(blob.reshape(-1)[: c * h * w].reshape(c, h, w), dtype=np.float32)
            self.mean_path = mp
        elif len(param.mean_value):
            self.mean_values = np.asarray(param.mean_value, dtype=np.float32)

    def _err(self, msg: str) -> CaffeportError:
        return CaffeportError(f"{self.where}: {msg}" if self.where else msg)

    # ------------------------------------------------------------------------------------------
    def output_shape(self, c: int, h: int, w: int) -> tuple[int, int, int]:
        """Caffe's InferBlobShape for one image of C,H,W (after crop)."""
        if self.crop:
            if h < self.crop or w < self.crop:
                raise self._err(f"crop_size {self.crop} is larger than the image ({h}x{w})")
            return c, self.crop, self.crop
        return c, h, w

    def _check(self, c: int, h: int, w: int) -> None:
        if self.mean is not None and self.mean.shape != (c, h, w):
            raise self._err(
                f"mean_file '{self.mean_file}' has shape (C,H,W) = {self.mean.shape}, the data has "
                f"{(c, h, w)}; Caffe requires them to match exactly"
            )
        if self.mean_values is not None and len(self.mean_values) not in (1, c):
            raise self._err(
                f"{len(self.mean_values)} mean_value entries for {c} channels; specify either 1 "
                "mean_value or as many as channels"
            )
        if self.crop and (h < self.crop or w < self.crop):
            raise self._err(f"crop_size {self.crop} is larger than the image ({h}x{w})")

    def check(self, c: int, h: int, w: int) -> None:
        """Raise the CaffeportError Caffe's CHECKs would for an image of C,H,W."""
        self._check(c, h, w)

    def draw(self, h: int, w: int) -> tuple[bool, int, int]:
        """Random choices for one image: (do_mirror, h_off, w_off), in Caffe's draw order."""
        do_mirror = bool(self.mirror and self.rng.integers(2))
        h_off = w_off = 0
        if self.crop:
            if self.phase == caffe_pb2.TRAIN:
                h_off = int(self.rng.integers(h - self.crop + 1))
                w_off = int(self.rng.integers(w - self.crop + 1))
            else:
                h_off = (h - self.crop) // 2
                w_off = (w - self.crop) // 2
        return do_mirror, h_off, w_off

    def transform(self, img: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Transform one (C,H,W) uint8/float image into a float32 (C,h,w) array (``out`` if given)."""
        c, h, w = img.shape
        self._check(c, h, w)
        return self.apply(img, self.draw(h, w), out)

    def apply(
        self, img: np.ndarray, choice: tuple[bool, int, int], out: np.ndarray | None = None
    ) -> np.ndarray:
        """Transform one checked image with pre-drawn ``(do_mirror, h_off, w_off)`` (thread-safe)."""
        c, h, w = img.shape
        do_mirror, h_off, w_off = choice
        ch, cw = (self.crop, self.crop) if self.crop else (h, w)
        x = img[:, h_off : h_off + ch, w_off : w_off + cw]
        if out is None:
            out = np.empty((c, ch, cw), dtype=np.float32)
        # Mirroring only moves values, so compute unmirrored (into a scratch buffer) and flip after.
        dst = np.empty_like(out) if do_mirror else out
        if self.mean is not None:
            np.subtract(x, self.mean[:, h_off : h_off + ch, w_off : w_off + cw], out=dst, dtype=np.float32)
            if self.scale != 1:
                np.multiply(dst, self.scale, out=dst)
        elif self.mean_values is not None:
            mv = self.mean_values if len(self.mean_values) == c else np.repeat(self.mean_values[:1], c)
            np.subtract(x, mv[:, None, None], out=dst, dtype=np.float32)
            if self.scale != 1:
                np.multiply(dst, self.scale, out=dst)
        else:
            np.multiply(x, self.scale, out=dst, dtype=np.float32)
        if do_mirror:
            _flip_w(dst, out)
        return out


def _flip_w(src: np.ndarray, dst: np.ndarray) -> None:
    """dst[c, h, w] = src[c, h, W-1-w] (OpenCV's flip is several times faster than a numpy copy)."""
    if dst.flags.c_contiguous and src.flags.c_contiguous and src.shape[-1] > 0:
        import cv2

        w = src.shape[-1]
        cv2.flip(src.reshape(-1, w), 1, dst=dst.reshape(-1, w))
    else:
        np.copyto(dst, src[:, :, ::-1])


def _default_rng() -> np.random.Generator:
    import torch

    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    return np.random.default_rng(seed)
