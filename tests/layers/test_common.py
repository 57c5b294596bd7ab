"""Common layers beyond the golden cases: finite-difference gradient checks (float64, as Caffe's
GradientChecker), Caffe's tie rules and update formulas against independent numpy/Python
references, and parameter validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffeport.errors import CaffeportError
from caffeport.layers.base import TEST, TRAIN, BuildContext, Layer, layer_class
from caffeport.proto import caffe_pb2
from tests.layers.helpers import fd_check


def build(text: str, shapes: list[tuple[int, ...]], phase: int = TEST, n_top: int = 1) -> Layer:
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    if not lp.top:
        lp.top.extend([f"t{i}" for i in range(n_top)])
    cls = layer_class(lp.type)
    assert cls is not None, lp.type
    return cls(lp, shapes, BuildContext(phase=phase))


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def randomize_blobs(layer: Layer, seed: int = 3) -> Layer:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.blobs:
            p.copy_(torch.randn(p.shape, generator=gen))
    return layer


# --- finite differences ----------------------------------------------------------------------------
def test_batchnorm_train_gradients_4d_and_2d() -> None:
    fd_check(build('type: "BatchNorm"', [(3, 2, 2, 3)], TRAIN), [randn(3, 2, 2, 3)])
    fd_check(build('type: "BatchNorm" batch_norm_param { eps: 0.1 }', [(5, 3)], TRAIN), [randn(5, 3)])


def test_batchnorm_global_stats_gradient() -> None:
    layer = build('type: "BatchNorm"', [(2, 3, 2)], TEST)
    with torch.no_grad():
        layer.blobs[0].copy_(torch.tensor([1.0, -2.0, 0.5]))
        layer.blobs[1].copy_(torch.tensor([4.0, 2.0, 9.0]))
        layer.blobs[2].fill_(2.0)
    fd_check(layer, [randn(2, 3, 2)])


@pytest.mark.parametrize("text, shapes, check", [
    ('type: "BatchReindex"', [(4, 3), (6,)], (0,)),
    ('type: "Bias" bias_param { axis: 1 num_axes: -1 }', [(2, 3, 2)], (0,)),
    ('type: "Bias" bias_param { num_axes: 0 }', [(2, 3, 2)], (0,)),
    ('type: "Bias" bias_param { axis: -2 }', [(2, 3, 4), (3, 4)], (0, 1)),
    ('type: "Bias"', [(2, 3, 4), ()], (0, 1)),
    ('type: "Scale" scale_param { bias_term: true num_axes: 2 }', [(2, 3, 2)], (0,)),
    ('type: "Scale" scale_param { num_axes: 0 }', [(2, 3, 2)], (0,)),
    ('type: "Scale" scale_param { axis: 1 bias_term: true }', [(2, 3, 4), (3, 4)], (0, 1)),
    ('type: "Scale"', [(2, 3, 4), ()], (0, 1)),
    ('type: "Concat" concat_param { axis: 0 }', [(1, 2, 3), (2, 2, 3), (1, 2, 3)], None),
    ('type: "Concat" concat_param { concat_dim: 2 }', [(1, 2, 3), (1, 2, 1)], None),
    ('type: "Eltwise" eltwise_param { coeff: 0.5 coeff: -2 coeff: 3 }', [(2, 3)] * 3, None),
    ('type: "Eltwise" eltwise_param { operation: PROD }', [(2, 3)] * 3, None),
    ('type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }', [(2, 3)] * 3, None),
    ('type: "Eltwise" eltwise_param { operation: MAX }', [(2, 3)] * 3, None),
    ('type: "Embed" embed_param { num_output: 3 input_dim: 5 }', [(2, 4)], ()),
    ('type: "Embed" embed_param { num_output: 2 input_dim: 4 bias_term: false }', [(3,)], ()),
    ('type: "Flatten" flatten_param { axis: 0 end_axis: 1 }', [(2, 3, 2)], None),
    ('type: "InnerProduct" inner_product_param { num_output: 3 }', [(2, 2, 3)], None),
    ('type: "InnerProduct" inner_product_param { num_output: 2 transpose: true }', [(3, 4)], None),
    ('type: "InnerProduct" inner_product_param { num_output: 2 axis: 0 bias_term: false }', [(2, 3)], None),
    ('type: "MVN"', [(2, 3, 5)], None),
    ('type: "MVN" mvn_param { normalize_variance: false across_channels: true }', [(2, 3, 2)], None),
    ('type: "Reduction" reduction_param { operation: SUM axis: 1 coeff: 1.5 }', [(2, 3, 2)], None),
    ('type: "Reduction" reduction_param { operation: ASUM axis: 1 }', [(2, 3, 2)], None),
    ('type: "Reduction" reduction_param { operation: SUMSQ axis: -2 coeff: -1 }', [(2, 3, 2)], None),
    ('type: "Reduction" reduction_param { operation: MEAN }', [(2, 3, 2)], None),
    ('type: "Reshape" reshape_param { shape { dim: -1 dim: 2 } }', [(3, 2, 2)], None),
    ('type: "Softmax" softmax_param { axis: -1 }', [(2, 2, 4)], None),
    ('type: "Softmax" softmax_param { axis: 0 }', [(3, 2)], None),
    ('type: "Tile" tile_param { axis: 2 tiles: 3 }', [(2, 2, 2)], None),
    ('type: "Tile" tile_param { axis: 0 tiles: 2 }', [(2, 3)], None),
])
def test_gradients(text: str, shapes: list[tuple[int, ...]], check: tuple[int, ...] | None) -> None:
    inputs = [randn(*s, seed=i + 1) for i, s in enumerate(shapes)]
    if "BatchReindex" in text:
        inputs[1] = torch.tensor([3.0, 0.0, 3.0, 1.0, 1.0, 3.0])
    if "Embed" in text:
        n_in = int(text.split("input_dim: ")[1].split()[0])
        inputs[0] = torch.randint(0, n_in, shapes[0], generator=torch.Generator().manual_seed(0)).float()
    if "ASUM" in text:
        inputs[0] = inputs[0] + 0.2 * torch.sign(inputs[0])
    if "PROD" in text:
        inputs = [x + 0.5 * torch.sign(x) for x in inputs]
    layer = randomize_blobs(build(text, shapes))
    fd_check(layer, inputs, check)


def test_slice_and_split_gradients() -> None:
    fd_check(build('type: "Slice" slice_param { axis: 0 slice_point: 1 slice_point: 3 }', [(4, 2)], n_top=3),
             [randn(4, 2)])
    fd_check(build('type: "Slice" slice_param { slice_dim: 2 }', [(2, 2, 4)], n_top=2), [randn(2, 2, 4)])
    fd_check(build('type: "Split"', [(2, 3)], n_top=3), [randn(2, 3)])


def test_filter_gradients_two_bottoms() -> None:
    layer = build('type: "Filter"', [(4, 3), (4, 2, 2), (4, 1)], n_top=2)
    sel = torch.tensor([[1.0], [0.0], [2.0], [0.0]])
    fd_check(layer, [randn(4, 3), randn(4, 2, 2, seed=2), sel], check=(0, 1))
    a, b = layer(randn(4, 3).double(), randn(4, 2, 2).double(), sel)
    assert a.shape == (2, 3) and b.shape == (2, 2, 2)
    np.testing.assert_array_equal(a.numpy(), randn(4, 3).double().numpy()[[0, 2]])


def test_parameter_top_is_the_blob() -> None:
    layer = build('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [])
    y = layer()
    assert tuple(y.shape) == (2, 3) and not y.detach().any()
    (y * torch.arange(6.0).reshape(2, 3)).sum().backward()
    np.testing.assert_array_equal(layer.blobs[0].grad.numpy(), np.arange(6.0).reshape(2, 3))


# --- Caffe's rules against independent references -----------------------------------------------
def caffe_topk(values: list[float], k: int) -> list[tuple[float, int]]:
    """std::partial_sort with std::greater on (value, index) pairs."""
    return sorted(((v, i) for i, v in enumerate(values)), reverse=True)[:k]


@pytest.mark.parametrize("k", [1, 3])
def test_argmax_ties_larger_index_first(k: int) -> None:
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [5.0, 5.0, 1.0, 5.0, 1.0, 1.0]])
    layer = build(f'type: "ArgMax" argmax_param {{ top_k: {k} out_max_val: true }}', [(2, 6)])
    out = layer(x)
    assert tuple(out.shape) == (2, 2, k)
    for n in range(2):
        ref = caffe_topk(x[n].tolist(), k)
        assert out[n, 0].tolist() == [float(i) for _, i in ref]
        assert out[n, 1].tolist() == [v for v, _ in ref]


def test_argmax_axis_ties_and_shapes() -> None:
    x = torch.tensor([[[2.0, 1.0], [2.0, 7.0], [0.0, 7.0]]])  # (1, 3, 2), ties along axis 1
    for k in (1, 2):
        layer = build(f'type: "ArgMax" argmax_param {{ axis: 1 top_k: {k} }}', [(1, 3, 2)])
        out = layer(x)
        assert tuple(out.shape) == (1, k, 2)
        for w in range(2):
            ref = caffe_topk(x[0, :, w].tolist(), k)
            assert out[0, :, w].tolist() == [float(i) for _, i in ref]
    layer = build('type: "ArgMax"', [(4, 5)])
    assert layer.top_shapes([(4, 5)]) == [(4, 1, 1)]
    assert tuple(layer(randn(4, 5)).shape) == (4, 1, 1)
    assert not layer.has_backward


def test_batchnorm_running_sums_match_caffe_formula() -> None:
    x = randn(6, 3).double().numpy()
    layer = build('type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 eps: 0.001 }', [(6, 3)], TRAIN)
    layer = layer.double()
    init = [np.array([0.5, -1.0, 2.0]), np.array([1.0, 2.0, 3.0]), np.array([1.5])]
    with torch.no_grad():
        for p, v in zip(layer.blobs, init):
            p.copy_(torch.from_numpy(v))
    y = layer(torch.from_numpy(x)).numpy()
    mean, var = x.mean(0), x.var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 0.001), rtol=1e-10)
    np.testing.assert_allclose(layer.blobs[2].detach().numpy(), [0.9 * 1.5 + 1])
    np.testing.assert_allclose(layer.blobs[0].detach().numpy(), 0.9 * init[0] + mean)
    np.testing.assert_allclose(layer.blobs[1].detach().numpy(), 0.9 * init[1] + 6 / 5 * var)
    assert all(not p.requires_grad for p in layer.blobs)


def test_batchnorm_zero_scale_factor_means_zero_stats() -> None:
    layer = build('type: "BatchNorm" batch_norm_param { use_global_stats: true }', [(2, 2, 3)], TRAIN)
    with torch.no_grad():
        layer.blobs[0].fill_(5.0)
        layer.blobs[1].fill_(5.0)
    x = randn(2, 2, 3)
    np.testing.assert_allclose(layer(x).numpy(), x.numpy() / np.sqrt(1e-5), rtol=1e-6)
    assert not layer.blobs[2].detach().any()  # global stats: no update even in TRAIN


def test_mvn_backward_is_caffes_formula_with_large_eps() -> None:
    x = randn(2, 3, 4).double()
    g = randn(2, 3, 4, seed=7).double()
    layer = build('type: "MVN" mvn_param { eps: 0.5 }', [(2, 3, 4)]).double()
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    y.backward(g)
    xn, gn = x.numpy().reshape(6, 4), g.numpy().reshape(6, 4)
    c = xn - xn.mean(1, keepdims=True)
    denom = np.sqrt((c * c).mean(1, keepdims=True)) + 0.5
    yn = c / denom
    np.testing.assert_allclose(y.detach().numpy().reshape(6, 4), yn, rtol=1e-12)
    ref = (gn - gn.mean(1, keepdims=True) - yn * (yn * gn).mean(1, keepdims=True)) / denom
    np.testing.assert_allclose(xr.grad.numpy().reshape(6, 4), ref, rtol=1e-10, atol=1e-12)


def test_eltwise_max_tie_rules() -> None:
    # Caffe: bottom 0 vs 1 -> "a > b ? a : b" (bottom 1 wins a tie); later bottoms need strictly more.
    a = torch.tensor([1.0, 2.0, 3.0, 0.0], requires_grad=True)
    b = torch.tensor([1.0, 1.0, 3.0, 5.0], requires_grad=True)
    c = torch.tensor([0.0, 2.0, 3.0, 5.0], requires_grad=True)
    layer = build('type: "Eltwise" eltwise_param { operation: MAX }', [(4,)] * 3)
    y = layer(a, b, c)
    np.testing.assert_array_equal(y.detach().numpy(), [1, 2, 3, 5])
    y.backward(torch.tensor([10.0, 20.0, 30.0, 40.0]))
    np.testing.assert_array_equal(a.grad.numpy(), [0, 20, 0, 0])
    np.testing.assert_array_equal(b.grad.numpy(), [10, 0, 30, 40])
    np.testing.assert_array_equal(c.grad.numpy(), [0, 0, 0, 0])


def test_eltwise_prod_gradients_at_zero() -> None:
    def grads(stable: str) -> list[np.ndarray]:
        xs = [torch.tensor([0.0, 2.0], requires_grad=True), torch.tensor([3.0, 4.0], requires_grad=True)]
        layer = build(f'type: "Eltwise" eltwise_param {{ operation: PROD stable_prod_grad: {stable} }}', [(2,)] * 2)
        layer(*xs).backward(torch.ones(2))
        return [x.grad.numpy() for x in xs]

    ga, gb = grads("true")
    np.testing.assert_array_equal(ga, [3, 4])
    np.testing.assert_array_equal(gb, [0, 2])
    ga, gb = grads("false")  # top / bottom: 0/0 = NaN at the zero
    assert np.isnan(ga[0]) and ga[1] == 4
    np.testing.assert_array_equal(gb, [0, 2])


def test_split_tops_keep_their_own_diffs() -> None:
    x = randn(2, 3).requires_grad_(True)
    tops = build('type: "Split"', [(2, 3)], n_top=2)(x)
    for t in tops:
        t.retain_grad()
    (tops[0] * 2).sum().backward(retain_graph=True)
    (tops[1] * 3).sum().backward()
    assert (tops[0].grad == 2).all() and (tops[1].grad == 3).all() and (x.grad == 5).all()


def test_silence_has_no_tops() -> None:
    layer = build('type: "Silence" bottom: "a" bottom: "b"', [(2,), (3,)], n_top=0)
    assert layer(torch.zeros(2), torch.zeros(3)) == ()


def test_filter_setup_shape_is_full_batch() -> None:
    layer = build('type: "Filter"', [(5, 2), (5,)])
    assert layer.top_shapes([(5, 2), (5,)]) == [(5, 2)]
    assert tuple(layer(randn(5, 2), torch.tensor([0.0, 0, 0, 0, 0]))[0].shape) == (0, 2)


@pytest.mark.parametrize("param, shape, want", [
    ("shape { dim: 0 dim: -1 }", (2, 3, 4), (2, 12)),
    ("shape { dim: 2 dim: 0 dim: -1 dim: 1 }", (4, 3, 2), (2, 3, 4, 1)),
    ("axis: 1 num_axes: 1 shape { dim: 2 dim: -1 }", (2, 6, 5), (2, 2, 3, 5)),
    ("axis: -1 num_axes: 0 shape { dim: 1 }", (2, 3), (2, 3, 1)),
    ("axis: 0 num_axes: 0 shape { dim: 1 dim: 1 }", (2, 3), (1, 1, 2, 3)),
    ("axis: 2 shape { dim: -1 }", (2, 3, 4, 5), (2, 3, 20)),
])
def test_reshape_shapes(param: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    layer = build(f'type: "Reshape" reshape_param {{ {param} }}', [shape])
    x = randn(*shape)
    y = layer(x)
    assert tuple(y.shape) == want
    np.testing.assert_array_equal(y.numpy().reshape(-1), x.numpy().reshape(-1))


def test_tile_layout_matches_numpy() -> None:
    x = randn(2, 3, 2)
    y = build('type: "Tile" tile_param { axis: 1 tiles: 3 }', [(2, 3, 2)])(x)
    np.testing.assert_array_equal(y.numpy(), np.tile(x.numpy(), (1, 3, 1)))


def test_scale_bias_term_blob_order() -> None:
    one = build('type: "Scale" scale_param { bias_term: true bias_filler { type: "constant" value: 2 } }',
                [(2, 3, 4)])
    assert [tuple(p.shape) for p in one.blobs] == [(3,), (3,)]
    np.testing.assert_array_equal(one.blobs[0].detach().numpy(), [1, 1, 1])
    np.testing.assert_array_equal(one.blobs[1].detach().numpy(), [2, 2, 2])
    two = build('type: "Scale" scale_param { bias_term: true axis: 0 }', [(2, 3, 4), (2, 3)])
    assert [tuple(p.shape) for p in two.blobs] == [(2, 3)]
    x, s = randn(2, 3, 4), randn(2, 3, seed=2)
    with torch.no_grad():
        two.blobs[0].fill_(0.5)
    np.testing.assert_allclose(two(x, s).detach().numpy(), x.numpy() * s.numpy()[:, :, None] + 0.5, rtol=1e-6)


def test_inner_product_blob_shapes_and_value() -> None:
    layer = randomize_blobs(build('type: "InnerProduct" inner_product_param { num_output: 4 axis: 2 transpose: true }',
                                  [(2, 3, 5, 2)]))
    assert [tuple(p.shape) for p in layer.blobs] == [(10, 4), (4,)]
    x = randn(2, 3, 5, 2)
    w, b = (p.detach().numpy() for p in layer.blobs)
    ref = x.numpy().reshape(6, 10) @ w + b
    np.testing.assert_allclose(layer(x).detach().numpy(), ref.reshape(2, 3, 4), rtol=1e-5, atol=1e-6)


# --- validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, shapes, n_top", [
    ('type: "ArgMax" argmax_param { top_k: 7 }', [(2, 3, 2)], 1),
    ('type: "ArgMax" argmax_param { axis: 1 top_k: 4 }', [(2, 3, 2)], 1),
    ('type: "ArgMax" argmax_param { axis: 3 }', [(2, 3, 2)], 1),
    ('type: "BatchNorm" param { lr_mult: 1 }', [(2, 3)], 1),
    ('type: "BatchReindex"', [(2, 3), (2, 1)], 1),
    ('type: "Bias" bias_param { axis: 1 }', [(2, 3, 4), (4,)], 1),
    ('type: "Bias" bias_param { axis: 2 num_axes: 2 }', [(2, 3, 4)], 1),
    ('type: "Scale" scale_param { axis: 1 }', [(2, 3, 4), (3, 5)], 1),
    ('type: "Concat"', [(2, 3, 4), (2, 3, 5)], 1),
    ('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [(2, 3), (2, 3)], 1),
    ('type: "Eltwise" eltwise_param { coeff: 1 }', [(2, 3), (2, 3)], 1),
    ('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', [(2, 3), (2, 3)], 1),
    ('type: "Eltwise"', [(2, 3), (3, 2)], 1),
    ('type: "Eltwise"', [(2, 3)], 1),
    ('type: "Embed" embed_param { num_output: 0 input_dim: 3 }', [(4,)], 1),
    ('type: "Embed" embed_param { num_output: 3 }', [(4,)], 1),
    ('type: "Filter"', [(4, 2), (3,)], 1),
    ('type: "Filter"', [(4, 2), (4, 2)], 1),
    ('type: "Filter"', [(4, 2), (4, 3), (4,)], 1),
    ('type: "Flatten" flatten_param { axis: 4 }', [(2, 3)], 1),
    ('type: "InnerProduct"', [(2, 3)], 1),
    ('type: "Reduction" reduction_param { axis: 3 }', [(2, 3)], 1),
    ('type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }', [(2, 3)], 1),
    ('type: "Reshape" reshape_param { shape { dim: 4 dim: -1 } }', [(2, 3)], 1),
    ('type: "Reshape" reshape_param { shape { dim: 5 } }', [(2, 3)], 1),
    ('type: "Reshape" reshape_param { axis: 3 shape { dim: 1 } }', [(2, 3)], 1),
    ('type: "Slice" slice_param { axis: 1 }', [(2, 5)], 2),
    ('type: "Slice" slice_param { slice_point: 3 slice_point: 2 }', [(2, 5)], 3),
    ('type: "Slice" slice_param { slice_point: 1 }', [(2, 5)], 3),
    ('type: "Softmax" softmax_param { axis: 2 }', [(2, 5)], 1),
    ('type: "Tile" tile_param { tiles: 0 }', [(2, 5)], 1),
    ('type: "Tile"', [(2, 5)], 1),
])
def test_invalid_params(text: str, shapes: list[tuple[int, ...]], n_top: int) -> None:
    with pytest.raises(CaffeportError):
        build(text, shapes, n_top=n_top)


@pytest.mark.parametrize("text", [
    'type: "Flatten" bottom: "x" top: "x"',
    'type: "Reshape" bottom: "x" top: "x" reshape_param { shape { dim: -1 } }',
    'type: "Split" bottom: "x" top: "y" top: "x"',
])
def test_in_place_refused_like_caffe(text: str) -> None:
    with pytest.raises(CaffeportError, match="in-place"):
        build(text, [(2, 3)])


def test_eltwise_max_ignores_coeff_like_caffe() -> None:
    layer = build('type: "Eltwise" eltwise_param { operation: MAX coeff: 2 coeff: 3 }', [(2,), (2,)])
    np.testing.assert_array_equal(layer(torch.tensor([1.0, 5.0]), torch.tensor([2.0, 4.0])).numpy(), [2, 5])
