"""pycaffe's ``caffe.coord_map``: how the spatial coordinates of two NetSpec tops relate, and
``crop(top_from, top_to)``, the Crop layer that aligns them (FCN's skip connections).

A map is ``(axis, scale, shift)``: output coordinate ``i * scale + shift`` comes from input
coordinate ``i`` (scale/shift are numpy arrays, one entry per spatial axis). The rules are
BVLC ``python/caffe/coord_map.py``'s: Convolution/Pooling/Im2col shrink by the stride and shift by
``pad - (k_eff - 1) / 2``, Deconvolution the inverse, Crop shifts by ``-offset``, the pointwise
layers in :data:`PASS_THROUGH_LAYERS` keep coordinates, anything else ends the walk.

The maps are read from the NetSpec keyword arguments, as pycaffe does (``kernel_size``, ``stride``,
``pad``, ``dilation``, ``axis`` at top level or inside ``convolution_param`` / ``crop_param``).
Errors are :class:`CaffeportError`s that are also the exceptions pycaffe raises (AssertionError for
an impossible crop, RuntimeError for unconnected tops).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from caffeport.compat.net_spec import Function, Top
from caffeport.compat.net_spec import layers as L
from caffeport.errors import CaffeportError

__all__ = ["PASS_THROUGH_LAYERS", "conv_params", "crop_params", "coord_map", "compose", "inverse",
           "coord_map_from_to", "crop", "UndefinedMapException", "AxisMismatchException"]

PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU", "Log", "LRN", "Exp",
                       "MVN", "Power", "ReLU", "PReLU", "Scale", "Sigmoid", "Split", "TanH", "Threshold"]

Map = tuple[Any, Any, Any]


class UndefinedMapException(Exception):
    """The layer has no coordinate mapping (e.g. InnerProduct); the walk stops there."""


class AxisMismatchException(CaffeportError):
    """Two maps on different axes cannot be composed."""


class CoordMapAssertionError(CaffeportError, AssertionError):
    """A crop that cannot be made (pycaffe asserts)."""


class CoordMapRuntimeError(CaffeportError, RuntimeError):
    """The two tops share no spatially mapped ancestor (pycaffe raises RuntimeError)."""


def _layer_params(fn: Function, sub: str) -> dict[str, Any]:
    params = fn.params.get(sub, fn.params)
    if not isinstance(params, dict):
        raise CaffeportError(f"{fn.type_name} layer: {sub} must be a dict to map coordinates, got {params!r}")
    return params


def conv_params(fn: Function) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(axis, stride, effective kernel extent, pad)`` of a Convolution/Deconvolution/Im2col/Pooling
    function; the legacy ``*_h``/``*_w`` fields are refused, as in pycaffe."""
    params = _layer_params(fn, "convolution_param")
    legacy = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"}
    if legacy & (set(fn.params) | set(params)):
        raise CoordMapAssertionError(
            f"{fn.type_name} layer: cropping does not support legacy _h/_w params "
            f"({', '.join(sorted(legacy & (set(fn.params) | set(params))))})")
    if "kernel_size" not in params:
        raise CaffeportError(f"{fn.type_name} layer: coordinate mapping needs kernel_size")
    axis = params.get("axis", 1)
    ks = np.array(params["kernel_size"], ndmin=1)
    dilation = np.array(params.get("dilation", 1), ndmin=1)
    return (axis, np.array(params.get("stride", 1), ndmin=1), (ks - 1) * dilation + 1,
            np.array(params.get("pad", 0), ndmin=1))


def crop_params(fn: Function) -> tuple[int, np.ndarray]:
    """``(axis, offset)`` of a Crop function (axis defaults to 2, the first spatial axis)."""
    params = _layer_params(fn, "crop_param")
    return params.get("axis", 2), np.array(params.get("offset", 0), ndmin=1)


def coord_map(fn: Function) -> Map:
    """The ``(axis, scale, shift)`` map of one layer; ``(None, 1, 0)`` for pointwise layers."""
    if fn.type_name in ("Convolution", "Pooling", "Im2col"):
        axis, stride, ks, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (ks - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, ks, pad = conv_params(fn)
        return axis, stride, (ks - 1) / 2 - pad
    if fn.type_name in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if fn.type_name == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset  # -1: the last non-coordinate axis
    raise UndefinedMapException(fn.type_name)


def compose(base_map: Map, next_map: Map) -> Map:
    """``base`` then ``next``: scales multiply, next's shift is scaled by base's scale."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is None:
        ax = ax2
    elif ax2 is None or ax1 == ax2:
        ax = ax1
    else:
        raise AxisMismatchException(f"coordinate maps on different axes ({ax1} and {ax2}) cannot be composed")
    return ax, a1 * a2, a1 * b2 + b1


def inverse(cmap: Map) -> Map:
    """The map back from output to input coordinates."""
    ax, a, b = cmap
    return ax, 1 / a, -b / a


def _mapped_bottoms(top: Top) -> tuple[Top, ...]:
    # Crop maps only its first bottom; the second gives the size.
    bottoms = tuple(top.fn.inputs)
    return bottoms[:1] if top.fn.type_name == "Crop" else bottoms


def _walk(start: Top) -> dict[Top, Map]:
    maps: dict[Top, Map] = {start: (None, 1, 0)}
    frontier = [start]
    while frontier:
        top = frontier.pop(0)
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mapped_bottoms(top):
            maps[bottom] = compose(maps[top], step)
            frontier.append(bottom)
    return maps


def coord_map_from_to(top_from: Top, top_to: Top) -> Map:
    """The map from ``top_from``'s coordinates to ``top_to``'s, through their nearest common
    ancestor (walking bottoms through mapped layers)."""
    from_maps = _walk(top_from)
    to_maps: dict[Top, Map] = {top_to: (None, 1, 0)}
    frontier = [top_to]
    while frontier:
        top = frontier.pop(0)
        if top in from_maps:
            return compose(to_maps[top], inverse(from_maps[top]))
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mapped_bottoms(top):
            to_maps[bottom] = compose(to_maps[top], step)
            frontier.append(bottom)
    raise CoordMapRuntimeError("Could not compute map between tops; are they connected by spatial layers?")


def crop(top_from: Top, top_to: Top) -> Top:
    """A Crop layer cropping ``top_from`` to ``top_to`` (axis and offsets from their coordinate map)."""
    ax, a, b = coord_map_from_to(top_from, top_to)
    a, b = np.atleast_1d(a), np.atleast_1d(b)
    if not (a == 1).all():
        raise CoordMapAssertionError(f"scale mismatch on crop (a = {a})")
    if not (b <= 0).all():
        raise CoordMapAssertionError(f"cannot crop negative offset (b = {b})")
    if not (np.round(b) == b).all():
        raise CoordMapAssertionError(f"cannot crop noninteger offset (b = {b})")
    if ax is None:
        raise CoordMapAssertionError("crop between tops related only by pointwise layers: no axis to crop")
    offset = [int(v) for v in -np.round(b).astype(int)]
    return L.Crop(top_from, top_to, crop_param=dict(axis=int(ax) + 1, offset=offset))
