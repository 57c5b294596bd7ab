"""pycaffe's ``caffe.io``: image loading, the ``Transformer``, and blob/datum conversions.

pycaffe loads and resizes with scikit-image; caffeport uses OpenCV with the same conventions
(``load_image`` returns RGB float32 in [0, 1], H×W×C; grey conversion uses skimage's luminance
weights). ``resize_image`` interpolates with OpenCV, so resized pixels can differ from pycaffe's by
interpolation rounding; everything else is exact.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2

__all__ = [
    "load_image", "resize_image", "oversample", "Transformer", "blobproto_to_array", "array_to_blobproto",
    "arraylist_to_blobprotovector_str", "blobprotovector_str_to_arraylist", "array_to_datum", "datum_to_array",
]


def load_image(filename: str, color: bool = True) -> np.ndarray:
    """Image as float32 in [0, 1], H×W×3 RGB (``color``) or H×W×1 grey, like pycaffe's."""
    raw = cv2.imread(str(filename), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise CaffeportError(f"cannot read image {filename}")
    scale = 65535.0 if raw.dtype == np.uint16 else 255.0
    img = raw.astype(np.float32) / scale
    if img.ndim == 3:
        img = img[:, :, :3][:, :, ::-1] if img.shape[2] >= 3 else img[:, :, :1]
    if not color:
        if img.ndim == 3 and img.shape[2] == 3:
            img = img @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)  # skimage rgb2gray
        img = img.reshape(img.shape[0], img.shape[1], 1)
    else:
        if img.ndim == 2:
            img = img[:, :, np.newaxis]
        if img.shape[2] == 1:
            img = np.tile(img, (1, 1, 3))
    return np.ascontiguousarray(img, dtype=np.float32)


def resize_image(im: np.ndarray, new_dims: Any, interp_order: int = 1) -> np.ndarray:
    """Resize H×W×K to ``new_dims`` (H, W) (bilinear for interp_order 1, nearest for 0, cubic else)."""
    h, w = int(new_dims[0]), int(new_dims[1])
    interp = {0: cv2.INTER_NEAREST, 1: cv2.INTER_LINEAR}.get(interp_order, cv2.INTER_CUBIC)
    im = np.asarray(im, dtype=np.float32)
    chans = [cv2.resize(np.ascontiguousarray(im[:, :, c]), (w, h), interpolation=interp) for c in range(im.shape[2])]
    return np.stack(chans, axis=2).astype(np.float32)


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
        self._check(in_)
        caffe_in = np.asarray(data).astype(np.float32, copy=False)
        in_dims = self.inputs[in_][2:]
        if caffe_in.shape[:2] != tuple(in_dims):
            caffe_in = resize_image(caffe_in, in_dims)
        if in_ in self.transpose:
            caffe_in = caffe_in.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            caffe_in = caffe_in[list(self.channel_swap[in_]), :, :]
        if in_ in self.raw_scale:
            caffe_in = caffe_in * self.raw_scale[in_]
        if in_ in self.mean:
            caffe_in = caffe_in - self.mean[in_]
        if in_ in self.input_scale:
            caffe_in = caffe_in * self.input_scale[in_]
        return caffe_in.astype(np.float32, copy=False)

    def deprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
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
        mean = np.asarray(mean, dtype=np.float32)
        ms = mean.shape
        if mean.ndim == 1:
            if ms[0] != self.inputs[in_][1]:
                raise CaffeportError("Mean channels incompatible with input.")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(ms) == 2:
                ms = (1,) + ms
                mean = mean.reshape(ms)
            if len(ms) != 3:
                raise CaffeportError("Mean shape invalid")
            if ms != tuple(self.inputs[in_][1:]):
                in_shape = self.inputs[in_][1:]
                m_min, m_max = float(mean.min()), float(mean.max())
                span = (m_max - m_min) or 1.0
                normal = (mean - m_min) / span
                mean = resize_image(normal.transpose((1, 2, 0)), in_shape[1:]).transpose((2, 0, 1)) * span + m_min
        self.mean[in_] = mean

    def set_input_scale(self, in_: str, scale: float) -> None:
        self._check(in_)
        self.input_scale[in_] = scale


def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
    """A BlobProto as an array: legacy num/channels/height/width blobs come back 4-D."""
    values = blob.diff if return_diff else blob.data
    arr = np.asarray(values, dtype=np.float32)
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") or blob.HasField("width"):
        return arr.reshape(blob.num, blob.channels, blob.height, blob.width)
    return arr.reshape(tuple(blob.shape.dim))


def array_to_blobproto(arr: np.ndarray, diff: np.ndarray | None = None) -> caffe_pb2.BlobProto:
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(np.shape(arr))
    blob.data.extend(np.asarray(arr, dtype=np.float32).ravel().tolist())
    if diff is not None:
        blob.diff.extend(np.asarray(diff, dtype=np.float32).ravel().tolist())
    return blob


def arraylist_to_blobprotovector_str(arraylist: list[np.ndarray]) -> bytes:
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend([array_to_blobproto(a) for a in arraylist])
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(s: bytes) -> list[np.ndarray]:
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(s)
    return [blobproto_to_array(b) for b in vec.blobs]


def array_to_datum(arr: np.ndarray, label: int | None = None) -> caffe_pb2.Datum:
    """A C×H×W array as a Datum: uint8 arrays go to ``data`` bytes, others to ``float_data``."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise CaffeportError("Incorrect array shape: a Datum holds a 3-D C×H×W array")
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
