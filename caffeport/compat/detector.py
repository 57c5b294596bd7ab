"""pycaffe's ``caffe.Detector``: R-CNN-style windowed detection, a TEST-phase Net that classifies
image windows (warped to the net input, optionally with context padding).

``Detector(model, weights, mean=None, input_scale=None, raw_scale=None, channel_swap=None,
context_pad=None)``; ``detect_windows([(image_file, windows), ...])`` returns one
``{'window', 'prediction', 'filename'}`` dict per window (windows are ``ymin, xmin, ymax, xmax``).

Where caffeport differs from pycaffe (BVLC ``python/caffe/detector.py``):

- ``detect_selective_search`` needs the ``selective_search_ijcv_with_python`` package (and MATLAB),
  as pycaffe does; without it it raises a CaffeportError instead of an ImportError.
- Context-padded crops round as pycaffe did under Python 2 (halves away from zero) and index with
  integers (pycaffe's float indices fail on current numpy).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from caffeport.compat import io as cio
from caffeport.compat._net import Net as _CompatNet
from caffeport.compat.classifier import input_transformer
from caffeport.errors import CaffeportError
from caffeport.layers.base import TEST

__all__ = ["Detector"]


def _round(x: float) -> int:
    """Python 2's round(): halves away from zero."""
    return int(math.copysign(math.floor(abs(float(x)) + 0.5), float(x)))


class Detector(_CompatNet):
    """A Net for windowed detection (see the module notes)."""

    def __init__(self, model_file: Any, pretrained_file: Any, mean: Any = None, input_scale: Any = None,
                 raw_scale: Any = None, channel_swap: Any = None, context_pad: Any = None) -> None:
        super().__init__(model_file, TEST, weights=pretrained_file)
        self.transformer = input_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows: Any) -> list[dict[str, Any]]:
        """Classify every window of every image; windows are warped to the net's input size."""
        images_windows = [(fname, list(windows)) for fname, windows in images_windows]
        window_inputs = []
        for image_fname, windows in images_windows:
            image = cio.load_image(image_fname).astype(np.float32)
            for window in windows:
                window_inputs.append(self.crop(image, np.asarray(window)))
        if not window_inputs:
            return []
        in_ = self.inputs[0]
        caffe_in = np.zeros((len(window_inputs), window_inputs[0].shape[2]) + tuple(self.blobs[in_].data.shape[2:]),
                            dtype=np.float32)
        for ix, window_in in enumerate(window_inputs):
            caffe_in[ix] = self.transformer.preprocess(in_, window_in)
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        detections = []
        ix = 0
        for image_fname, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[ix], "filename": image_fname})
                ix += 1
        return detections

    def detect_selective_search(self, image_fnames: Any) -> list[dict[str, Any]]:
        """Windows from Selective Search (the ``selective_search_ijcv_with_python`` package, MATLAB)."""
        try:
            import selective_search_ijcv_with_python as selective_search  # type: ignore[import-not-found]
        except ImportError:
            raise CaffeportError(
                "Detector.detect_selective_search needs the selective_search_ijcv_with_python package "
                "(https://github.com/sergeyk/selective_search_ijcv_with_python, which runs MATLAB); it is not "
                "installed. Compute windows another way and call detect_windows([(image, windows), ...])") from None
        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows_list = selective_search.get_windows(image_fnames, cmd="selective_search_rcnn")
        return self.detect_windows(zip(image_fnames, windows_list))

    def crop(self, im: np.ndarray, window: Any) -> np.ndarray:
        """The window ``(ymin, xmin, ymax, xmax)`` of an H×W×K image; with ``context_pad``, the box
        grown so that ``context_pad`` pixels of the net input are context, out-of-image parts filled
        with the mean (R-CNN's warp)."""
        window = np.asarray(window)
        crop = im[int(window[0]):int(window[2]), int(window[1]):int(window[3])]
        if not self.context_pad:
            return crop
        box = window.astype(np.float64)
        crop_size = self.blobs[self.inputs[0]].width  # assumes square inputs, as pycaffe
        scale = crop_size / (1.0 * crop_size - self.context_pad * 2)
        half_h = (box[2] - box[0] + 1) / 2.0
        half_w = (box[3] - box[1] + 1) / 2.0
        center = (box[0] + half_h, box[1] + half_w)
        scaled_dims = scale * np.array((-half_h, -half_w, half_h, half_w))
        box = np.array([_round(v) for v in np.tile(center, 2) + scaled_dims], dtype=np.float64)
        full_h = box[2] - box[0] + 1
        full_w = box[3] - box[1] + 1
        scale_h = crop_size / full_h
        scale_w = crop_size / full_w
        pad_y = _round(max(0, -box[0]) * scale_h)  # out-of-image amount
        pad_x = _round(max(0, -box[1]) * scale_w)
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        clip_h = box[2] - box[0] + 1
        clip_w = box[3] - box[1] + 1
        if not (clip_h > 0 and clip_w > 0):
            raise CaffeportError(f"Detector.crop: window {list(window)} lies outside the {im_h}x{im_w} image")
        crop_h = _round(clip_h * scale_h)
        crop_w = _round(clip_w * scale_w)
        if pad_y + crop_h > crop_size:
            crop_h = crop_size - pad_y
        if pad_x + crop_w > crop_size:
            crop_w = crop_size - pad_x
        b = [int(v) for v in box]
        context_crop = cio.resize_image(im[b[0]:b[2], b[1]:b[3]], (crop_h, crop_w))
        out = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        out[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context_crop
        return out

    def configure_crop(self, context_pad: Any) -> None:
        """Crop size (H, W, K of the net input) and context padding; with padding, the mean in
        unprocessed (H×W×K, un-swapped, un-scaled) space fills the out-of-image parts."""
        in_ = self.inputs[0]
        tpose = self.transformer.transpose[in_]
        inv_tpose = [tpose[t] for t in tpose]
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[inv_tpose]
        self.context_pad = context_pad
        if not self.context_pad:
            return
        transpose = self.transformer.transpose.get(in_)
        channel_order = self.transformer.channel_swap.get(in_)
        raw_scale = self.transformer.raw_scale.get(in_)
        mean = self.transformer.mean.get(in_)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        inv_transpose = [transpose[t] for t in transpose]
        crop_mean = np.array(mean, dtype=np.float64).transpose(inv_transpose)
        if channel_order is not None:
            channel_order = list(channel_order)
            crop_mean = crop_mean[:, :, [channel_order.index(i) for i in range(crop_mean.shape[2])]]
        if raw_scale is not None:
            crop_mean = crop_mean / raw_scale
        self.crop_mean = crop_mean
