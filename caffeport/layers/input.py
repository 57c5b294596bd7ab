"""The ``Input`` layer: net inputs fed from outside (Caffe 1.0's replacement of ``input_dim``)."""

from __future__ import annotations

import torch

from caffeport.layers.base import Layer, Shape, blob_shape, register


@register("Input")
class Input(Layer):
    """Declares net inputs with ``input_param.shape`` (one shape for all tops, or one per top).

    The net feeds these blobs (``net.blobs[name].data[...] = x`` or ``net.forward(name=x)``);
    ``forward`` is never called with data. Its tops are pycaffe's ``net.inputs``.
    """

    is_input = True
    max_bottoms = 0
    min_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        shapes = [blob_shape(s) for s in self.param.input_param.shape]
        n = len(self.param.top)
        if len(shapes) not in (1, n):
            raise self.error(f"input_param has {len(shapes)} shapes for {n} tops (need 1 or {n})")
        self.shapes = shapes * n if len(shapes) == 1 else shapes

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return list(self.shapes)

    def forward(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(s) for s in self.shapes)
