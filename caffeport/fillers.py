"""Caffe's weight fillers (``include/caffe/filler.hpp``).

Differences from ``torch.nn.init`` that matter:

- A missing FillerParameter means ``constant`` with value 0 (not PyTorch's kaiming default).
- ``xavier`` is U(-sqrt(3/n), sqrt(3/n)) with n = fan_in = count/shape[0] by default
  (``variance_norm`` FAN_OUT uses count/shape[1], AVERAGE their mean) - not fan_in+fan_out.
- ``msra`` is N(0, sqrt(2/n)) with the same n.
- ``gaussian`` with ``sparse`` keeps each weight with probability sparse/num_outputs.
- Random values come from torch's generator (seeded by the solver's ``random_seed``); Caffe's own
  RNG stream cannot be reproduced, so only the distributions match.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2

_NORM = caffe_pb2.FillerParameter


def _fans(shape: tuple[int, ...]) -> tuple[float, float]:
    count = math.prod(shape)
    fan_in = count / shape[0] if len(shape) > 0 and shape[0] else count
    fan_out = count / shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def _n(shape: tuple[int, ...], f: Any) -> float:
    fan_in, fan_out = _fans(shape)
    if f.variance_norm == _NORM.FAN_OUT:
        return fan_out
    if f.variance_norm == _NORM.AVERAGE:
        return (fan_in + fan_out) / 2.0
    return fan_in


def fill(shape: tuple[int, ...], filler: Any | None = None) -> torch.Tensor:
    """A float32 tensor of ``shape`` filled as Caffe's filler ``filler`` (a FillerParameter) would."""
    f = filler if filler is not None else caffe_pb2.FillerParameter()
    kind = f.type or "constant"
    out = torch.empty(shape, dtype=torch.float32)
    if out.numel() == 0:
        return out
    if kind == "constant":
        out.fill_(f.value)
    elif kind == "gaussian":
        out.normal_(f.mean, f.std)
        if f.sparse >= 0:
            # Each weight survives with probability sparse / num_outputs (num_outputs = shape[0]).
            if len(shape) < 2:
                raise CaffeportError("gaussian filler with sparse needs a blob of at least 2 axes")
            num_outputs = shape[0]
            keep = torch.bernoulli(torch.full(shape, min(1.0, f.sparse / num_outputs)))
            out.mul_(keep)
    elif kind == "uniform":
        out.uniform_(f.min, f.max)
    elif kind == "xavier":
        scale = math.sqrt(3.0 / _n(shape, f))
        out.uniform_(-scale, scale)
    elif kind == "msra":
        out.normal_(0.0, math.sqrt(2.0 / _n(shape, f)))
    elif kind == "positive_unitball":
        out.uniform_(0.0, 1.0)
        flat = out.reshape(shape[0], -1)
        flat.div_(flat.sum(dim=1, keepdim=True))
    elif kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise CaffeportError(f"bilinear filler needs a 4-D blob with square kernels, got {shape}")
        k = shape[3]
        factor = math.ceil(k / 2.0)
        c = (2 * factor - 1 - factor % 2) / (2.0 * factor)
        idx = torch.arange(k, dtype=torch.float64)
        w1 = 1 - torch.abs(idx / factor - c)
        kernel = (w1[:, None] * w1[None, :]).to(torch.float32)
        out.copy_(kernel.expand(shape))
    else:
        raise CaffeportError(
            f"unknown filler type {kind!r} (Caffe knows constant, gaussian, uniform, xavier, msra, "
            "positive_unitball, bilinear)"
        )
    return out
