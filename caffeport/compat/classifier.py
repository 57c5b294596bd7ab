"""pycaffe's ``caffe.Classifier``: a deploy net plus preprocessing and 10-crop oversampling."""

from __future__ import annotations

from typing import Any

import numpy as np

from caffeport.compat import io as cio
from caffeport.compat._net import Net
from caffeport.layers.base import TEST


def input_transformer(net: Net, mean: Any = None, input_scale: Any = None, raw_scale: Any = None,
                      channel_swap: Any = None) -> cio.Transformer:
    """The Transformer pycaffe's Classifier and Detector set up for the net's first input: H×W×C
    images transposed to C×H×W, then the optional mean, input scale, raw scale and channel swap."""
    in_ = net.inputs[0]
    t = cio.Transformer({in_: net.blobs[in_].shape})
    t.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        t.set_mean(in_, mean)
    if input_scale is not None:
        t.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        t.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        t.set_channel_swap(in_, channel_swap)
    return t

class Classifier(Net):
    """``Classifier(model, pretrained, image_dims=None, mean=None, input_scale=None, raw_scale=None,
    channel_swap=None)``, a ``caffe.Net`` (TEST phase) as in pycaffe; ``predict(images,
    oversample=True)`` returns class probabilities (averaged over the 10 crops when oversampling).
    ``self.net`` is the Classifier itself (kept for scripts written against older wrappers)."""

    def __init__(self, model_file: str, pretrained_file: str, image_dims: Any = None, mean: Any = None,
                 input_scale: Any = None, raw_scale: Any = None, channel_swap: Any = None):
        Net.__init__(self, model_file, pretrained_file, TEST)
        in_ = self.inputs[0]
        self.transformer = input_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[in_].shape[2:])
        self.image_dims = np.array(image_dims) if image_dims is not None else self.crop_dims

    @property
    def net(self) -> Classifier:
        return self

    def predict(self, inputs: Any, oversample: bool = True) -> np.ndarray:
        input_ = np.zeros((len(inputs), self.image_dims[0], self.image_dims[1], inputs[0].shape[2]), dtype=np.float32)
        for ix, in_ in enumerate(inputs):
            input_[ix] = cio.resize_image(in_, self.image_dims)
        if oversample:
            input_ = cio.oversample(input_, self.crop_dims)
        else:
            center = np.array(self.image_dims) / 2.0
            crop = np.tile(center, (1, 2))[0] + np.concatenate([-self.crop_dims / 2.0, self.crop_dims / 2.0])
            crop = crop.astype(int)
            input_ = input_[:, crop[0]:crop[2], crop[1]:crop[3], :]
        in_name = self.inputs[0]
        caffe_in = np.zeros(np.array(input_.shape)[[0, 3, 1, 2]], dtype=np.float32)
        for ix, in_ in enumerate(input_):
            caffe_in[ix] = self.transformer.preprocess(in_name, in_)
        out = self.forward_all(**{in_name: caffe_in})
        predictions = out[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions
