"""pycaffe's ``caffe.io``: image loading, the ``Transformer``, and blob/datum conversions.

Where caffeport differs from pycaffe (BVLC ``python/caffe/io.py``):

- ``load_image`` decodes with OpenCV instead of scikit-image, with pycaffe's conventions (RGB float32
  in [0, 1], H×W×3, or H×W×1 grey with scikit-image's luminance weights); JPEG decoders may differ
  by one grey level.
- ``resize_image`` reimplements scikit-image 0.13's resize (the one pycaffe was written against) for
  interpolation orders 0 and 1, so resized pixels are pycaffe's; higher orders use OpenCV's bicubic.
- ``Transformer.preprocess`` never modifies the array it is given (pycaffe's in-place scaling can).
- Errors are ``CaffeportError``s that are also the exceptions pycaffe raises (``ValueError``...).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2


class CompatValueError(CaffeportError, ValueError):
    """A bad shape or value (pycaffe raises ValueError)."""


__all__ = [
    "load_image", "resize_image", "oversample", "Transformer", "blobproto_to_array", "array_to_blobproto",
    "arraylist_to_blobprotovector_str", "blobprotovector_str_to_arraylist", "array_to_datum", "datum_to_array",
]


def load_image(filename: str, color: bool = True) -> np.ndarray:
    """Image as float32 in [0, 1], H×W×3 RGB (``color``) or H×W×1 grey, like pycaffe's."""
    raw = cv2.imread(str(filename), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise CaffeportError(f"cannot read image {filename}")
    scale = {np.dtype(np.uint16): 65535.0, np.dtype(np.uint8): 255.0}.get(raw.dtype, 1.0)
    img = raw.astype(np.float64) / scale  # skimage's img_as_float, in float64 as pycaffe
    if img.ndim == 3:
        img = img[:, :, :3][:, :, ::-1] if img.shape[2] >= 3 else img[:, :, :1]
    if not color:
        if img.ndim == 3 and img.shape[2] == 3:
            img = img @ np.array([0.2125, 0.7154, 0.0721])  # skimage rgb2gray
        img = img.reshape(img.shape[0], img.shape[1], 1)
    else:
        if img.ndim == 2:
            img = img[:, :, np.newaxis]
        if img.shape[2] == 1:
            img = np.tile(img, (1, 1, 3))
    return np.ascontiguousarray(img, dtype=np.float32)


def _warp_coords(n_out: int, n_in: int) -> np.ndarray:
    # skimage.transform.resize: output pixel centres mapped onto input pixel centres
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def _take_const(im: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``im[r, c]`` with 0 outside the image (skimage's mode='constant', cval=0)."""
    h, w = im.shape[:2]
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    out = im[np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)]
    return np.where(inside[..., None], out, 0.0)


def _skimage_resize(im: np.ndarray, h: int, w: int, order: int) -> np.ndarray:
    """scikit-image 0.13's ``resize(im, (h, w), order, mode='constant')`` for orders 0 and 1."""
    rr = _warp_coords(h, im.shape[0])[:, None] * np.ones((1, w))
    cc = _warp_coords(w, im.shape[1])[None, :] * np.ones((h, 1))
    if order == 0:  # C round(): half away from zero
        ri = (np.sign(rr) * np.floor(np.abs(rr) + 0.5)).astype(np.int64)
        ci = (np.sign(cc) * np.floor(np.abs(cc) + 0.5)).astype(np.int64)
        return _take_const(im, ri, ci)
    r0, c0 = np.floor(rr), np.floor(cc)
    r1, c1 = np.ceil(rr), np.ceil(cc)
    dr, dc = (rr - r0)[..., None], (cc - c0)[..., None]
    r0, c0, r1, c1 = (a.astype(np.int64) for a in (r0, c0, r1, c1))
    top = (1 - dc) * _take_const(im, r0, c0) + dc * _take_const(im, r0, c1)
    bottom = (1 - dc) * _take_const(im, r1, c0) + dc * _take_const(im, r1, c1)
    return (1 - dr) * top + dr * bottom


def _zoom_axis(im: np.ndarray, n_out: int, axis: int, order: int) -> np.ndarray:
    """scipy.ndimage.zoom along one axis as scipy < 1.6 did: corner-aligned coordinates
    ``i * (n_in - 1) / (n_out - 1)``."""
    n_in = im.shape[axis]
    x = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    if order == 0:
        idx = np.clip(np.floor(x + 0.5).astype(np.int64), 0, n_in - 1)
        return np.take(im, idx, axis=axis)
    i0 = np.clip(np.floor(x).astype(np.int64), 0, n_in - 1)
    i1 = np.clip(i0 + 1, 0, n_in - 1)
    shape = [1] * im.ndim
    shape[axis] = n_out
    t = (x - i0).reshape(shape)
    return np.take(im, i0, axis=axis) * (1 - t) + np.take(im, i1, axis=axis) * t


def resize_image(im: np.ndarray, new_dims: Any, interp_order: int = 1) -> np.ndarray:
    """Resize an H×W×K image to ``new_dims`` (H, W), as pycaffe does: for K = 1 or 3 the image is
    scaled to [0, 1], resized as scikit-image 0.13 does (pixel-centre mapping, pixels outside the
    image count as the image minimum, no anti-aliasing) and scaled back; a constant image stays
    constant; other K are zoomed as scipy.ndimage.zoom did (corner-aligned).

    ``interp_order`` 0 (nearest) and 1 (bilinear) are pycaffe's arithmetic; higher orders use
    OpenCV's bicubic interpolation, which differs from scikit-image's splines by small amounts."""
    h, w = int(new_dims[0]), int(new_dims[1])
    im = np.asarray(im)
    if im.ndim != 3:
        raise CompatValueError(f"resize_image expects an H x W x K image, got shape {im.shape}")
    if interp_order not in (0, 1):
        src = im.astype(np.float32)
        chans = [cv2.resize(np.ascontiguousarray(src[:, :, c]), (w, h), interpolation=cv2.INTER_CUBIC)
                 for c in range(src.shape[2])]
        return np.stack(chans, axis=2).astype(np.float32)
    if im.shape[-1] in (1, 3):
        im_min, im_max = im.min(), im.max()
        if not im_max > im_min:
            return np.full((h, w, im.shape[-1]), im_min, dtype=np.float32)
        # pycaffe's arithmetic: normalise in the image's dtype, resize in float64, scale back
        im_std = np.asarray((im - im_min) / (im_max - im_min), dtype=np.float64)
        resized = np.clip(_skimage_resize(im_std, h, w, interp_order), 0.0, 1.0)
        return (resized * (im_max - im_min) + im_min).astype(np.float32)
    out = _zoom_axis(im.astype(np.float64), h, 0, interp_order)
    return _zoom_axis(out, w, 1, interp_order).astype(np.float32)


def oversample(images: Any, crop_dims: Any) -> np.ndarray:
    """The 10 crops pycaffe's Classifier uses: 4 corners and centre, and their mirrors."""
    im_shape = np.array(images[0].shape)
    crop_dims = np.array(crop_dims)
    im_center = im_shape[:2] / 2.0
    h_idx = (0, im_shape[0] - crop_dims[0])
    w_idx = (0, im_shape[1] - crop_dims[1])
    crops_ix = np.empty((5, 4), dtype=int)
    k = 0
    for i in h_idx:
        for j in w_idx:
            crops_ix[k] = (i, j, i + crop_dims[0], j + crop_dims[1])
            k += 1
    crops_ix[4] = np.tile(im_center, (1, 2)) + np.concatenate([-crop_dims / 2.0, crop_dims / 2.0])
    crops_ix = np.tile(crops_ix, (2, 1))
    crops = np.empty((10 * len(images), crop_dims[0], crop_dims[1], im_shape[-1]), dtype=np.float32)
    ix = 0
    for im in images:
        for crop in crops_ix:
            crops[ix] = im[crop[0]:crop[2], crop[1]:crop[3], :]
            ix += 1
        crops[ix - 5:ix] = crops[ix - 5:ix, :, ::-1, :]
    return crops


class Transformer:
    """pycaffe's preprocessing for net inputs. ``preprocess`` applies, in this order: resize to the
    input's H×W → transpose → channel swap → raw scale → mean subtraction → input scale."""

    def __init__(self, inputs: dict[str, Any]):
        self.inputs = {k: tuple(v) for k, v in inputs.items()}
        self.transpose: dict[str, Any] = {}
        self.channel_swap: dict[str, Any] = {}
        self.raw_scale: dict[str, float] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.input_scale: dict[str, float] = {}

    def _check(self, in_: str) -> None:
        if in_ not in self.inputs:
            raise CaffeportError(f"{in_} is not one of the net inputs: {self.inputs}")

    def preprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """An H×W×K image as the net input ``in_`` wants it (K×H×W float32)."""
        self._check(in_)
        caffe_in = np.asarray(data).astype(np.float32, copy=False)
        in_dims = self.inputs[in_][2:]
        if caffe_in.shape[:2] != tuple(in_dims):
            caffe_in = resize_image(caffe_in, in_dims)
        if in_ in self.transpose:
            caffe_in = caffe_in.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            caffe_in = caffe_in[list(self.channel_swap[in_]), :, :]
        # each step rounds to float32, as pycaffe's in-place operations on a float32 array do
        if in_ in self.raw_scale:
            caffe_in = np.asarray(caffe_in * self.raw_scale[in_], dtype=np.float32)
        if in_ in self.mean:
            caffe_in = np.asarray(caffe_in - self.mean[in_], dtype=np.float32)
        if in_ in self.input_scale:
            caffe_in = np.asarray(caffe_in * self.input_scale[in_], dtype=np.float32)
        return np.ascontiguousarray(caffe_in, dtype=np.float32)

    def deprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """Undo :meth:`preprocess` (squeezed, float32)."""
        self._check(in_)
        decaf_in = np.array(data, dtype=np.float32).squeeze()
        if in_ in self.input_scale:
            decaf_in /= self.input_scale[in_]
        if in_ in self.mean:
            decaf_in += self.mean[in_]
        if in_ in self.raw_scale:
            decaf_in /= self.raw_scale[in_]
        if in_ in self.channel_swap:
            decaf_in = decaf_in[np.argsort(self.channel_swap[in_]), :, :]
        if in_ in self.transpose:
            decaf_in = decaf_in.transpose(np.argsort(self.transpose[in_]))
        return decaf_in

    def set_transpose(self, in_: str, order: Any) -> None:
        self._check(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise CaffeportError("Transpose order needs to have the same number of dimensions as the input.")
        self.transpose[in_] = tuple(order)

    def set_channel_swap(self, in_: str, order: Any) -> None:
        self._check(in_)
        if len(order) != self.inputs[in_][1]:
            raise CaffeportError("Channel swap needs to have the same number of dimensions as the input channels.")
        self.channel_swap[in_] = tuple(order)

    def set_raw_scale(self, in_: str, scale: float) -> None:
        self._check(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_: str, mean: np.ndarray) -> None:
        """Per-channel mean (C,) or a mean image (C,H,W); a mean image of another size is resized
        to the input's H×W as pycaffe does."""
        self._check(in_)
        mean = np.asarray(mean)  # kept in its dtype: preprocess subtracts it as pycaffe does
        ms = mean.shape
        if mean.ndim == 1:
            if ms[0] != self.inputs[in_][1]:
                raise CompatValueError("Mean channels incompatible with input.")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(ms) == 2:
                ms = (1,) + ms
                mean = mean.reshape(ms)
            if len(ms) != 3:
                raise CompatValueError("Mean shape invalid")
            if ms != tuple(self.inputs[in_][1:]):
                in_shape = self.inputs[in_][1:]
                m_min, m_max = mean.min(), mean.max()
                span = m_max - m_min
                normal = (mean - m_min) / span if span else np.zeros_like(mean, dtype=np.float64)
                mean = resize_image(normal.transpose((1, 2, 0)), in_shape[1:]).transpose((2, 0, 1)) * span + m_min
        self.mean[in_] = mean

    def set_input_scale(self, in_: str, scale: float) -> None:
        self._check(in_)
        self.input_scale[in_] = scale


def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
    """A BlobProto as a float64 array (as pycaffe's): legacy num/channels/height/width blobs come
    back 4-D, others in ``shape.dim``; a count that fits neither raises ValueError."""
    values = blob.diff if return_diff else blob.data
    arr = np.array(values, dtype=np.float64)
    legacy = blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") or blob.HasField("width")
    shape = (blob.num, blob.channels, blob.height, blob.width) if legacy else tuple(blob.shape.dim)
    if int(np.prod(shape, dtype=np.int64)) != arr.size:
        kind = "legacy num/channels/height/width" if legacy else "shape.dim"
        raise CompatValueError(f"BlobProto: {arr.size} {'diff' if return_diff else 'data'} values do not fit its "
                               f"{kind} {list(shape)}")
    return arr.reshape(shape)


def array_to_blobproto(arr: np.ndarray, diff: np.ndarray | None = None) -> caffe_pb2.BlobProto:
    """An N-d array (and optionally its diff, same shape) as a BlobProto with ``shape.dim``."""
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(np.shape(arr))
    blob.data.extend(np.asarray(arr, dtype=np.float32).ravel().tolist())
    if diff is not None:
        blob.diff.extend(np.asarray(diff, dtype=np.float32).ravel().tolist())
    return blob


def arraylist_to_blobprotovector_str(arraylist: list[np.ndarray]) -> bytes:
    """A list of arrays as a serialised BlobProtoVector."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend([array_to_blobproto(a) for a in arraylist])
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(s: bytes) -> list[np.ndarray]:
    """A serialised BlobProtoVector as a list of float64 arrays."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(s)
    return [blobproto_to_array(b) for b in vec.blobs]


def array_to_datum(arr: np.ndarray, label: int | None = None) -> caffe_pb2.Datum:
    """A C×H×W array as a Datum: uint8 arrays go to ``data`` bytes, others to ``float_data``."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise CompatValueError(f"Incorrect array shape: a Datum holds a 3-D C×H×W array, got shape {arr.shape}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = arr.shape
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(np.float32).ravel().tolist())
    if label is not None:
        datum.label = int(label)
    return datum


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    """The Datum's pixels as C×H×W (uint8 for ``data``, float for ``float_data``)."""
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
    return np.asarray(datum.float_data, dtype=np.float64).reshape(shape)
