"""Caffe's weight fillers (``include/caffe/filler.hpp``).

Differences from ``torch.nn.init`` that matter:

- A missing FillerParameter means ``constant`` with value 0 (not PyTorch's kaiming default).
- ``xavier`` is U(-sqrt(3/n), sqrt(3/n)) with n = fan_in = count/shape[0] by default
  (``variance_norm`` FAN_OUT uses count/shape[1] - count itself for a 1-axis blob - and AVERAGE
  their mean) - not fan_in+fan_out as in ``xavier_uniform_``.
- ``msra`` is N(0, sqrt(2/n)) with the same n.
- ``gaussian`` with ``sparse`` >= 0 keeps each weight with probability sparse/shape[0]
  (Caffe aborts when that exceeds 1); ``std`` must be > 0.
- ``positive_unitball`` draws U(0, 1) then divides each of the shape[0] rows by its sum.
- ``bilinear`` (4-D, square kernels) is computed in float32 exactly as Caffe does.
- Only ``gaussian`` accepts ``sparse``; Caffe aborts for the others, so do we.
- Random values come from torch's generator (seeded by the solver's ``random_seed``); Caffe's own
  RNG stream cannot be reproduced, so only the distributions match.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2

_NORM = caffe_pb2.FillerParameter

KNOWN = ("constant", "gaussian", "positive_unitball", "uniform", "xavier", "msra", "bilinear")


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Caffe's (fan_in, fan_out): count/num() and count/channels() with legacy axis rules
    (a missing axis counts as 1)."""
    count = math.prod(shape)
    num = shape[0] if len(shape) > 0 else 1
    channels = shape[1] if len(shape) > 1 else 1
    return count // num if num else 0, count // channels if channels else 0


def _n(shape: tuple[int, ...], f: Any) -> float:
    fan_in, fan_out = fans(shape)
    if f.variance_norm == _NORM.FAN_OUT:
        return float(fan_out)
    if f.variance_norm == _NORM.AVERAGE:
        return (fan_in + fan_out) / 2.0
    return float(fan_in)


def bilinear_kernel(k: int) -> np.ndarray:
    """The (k, k) bilinear upsampling kernel of Caffe's BilinearFiller, in float32 arithmetic."""
    f = math.ceil(k / 2.0)
    c = np.float32((2 * f - 1 - f % 2) / (2.0 * f))
    x = np.arange(k, dtype=np.float32)
    w1 = np.float32(1) - np.abs(x / np.float32(f) - c)
    return (w1[None, :] * w1[:, None]).astype(np.float32)  # [y, x]


def fill(shape: tuple[int, ...], filler: Any | None = None,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """A float32 tensor of ``shape`` filled as Caffe's filler ``filler`` (a FillerParameter) would."""
    f = filler if filler is not None else caffe_pb2.FillerParameter()
    kind = f.type or "constant"
    shape = tuple(int(s) for s in shape)
    out = torch.empty(shape, dtype=torch.float32)
    if kind not in KNOWN:
        raise CaffeportError(f"unknown filler type {kind!r} (Caffe knows {', '.join(KNOWN)})")
    if f.sparse != -1 and kind != "gaussian":
        raise CaffeportError(f"filler {kind!r}: sparsity (sparse: {f.sparse}) is only supported by 'gaussian'")
    if out.numel() == 0:
        return out
    g = generator
    if kind == "constant":
        out.fill_(f.value)
    elif kind == "gaussian":
        if not f.std > 0:
            raise CaffeportError(f"gaussian filler needs std > 0 (got {f.std})")
        out.normal_(f.mean, f.std, generator=g)
        if f.sparse < -1:
            raise CaffeportError(f"gaussian filler: sparse must be >= -1 (got {f.sparse})")
        if f.sparse >= 0:
            # Each weight survives with probability sparse / num_outputs (num_outputs = shape[0]).
            p = f.sparse / shape[0]
            if p > 1:
                raise CaffeportError(
                    f"gaussian filler: sparse {f.sparse} exceeds the number of outputs {shape[0]} of blob {shape}"
                )
            keep = torch.rand(shape, generator=g) < p
            out.mul_(keep)
    elif kind == "uniform":
        if f.min > f.max:
            raise CaffeportError(f"uniform filler needs min <= max (got min {f.min}, max {f.max})")
        out.uniform_(f.min, f.max, generator=g)
    elif kind == "xavier":
        scale = math.sqrt(3.0 / _n(shape, f))
        out.uniform_(-scale, scale, generator=g)
    elif kind == "msra":
        out.normal_(0.0, math.sqrt(2.0 / _n(shape, f)), generator=g)
    elif kind == "positive_unitball":
        out.uniform_(0.0, 1.0, generator=g)
        flat = out.reshape(shape[0], -1)
        flat.div_(flat.sum(dim=1, keepdim=True))
    elif kind == "bilinear":
        if len(shape) != 4:
            raise CaffeportError(f"bilinear filler: blob must be 4 dim, got shape {shape}")
        if shape[2] != shape[3]:
            raise CaffeportError(f"bilinear filler: filter must be square, got shape {shape}")
        out.copy_(torch.from_numpy(bilinear_kernel(shape[3])).expand(shape))
    return out
