"""caffe.coord_map: BVLC python/caffe/test/test_coord_map.py ported (same nets, same assertions;
the random pads/offsets are looped over instead), plus hand-derived maps and the crop offsets
FCN's pycaffe-written voc-fcn8s nets record (see test_net_spec.py)."""

from __future__ import annotations

import numpy as np
import pytest

import caffeport.compat as caffe
from caffeport.compat import layers as L
from caffeport.compat import params as P
from caffeport.compat.coord_map import coord_map_from_to, crop
from caffeport.errors import CaffeportError


def coord_net_spec(ks=3, stride=1, pad=0, pool=2, dstride=2, dpad=0):
    """conv-pool-deconv, as BVLC's test."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 100, 100]))
    n.aux = L.Input(shape=dict(dim=[2, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=ks, stride=stride, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool, pad=0)
    deconv_ks = [s * 2 for s in dstride] if isinstance(dstride, list) else dstride * 2
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=deconv_ks, stride=dstride, pad=dpad)
    return n


def test_conv_pool_deconv() -> None:
    n = coord_net_spec()
    ax, a, b = coord_map_from_to(n.deconv, n.data)  # identity for 2x pool, 2x deconv
    assert (ax, a, b) == (1, 1, 0)
    n = coord_net_spec(pool=4, dstride=4)  # shift by one for 4x pool, 4x deconv
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert (ax, a, b) == (1, 1, -1)


def test_pass() -> None:
    n = coord_net_spec()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    n.relu = L.ReLU(n.deconv)
    n.conv1x1 = L.Convolution(n.relu, num_output=10, kernel_size=1, stride=1, pad=0)
    for top in [n.relu, n.conv1x1]:
        ax_pass, a_pass, b_pass = coord_map_from_to(top, n.data)
        assert (ax, a, b) == (ax_pass, a_pass, b_pass)


@pytest.mark.parametrize("pad", [0, 1, 4, 10])
def test_padding(pad: int) -> None:
    n = coord_net_spec()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    n = coord_net_spec(pad=pad)  # conv padding adds offset
    _, a_pad, b_pad = coord_map_from_to(n.deconv, n.data)
    assert a == a_pad and b - pad == b_pad
    n = coord_net_spec(dpad=pad)  # deconv padding subtracts it
    _, a_pad, b_pad = coord_map_from_to(n.deconv, n.data)
    assert a == a_pad and b + pad == b_pad
    n = coord_net_spec(pad=pad, dpad=pad)  # both cancel out
    _, a_pad, b_pad = coord_map_from_to(n.deconv, n.data)
    assert a == a_pad and b == b_pad


def test_multi_conv() -> None:
    n = coord_net_spec()
    n.conv_data, n.conv_aux = L.Convolution(n.data, n.aux, ntop=2, num_output=10, kernel_size=5, stride=2, pad=0)
    ax1, a1, b1 = coord_map_from_to(n.conv_data, n.data)
    ax2, a2, b2 = coord_map_from_to(n.conv_aux, n.aux)
    assert (ax1, a1, b1) == (ax2, a2, b2)


def test_rect() -> None:
    n3x3 = coord_net_spec(ks=3, stride=1, pad=0)
    n5x5 = coord_net_spec(ks=5, stride=2, pad=10)
    n3x5 = coord_net_spec(ks=[3, 5], stride=[1, 2], pad=[0, 10])
    ax_3x3, a_3x3, b_3x3 = coord_map_from_to(n3x3.deconv, n3x3.data)
    ax_5x5, a_5x5, b_5x5 = coord_map_from_to(n5x5.deconv, n5x5.data)
    ax_3x5, a_3x5, b_3x5 = coord_map_from_to(n3x5.deconv, n3x5.data)
    assert ax_3x3 == ax_5x5 == ax_3x5
    assert a_3x3 == a_3x5[0] and b_3x3 == b_3x5[0]
    assert a_5x5 == a_3x5[1] and b_5x5 == b_3x5[1]


def test_nd_conv() -> None:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 100, 100, 100]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=[3, 3, 3], stride=[1, 1, 1], pad=[0, 1, 2])
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2, pad=0)
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=4, stride=2, pad=0)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert ax == 1
    assert len(a) == len(b)
    assert np.all(a == 1)
    assert b[0] - 1 == b[1] and b[1] - 1 == b[2]


@pytest.mark.parametrize("offset", [0, 3, 10])
def test_crop_of_crop(offset: int) -> None:
    n = coord_net_spec()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    n.crop = L.Crop(n.deconv, n.data, axis=2, offset=offset)
    ax_crop, a_crop, b_crop = coord_map_from_to(n.crop, n.data)
    assert ax == ax_crop and a == a_crop and b + offset == b_crop


def test_crop_helper() -> None:
    n = coord_net_spec()
    top = crop(n.deconv, n.data)
    assert top.fn.type_name == "Crop" and top.fn.inputs == (n.deconv, n.data)
    assert top.fn.params == {"crop_param": {"axis": 2, "offset": [0]}}


def test_catch_unconnected() -> None:
    n = coord_net_spec()
    n.ip = L.InnerProduct(n.deconv, num_output=10)
    with pytest.raises(RuntimeError):
        coord_map_from_to(n.ip, n.data)


def test_catch_scale_mismatch() -> None:
    n = coord_net_spec(pool=3, dstride=2)  # pool 3x but deconv 2x
    with pytest.raises(AssertionError):
        crop(n.deconv, n.data)


def test_catch_negative_crop() -> None:
    n = coord_net_spec(dpad=10)  # output smaller than input
    with pytest.raises(AssertionError):
        crop(n.deconv, n.data)


# --- beyond BVLC's test ---------------------------------------------------------------------------

def test_maps_by_hand() -> None:
    """Convolution k=5 s=2 p=1 then dilated k=3 d=2 p=0 (extent 5): y1 = (x + 1 - 2) / 2 and
    y2 = y1 - 2, so c2 -> data is x = 2 * y2 + 5 and data -> c2 is y2 = x / 2 - 2.5."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 50, 50]))
    n.c1 = L.Convolution(n.data, num_output=1, kernel_size=5, stride=2, pad=1)
    n.c2 = L.Convolution(n.c1, num_output=1, convolution_param=dict(kernel_size=3, dilation=2, pad=0))
    ax, a, b = coord_map_from_to(n.c2, n.data)
    assert ax == 1 and a == 2 and b == 5
    ax, a, b = coord_map_from_to(n.data, n.c2)
    assert ax == 1 and a == 0.5 and b == -2.5


def test_crop_errors_are_caffeport_errors() -> None:
    n = coord_net_spec(dpad=10)
    with pytest.raises(CaffeportError, match="cannot crop negative offset"):
        crop(n.deconv, n.data)
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 8, 8]))
    n.conv = L.Convolution(n.data, num_output=1, kernel_h=3, kernel_w=3)
    with pytest.raises(CaffeportError, match="legacy _h/_w"):
        coord_map_from_to(n.conv, n.data)
