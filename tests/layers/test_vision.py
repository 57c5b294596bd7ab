"""Vision and detection layers beyond the golden cases: numpy transcriptions of Caffe's loops
(pooling windows and divisors, im2col, direct (de)convolution, ROI pooling), finite-difference
gradient checks in float64 (as Caffe's GradientChecker), and parameter validation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from caffeport.errors import CaffeportError
from caffeport.layers.base import TRAIN
from tests.layers.helpers import make

RNG = np.random.default_rng(7)
FLT_MAX = float(np.finfo(np.float32).max)


def randn(*shape) -> np.ndarray:
    return RNG.standard_normal(shape)


def gradcheck(layer, inputs: list[np.ndarray], params: bool = True) -> None:
    """Finite differences vs autograd (float64) wrt every input and, if asked, every parameter blob."""
    layer = layer.double()
    xs = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in inputs]
    names = [f"blobs.{i}" for i in range(len(layer.blobs))] if params else []
    ps = [layer.blobs[i].detach().clone().requires_grad_(True) for i in range(len(names))]

    def f(*args):
        return torch.func.functional_call(layer, dict(zip(names, args[len(xs):])), tuple(args[: len(xs)]))

    assert torch.autograd.gradcheck(f, (*xs, *ps), eps=1e-6, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Pooling: numpy transcription of Caffe's window loops
# --------------------------------------------------------------------------------------------------
def ref_pool(x, method, k, s, p, ceil=True):
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    rnd = math.ceil if ceil else math.floor
    oh = int(rnd((H + 2 * ph - kh) / sh)) + 1
    ow = int(rnd((W + 2 * pw - kw) / sw)) + 1
    if ph or pw:
        if (oh - 1) * sh >= H + ph:
            oh -= 1
        if (ow - 1) * sw >= W + pw:
            ow -= 1
    y = np.zeros((N, C, oh, ow))
    mask = np.full((N, C, oh, ow), -1.0)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
            size = (he - hs) * (we - ws)
            hs0, ws0, he0, we0 = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
            win = x[:, :, hs0:he0, ws0:we0].reshape(N, C, -1)
            if method == "MAX":
                if win.shape[-1] == 0:
                    y[:, :, i, j] = -FLT_MAX
                    continue
                a = win.argmax(-1)  # first max in row-major order
                y[:, :, i, j] = np.take_along_axis(win, a[..., None], -1)[..., 0]
                ww = we0 - ws0
                mask[:, :, i, j] = (hs0 + a // ww) * W + (ws0 + a % ww)
            else:
                y[:, :, i, j] = win.sum(-1) / size
    return y, mask


def ref_pool_backward(x, top_diff, method, k, s, p, mask):
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    g = np.zeros_like(x)
    oh, ow = top_diff.shape[-2:]
    for i in range(oh):
        for j in range(ow):
            if method == "MAX":
                for n in range(N):
                    for c in range(C):
                        m = int(mask[n, c, i, j])
                        if m >= 0:
                            g[n, c, m // W, m % W] += top_diff[n, c, i, j]
            else:
                hs, ws = i * sh - ph, j * sw - pw
                he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
                size = (he - hs) * (we - ws)
                g[:, :, max(hs, 0):min(he, H), max(ws, 0):min(we, W)] += top_diff[:, :, i:i + 1, j:j + 1] / size
    return g


POOL_CONFIGS = [
    # (H, W, kernel, stride, pad, ceil)
    ((7, 8), (3, 3), (2, 2), (1, 1), True),
    ((6, 6), (3, 3), (2, 2), (2, 2), True),  # pad > k//2: not expressible in torch's pooling
    ((5, 7), (4, 2), (3, 1), (3, 1), True),
    ((5, 5), (1, 1), (3, 3), (0, 0), True),  # no pad: Caffe keeps a last window past the image
    ((4, 9), (2, 3), (3, 4), (0, 0), True),
    ((8, 8), (3, 3), (2, 2), (1, 1), False),
    ((3, 3), (5, 5), (1, 1), (1, 1), True),  # kernel larger than the padded image
    ((9, 4), (3, 2), (2, 3), (2, 0), True),  # pad only in h: clipping rule applies to both axes
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("cfg", POOL_CONFIGS)
def test_pooling_matches_caffe_loops(method, cfg) -> None:
    (H, W), k, s, p, ceil = cfg
    x = RNG.integers(-4, 5, size=(2, 3, H, W)).astype(np.float64)  # integers: many ties
    params = (f"pooling_param {{ pool: {method} kernel_h: {k[0]} kernel_w: {k[1]} stride_h: {s[0]} "
              f"stride_w: {s[1]} pad_h: {p[0]} pad_w: {p[1]} round_mode: {'CEIL' if ceil else 'FLOOR'} }}")
    ntop = 2 if method == "MAX" else 1
    layer = make("Pooling", params, [x.shape], ntop=ntop)
    xt = torch.tensor(x, requires_grad=True)
    out = layer(xt)
    y = out[0] if ntop == 2 else out
    ref_y, ref_mask = ref_pool(x, method, k, s, p, ceil)
    assert tuple(y.shape) == ref_y.shape == layer.top_shapes([x.shape])[0]
    np.testing.assert_allclose(y.detach().numpy(), ref_y, rtol=1e-12, atol=1e-12)
    if ntop == 2:
        np.testing.assert_array_equal(out[1].numpy(), ref_mask)
        assert not out[1].requires_grad
    td = randn(*ref_y.shape)
    y.backward(torch.tensor(td))
    ref_g = ref_pool_backward(x, td, method, k, s, p, ref_mask)
    np.testing.assert_allclose(xt.grad.numpy(), ref_g, rtol=1e-12, atol=1e-12)


def test_global_max_pooling_ties_first() -> None:
    x = np.zeros((1, 2, 3, 4))
    x[0, 0, 1, 2] = x[0, 0, 2, 0] = 5.0
    layer = make("Pooling", "pooling_param { pool: MAX global_pooling: true }", [x.shape], ntop=2)
    xt = torch.tensor(x, requires_grad=True)
    y, mask = layer(xt)
    assert mask[0, 0, 0, 0] == 1 * 4 + 2 and mask[0, 1, 0, 0] == 0
    y.sum().backward()
    assert xt.grad[0, 0, 1, 2] == 1 and xt.grad.sum() == 2


def test_pooling_ave_gradcheck_general_path() -> None:
    layer = make("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 2 }", [(1, 2, 5, 6)])
    gradcheck(layer, [randn(1, 2, 5, 6)], params=False)


def test_stochastic_pooling_test_phase() -> None:
    x = np.abs(randn(2, 3, 5, 7))
    layer = make("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }", [x.shape])
    y = layer(torch.tensor(x)).numpy()
    s1, _ = ref_pool(x, "AVE", (3, 3), (2, 2), (0, 0))
    s2, _ = ref_pool(x * x, "AVE", (3, 3), (2, 2), (0, 0))
    # same windows and divisor, so the divisor cancels: sum(x^2)/sum(x)
    np.testing.assert_allclose(y, s2 / s1, rtol=1e-10)


def test_stochastic_pooling_train_samples_window_elements() -> None:
    torch.manual_seed(0)
    x = np.abs(randn(1, 2, 6, 6)) + 0.1
    layer = make("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }", [x.shape], phase=TRAIN)
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt)
    for i, j in itertools.product(range(3), range(3)):
        win = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(1, 2, -1)
        assert np.isclose(win, y.detach().numpy()[:, :, i, j, None]).any(-1).all()
    y.sum().backward()
    assert xt.grad.sum() == 9 * 2 and set(np.unique(xt.grad.numpy())) <= {0.0, 1.0}
    # Sampling probability proportional to the value: a window (1, 3) picks 3 about 75% of the time.
    z = torch.tensor([[[[1.0, 3.0]]]]).expand(1, 4000, 1, 2).contiguous()
    lz = make("Pooling", "pooling_param { pool: STOCHASTIC kernel_h: 1 kernel_w: 2 stride: 2 }", [z.shape],
              phase=TRAIN)
    frac = float((lz(z) == 3.0).float().mean())
    assert abs(frac - 0.75) < 0.03


@pytest.mark.parametrize(
    "params,ntop,msg",
    [
        ("pooling_param { global_pooling: true kernel_size: 2 }", 1, "global_pooling"),
        ("pooling_param { global_pooling: true pad: 1 }", 1, "global_pooling"),
        ("pooling_param { kernel_size: 3 kernel_h: 2 kernel_w: 2 }", 1, "not both"),
        ("pooling_param { kernel_h: 2 }", 1, "kernel_h and kernel_w"),
        ("pooling_param { }", 1, "kernel"),
        ("pooling_param { kernel_size: 3 pad: 3 }", 1, "smaller than the kernel"),
        ("pooling_param { kernel_size: 3 pad: 1 pool: STOCHASTIC }", 1, "padding"),
        ("pooling_param { kernel_size: 3 pad: 1 pad_h: 1 pad_w: 1 }", 1, "pad"),
        ("pooling_param { kernel_size: 3 stride_h: 2 }", 1, "stride"),
        ("pooling_param { kernel_size: 3 pool: AVE }", 2, "mask"),
    ],
)
def test_pooling_param_errors(params, ntop, msg) -> None:
    with pytest.raises(CaffeportError, match=msg):
        make("Pooling", params, [(1, 1, 6, 6)], ntop=ntop)


def test_pooling_needs_4d() -> None:
    with pytest.raises(CaffeportError, match="4 axes"):
        make("Pooling", "pooling_param { kernel_size: 2 }", [(1, 6, 6)])


# --------------------------------------------------------------------------------------------------
# Convolution / Deconvolution: direct numpy reference and finite differences
# --------------------------------------------------------------------------------------------------
def ref_conv(x, w, b, stride, pad, dil, group):
    """Direct N-d convolution: accumulate one kernel tap at a time over strided input slices."""
    N, C = x.shape[:2]
    sp = x.shape[2:]
    O, Cg = w.shape[:2]
    k = w.shape[2:]
    xp = np.pad(x, [(0, 0), (0, 0), *[(p, p) for p in pad]])
    out_sp = [(sp[i] + 2 * pad[i] - (dil[i] * (k[i] - 1) + 1)) // stride[i] + 1 for i in range(len(sp))]
    y = np.zeros((N, O, *out_sp))
    og = O // group
    for tap in itertools.product(*[range(kk) for kk in k]):
        sl = tuple(slice(tap[i] * dil[i], tap[i] * dil[i] + stride[i] * (out_sp[i] - 1) + 1, stride[i])
                   for i in range(len(sp)))
        for g in range(group):
            xs = xp[(slice(None), slice(g * Cg, (g + 1) * Cg), *sl)]
            ws = w[(slice(g * og, (g + 1) * og), slice(None), *tap)]
            y[:, g * og:(g + 1) * og] += np.einsum("nc...,oc->no...", xs, ws)
    if b is not None:
        y += b.reshape(1, -1, *[1] * len(sp))
    return y


def ref_deconv(x, w, b, stride, pad, dil, group):
    """Deconvolution as scatter: each input pixel adds w * x at i*s + tap*d, then crop pad."""
    N, C = x.shape[:2]
    sp = x.shape[2:]
    Cin, og = w.shape[:2]
    k = w.shape[2:]
    full = [stride[i] * (sp[i] - 1) + dil[i] * (k[i] - 1) + 1 for i in range(len(sp))]
    y = np.zeros((N, og * group, *full))
    cg = C // group
    for tap in itertools.product(*[range(kk) for kk in k]):
        sl = tuple(slice(tap[i] * dil[i], tap[i] * dil[i] + stride[i] * (sp[i] - 1) + 1, stride[i])
                   for i in range(len(sp)))
        for g in range(group):
            xs = x[:, g * cg:(g + 1) * cg]
            ws = w[(slice(g * cg, (g + 1) * cg), slice(None), *tap)]
            y[(slice(None), slice(g * og, (g + 1) * og), *sl)] += np.einsum("nc...,co->no...", xs, ws)
    crop = tuple(slice(pad[i], full[i] - pad[i]) for i in range(len(sp)))
    y = y[(slice(None), slice(None), *crop)]
    if b is not None:
        y = y + b.reshape(1, -1, *[1] * len(sp))
    return y


CONV_CASES = [
    # (type, params, bottom shape)
    ("Convolution", "num_output: 4 kernel_size: 3 stride: 2 pad: 1 dilation: 2 group: 2", (2, 4, 9)),  # 1-D
    ("Convolution", "num_output: 3 kernel_size: 2 kernel_size: 1 kernel_size: 3 stride: 1 stride: 2 stride: 1 "
                    "pad: 0 pad: 1 pad: 2 dilation: 1 dilation: 1 dilation: 2 bias_filler { type: 'gaussian' }",
     (1, 2, 4, 5, 6)),
    ("Convolution", "num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 group: 2",
     (2, 4, 6, 5)),
    ("Deconvolution", "num_output: 4 kernel_size: 3 stride: 2 pad: 1 dilation: 2 group: 2", (2, 4, 5)),
    ("Deconvolution", "num_output: 2 kernel_size: 2 stride: 3 pad: 1 bias_filler { type: 'gaussian' }",
     (1, 3, 3, 4, 2)),
    ("Deconvolution", "num_output: 6 kernel_h: 3 kernel_w: 4 stride_h: 1 stride_w: 2 pad_h: 2 pad_w: 1 group: 3",
     (2, 3, 4, 3)),
]


@pytest.mark.parametrize("type_name,params,shape", CONV_CASES)
def test_conv_matches_direct_reference_and_gradcheck(type_name, params, shape) -> None:
    params = params.replace("'", '"')
    layer = make(type_name, f"convolution_param {{ {params} weight_filler {{ type: 'gaussian' }} }}"
                 .replace("'", '"'), [shape])
    x = randn(*shape)
    w = layer.blobs[0].detach().double().numpy()
    b = layer.blobs[1].detach().double().numpy() if len(layer.blobs) > 1 else None
    ref = (ref_conv if type_name == "Convolution" else ref_deconv)(
        x, w, b, layer.stride, layer.pad, layer.dilation, layer.group)
    y = layer.double()(torch.tensor(x)).detach().numpy()
    assert y.shape == ref.shape == layer.top_shapes([shape])[0]
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
    gradcheck(layer, [x])


def test_conv_axis_and_two_bottoms() -> None:
    # axis 2: dims before it are independent inputs; two bottoms share the weights.
    shape = (2, 3, 4, 7)
    layer = make("Convolution", 'convolution_param { num_output: 5 kernel_size: 3 axis: 2 '
                 'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }', [shape, shape], ntop=2)
    assert tuple(layer.blobs[0].shape) == (5, 4, 3)
    a, b = randn(*shape), randn(*shape)
    ya, yb = layer.double()(torch.tensor(a), torch.tensor(b))
    w, bias = layer.blobs[0].detach().numpy(), layer.blobs[1].detach().numpy()
    for x, y in ((a, ya), (b, yb)):
        ref = ref_conv(x.reshape(6, 4, 7), w, bias, (1,), (0,), (1,), 1).reshape(2, 3, 5, 5)
        np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-10, atol=1e-10)
    assert layer.top_shapes([shape, shape]) == [(2, 3, 5, 5)] * 2
    small = (2, 1, 2, 4)
    layer = make("Convolution", 'convolution_param { num_output: 2 kernel_size: 3 axis: 2 '
                 'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }', [small, small], ntop=2)
    gradcheck(layer, [randn(*small), randn(*small)])


@pytest.mark.parametrize(
    "type_name,params,shape,msg",
    [
        ("Convolution", "num_output: 4 kernel_size: 3 group: 3", (1, 6, 5, 5), "num_output"),
        ("Convolution", "num_output: 3 kernel_size: 3 group: 2", (1, 3, 5, 5), "channels"),
        ("Convolution", "num_output: 3", (1, 3, 5, 5), "kernel_size"),
        ("Convolution", "num_output: 3 kernel_size: 1 kernel_size: 2 kernel_size: 3", (1, 3, 5, 5), "kernel_size"),
        ("Convolution", "num_output: 3 kernel_h: 3 kernel_w: 3", (1, 3, 5, 5, 5), "2D"),
        ("Convolution", "num_output: 3 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 3, 5, 5), "not both"),
        ("Convolution", "num_output: 3 kernel_size: 3 stride: 0", (1, 3, 5, 5), "stride"),
        ("Convolution", "num_output: 3 kernel_size: 0", (1, 3, 5, 5), "nonzero"),
        ("Convolution", "kernel_size: 3", (1, 3, 5, 5), "num_output"),
        ("Convolution", "num_output: 3 kernel_size: 7", (1, 3, 5, 5), "smaller than"),
        ("Deconvolution", "num_output: 3 kernel_size: 1 pad: 3", (1, 3, 2, 2), "output size"),
        ("Im2col", "kernel_size: 3 pad: 1 pad: 1 pad: 1", (1, 3, 5, 5), "pad"),
    ],
)
def test_conv_param_errors(type_name, params, shape, msg) -> None:
    with pytest.raises(CaffeportError, match=msg):
        make(type_name, f"convolution_param {{ {params} }}", [shape])


# --------------------------------------------------------------------------------------------------
# Im2col
# --------------------------------------------------------------------------------------------------
def ref_im2col(x, k, s, p, d):
    """Caffe's im2col for one image batch: row (c, k1, k2, ...) , column = output position."""
    N, C = x.shape[:2]
    sp = x.shape[2:]
    xp = np.pad(x, [(0, 0), (0, 0), *[(pp, pp) for pp in p]])
    out = [(sp[i] + 2 * p[i] - (d[i] * (k[i] - 1) + 1)) // s[i] + 1 for i in range(len(sp))]
    rows = []
    for c in range(C):
        for tap in itertools.product(*[range(kk) for kk in k]):
            sl = tuple(slice(tap[i] * d[i], tap[i] * d[i] + s[i] * (out[i] - 1) + 1, s[i]) for i in range(len(sp)))
            rows.append(xp[(slice(None), c, *sl)])
    return np.stack(rows, axis=1)


@pytest.mark.parametrize(
    "params,shape,k,s,p,d",
    [
        ("kernel_size: 3 stride: 1 pad: 2 dilation: 2", (2, 3, 6, 7), (3, 3), (1, 1), (2, 2), (2, 2)),
        ("kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 0 pad_w: 1", (1, 2, 5, 4), (2, 3), (2, 1), (0, 1),
         (1, 1)),
        ("kernel_size: 2 kernel_size: 1 kernel_size: 3 stride: 2 pad: 1", (1, 2, 4, 3, 5), (2, 1, 3), (2, 2, 2),
         (1, 1, 1), (1, 1, 1)),
    ],
)
def test_im2col_reference_and_gradcheck(params, shape, k, s, p, d) -> None:
    layer = make("Im2col", f"convolution_param {{ {params} }}", [shape])
    x = randn(*shape)
    y = layer(torch.tensor(x)).numpy()
    ref = ref_im2col(x, k, s, p, d)
    assert y.shape == ref.shape == layer.top_shapes([shape])[0]
    np.testing.assert_array_equal(y, ref)
    gradcheck(layer, [x], params=False)


# --------------------------------------------------------------------------------------------------
# LRN
# --------------------------------------------------------------------------------------------------
def ref_lrn(x, size, alpha, beta, k, within):
    N, C, H, W = x.shape
    half = (size - 1) // 2
    sq = x * x
    if not within:
        pad = np.pad(sq, [(0, 0), (half, half), (0, 0), (0, 0)])
        s = sum(pad[:, i:i + C] for i in range(size))
        return x * (k + alpha / size * s) ** (-beta)
    pad = np.pad(sq, [(0, 0), (0, 0), (half, half), (half, half)])
    s = sum(pad[:, :, i:i + H, j:j + W] for i in range(size) for j in range(size))
    return x * (1 + alpha * s / (size * size)) ** (-beta)


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
@pytest.mark.parametrize("size", [1, 5])
def test_lrn_reference_and_gradcheck(region, size) -> None:
    shape = (2, 7, 4, 5)
    layer = make("LRN", f"lrn_param {{ local_size: {size} alpha: 0.75 beta: 0.625 k: 1.5 norm_region: {region} }}",
                 [shape])
    x = randn(*shape)
    y = layer(torch.tensor(x)).numpy()
    np.testing.assert_allclose(y, ref_lrn(x, size, 0.75, 0.625, 1.5, region == "WITHIN_CHANNEL"), rtol=1e-10)
    small = (1, 6, 3, 3)
    gradcheck(make("LRN", f"lrn_param {{ local_size: {size} alpha: 0.75 beta: 0.625 k: 1.5 norm_region: {region} }}",
                   [small]), [randn(*small)], params=False)


@pytest.mark.parametrize("size,shape", [(5, (2, 2, 3, 3)), (9, (1, 3, 2, 2)), (2147483647, (2, 4, 2, 3)),
                                        (5, (0, 6, 3, 3)), (3, (1, 1, 2, 2))])
def test_lrn_across_window_wider_than_channels_and_empty(size, shape) -> None:
    """Windows past the channels add zeros (a huge local_size pads nothing); empty batches; the
    gradient against float64 finite differences."""
    layer = make("LRN", f"lrn_param {{ local_size: {size} alpha: 0.5 beta: 0.75 k: 2 }}", [shape])
    x = randn(*shape)
    big = np.float64(size)
    want = x * (2 + 0.5 / big * sum(np.pad(x * x, [(0, 0), (s, s), (0, 0), (0, 0)])[:, s + d: s + d + shape[1]]
                                    for s in [shape[1]] for d in range(-min(size // 2, shape[1]),
                                                                       min(size // 2, shape[1]) + 1))) ** -0.75
    np.testing.assert_allclose(layer(torch.tensor(x)).numpy(), want, rtol=1e-10)
    if shape[0]:
        gradcheck(layer, [x], params=False)


def test_lrn_across_channels_last_and_bf16_inputs() -> None:
    """fast mode feeds channels_last (and, compiled, bf16) blobs: same numbers, float32 out for bf16."""
    shape = (2, 6, 3, 4)
    layer = make("LRN", "lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 }", [shape])
    x = torch.tensor(randn(*shape), dtype=torch.float32)
    want = layer(x)
    got = layer(x.contiguous(memory_format=torch.channels_last))
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-6)
    low = layer(x.bfloat16())
    assert low.dtype == torch.float32
    np.testing.assert_allclose(low.detach().numpy(), want.detach().numpy(), rtol=2e-2, atol=1e-2)


def test_lrn_defaults_and_errors() -> None:
    layer = make("LRN", "", [(1, 6, 3, 3)])
    assert (layer.size, layer.alpha, layer.beta, layer.k) == (5, 1.0, 0.75, 1.0)
    with pytest.raises(CaffeportError, match="odd"):
        make("LRN", "lrn_param { local_size: 4 }", [(1, 6, 3, 3)])


# --------------------------------------------------------------------------------------------------
# SPP
# --------------------------------------------------------------------------------------------------
def ref_spp(x, height, method):
    H, W = x.shape[2:]
    outs = []
    for lvl in range(height):
        bins = 2**lvl
        kh, kw = math.ceil(H / bins), math.ceil(W / bins)
        ph, pw = (kh * bins - H + 1) // 2, (kw * bins - W + 1) // 2
        y, _ = ref_pool(x, method, (kh, kw), (kh, kw), (ph, pw))
        if height == 1:
            return y
        outs.append(y.reshape(x.shape[0], -1))
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("height,shape", [(1, (2, 3, 5, 6)), (3, (1, 2, 11, 9))])
def test_spp_reference(method, height, shape) -> None:
    layer = make("SPP", f"spp_param {{ pyramid_height: {height} pool: {method} }}", [shape])
    x = randn(*shape)
    y = layer(torch.tensor(x)).numpy()
    np.testing.assert_allclose(y, ref_spp(x, height, method), rtol=1e-12)
    if method == "AVE":
        gradcheck(layer, [x], params=False)


def test_spp_errors() -> None:
    with pytest.raises(CaffeportError, match="pyramid_height"):
        make("SPP", "spp_param { pyramid_height: 0 }", [(1, 1, 4, 4)])
    with pytest.raises(CaffeportError, match="pad"):  # H=1 with 4 bins: pad 2 >= kernel 1
        make("SPP", "spp_param { pyramid_height: 3 }", [(1, 1, 1, 8)])


# --------------------------------------------------------------------------------------------------
# Crop
# --------------------------------------------------------------------------------------------------
def test_crop_negative_axis_broadcast_offset_and_no_grad_to_ref() -> None:
    a, b = (2, 3, 7, 8), (1, 1, 4, 5)
    layer = make("Crop", "crop_param { axis: -2 offset: 2 }", [a, b])
    x = torch.tensor(randn(*a), requires_grad=True)
    ref = torch.zeros(b, requires_grad=True)
    y = layer(x, ref)
    np.testing.assert_array_equal(y.detach().numpy(), x.detach().numpy()[:, :, 2:6, 2:7])
    assert layer.top_shapes([a, b]) == [(2, 3, 4, 5)]
    y.sum().backward()
    g = np.zeros(a)
    g[:, :, 2:6, 2:7] = 1
    np.testing.assert_array_equal(x.grad.numpy(), g)
    assert ref.grad is None and layer.no_grad_bottoms == (1,)


def test_crop_errors() -> None:
    with pytest.raises(CaffeportError, match="number of offset"):
        make("Crop", "crop_param { axis: 1 offset: 1 offset: 2 }", [(1, 4, 6, 6), (1, 2, 3, 3)])
    with pytest.raises(CaffeportError, match="invalid crop"):
        make("Crop", "crop_param { offset: 4 }", [(1, 4, 6, 6), (1, 4, 3, 3)])
    with pytest.raises(CaffeportError, match="same number of axes"):
        make("Crop", "", [(1, 4, 6, 6), (1, 4, 3)])


# --------------------------------------------------------------------------------------------------
# ROIPooling: transcription of caffe-fast-rcnn's CPU loops (float32 bin arithmetic)
# --------------------------------------------------------------------------------------------------
def c_round(v):
    return int(np.sign(v) * np.floor(abs(v) + 0.5))


def ref_roi_pool(x, rois, PH, PW, scale):
    N, C, H, W = x.shape
    f32 = np.float32
    R = rois.shape[0]
    y = np.full((R, C, PH, PW), -FLT_MAX, dtype=np.float64)
    arg = np.full((R, C, PH, PW), -1, dtype=np.int64)
    geo = []
    for r in range(R):
        bi = int(rois[r, 0])
        xs, ys, xe, ye = (c_round(f32(rois[r, i]) * f32(scale)) for i in (1, 2, 3, 4))
        rh, rw = max(ye - ys + 1, 1), max(xe - xs + 1, 1)
        bh, bw = f32(rh) / f32(PH), f32(rw) / f32(PW)
        geo.append((bi, xs, ys, xe, ye, bh, bw))
        for c in range(C):
            for ph in range(PH):
                for pw in range(PW):
                    hs = min(max(int(np.floor(f32(ph) * bh)) + ys, 0), H)
                    he = min(max(int(np.ceil(f32(ph + 1) * bh)) + ys, 0), H)
                    ws = min(max(int(np.floor(f32(pw) * bw)) + xs, 0), W)
                    we = min(max(int(np.ceil(f32(pw + 1) * bw)) + xs, 0), W)
                    if he <= hs or we <= ws:
                        y[r, c, ph, pw] = 0
                        continue
                    for h in range(hs, he):
                        for w in range(ws, we):
                            if x[bi, c, h, w] > y[r, c, ph, pw]:
                                y[r, c, ph, pw] = x[bi, c, h, w]
                                arg[r, c, ph, pw] = h * W + w
    return y, arg, geo


def ref_roi_backward(x, top_diff, arg, geo, PH, PW):
    N, C, H, W = x.shape
    f32 = np.float32
    g = np.zeros_like(x)
    for r, (bi, xs, ys, xe, ye, bh, bw) in enumerate(geo):
        for c in range(C):
            for h in range(max(0, ys), min(H, ye + 1)):
                for w in range(max(0, xs), min(W, xe + 1)):
                    phs = min(max(int(np.floor(f32(h - ys) / bh)), 0), PH)
                    phe = min(max(int(np.ceil(f32(h - ys + 1) / bh)), 0), PH)
                    pws = min(max(int(np.floor(f32(w - xs) / bw)), 0), PW)
                    pwe = min(max(int(np.ceil(f32(w - xs + 1) / bw)), 0), PW)
                    for ph in range(phs, phe):
                        for pw in range(pws, pwe):
                            if arg[r, c, ph, pw] == h * W + w:
                                g[bi, c, h, w] += top_diff[r, c, ph, pw]
    return g


def test_roi_pooling_matches_caffe_loops() -> None:
    x = RNG.integers(-3, 4, size=(2, 3, 7, 9)).astype(np.float64)  # ties
    rois = np.array([[0, 0, 0, 10, 10], [1, 3, 2, 16, 12], [0, 5, 5, 3, 3], [1, -4, -3, 30, 40],
                     [0, 1, 1, 1, 1], [1, 17, 13, 17, 13], [0, 2.99, 1.01, 9.5, 7.5]], dtype=np.float32)
    PH, PW, scale = 3, 2, 0.5
    layer = make("ROIPooling", f"roi_pooling_param {{ pooled_h: {PH} pooled_w: {PW} spatial_scale: {scale} }}",
                 [x.shape, rois.shape])
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt, torch.tensor(rois))
    ref_y, arg, geo = ref_roi_pool(x, rois, PH, PW, scale)
    assert tuple(y.shape) == ref_y.shape == layer.top_shapes([x.shape, rois.shape])[0]
    np.testing.assert_array_equal(y.detach().numpy(), ref_y)
    td = randn(*ref_y.shape)
    y.backward(torch.tensor(td))
    np.testing.assert_allclose(xt.grad.numpy(), ref_roi_backward(x, td, arg, geo, PH, PW), atol=1e-12)


def test_roi_pooling_errors() -> None:
    with pytest.raises(CaffeportError, match="pooled_h"):
        make("ROIPooling", "roi_pooling_param { pooled_w: 2 }", [(1, 1, 4, 4), (2, 5)])
    with pytest.raises(CaffeportError, match="rois"):
        make("ROIPooling", "roi_pooling_param { pooled_h: 2 pooled_w: 2 }", [(1, 1, 4, 4), (2, 4)])
    layer = make("ROIPooling", "roi_pooling_param { pooled_h: 2 pooled_w: 2 }", [(1, 1, 4, 4), (1, 5)])
    with pytest.raises(CaffeportError, match="batch index"):
        layer(torch.zeros(1, 1, 4, 4), torch.tensor([[1.0, 0, 0, 1, 1]]))
