"""Neuron layers beyond the golden cases: finite-difference gradient checks (as Caffe's
GradientChecker, in float64), Caffe's special-case gradients checked against hand-written formulas,
Dropout's phase rules, and parameter validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffeport.errors import CaffeportError
from caffeport.layers.base import TEST, TRAIN, BuildContext, Layer, layer_class
from caffeport.proto import caffe_pb2
from tests.layers.helpers import fd_check


def build(text: str, shapes: list[tuple[int, ...]], phase: int = TEST) -> Layer:
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    if not lp.top:
        lp.top.append("top")
    cls = layer_class(lp.type)
    assert cls is not None, lp.type
    return cls(lp, shapes, BuildContext(phase=phase))


def away_from(x: torch.Tensor, points: list[float], margin: float = 0.05) -> torch.Tensor:
    """Push values away from kinks so finite differences are valid."""
    for p in points:
        close = (x - p).abs() < margin
        x = torch.where(close, p + margin * torch.sign(x - p + 1e-12) * 2, x)
    return x


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- finite-difference checks on configurations the goldens do not cover -----------------------
@pytest.mark.parametrize("text, kinks, positive", [
    ('type: "AbsVal"', [0.0], False),
    ('type: "BNLL"', [], False),
    ('type: "Clip" clip_param { min: -0.5 max: 0.7 }', [-0.5, 0.7], False),
    ('type: "ELU" elu_param { alpha: 0.3 }', [0.0], False),
    ('type: "Exp"', [], False),
    ('type: "Exp" exp_param { base: 3 scale: -0.5 shift: 0.25 }', [], False),
    ('type: "Log"', [], True),
    ('type: "Log" log_param { base: 10 scale: 2 shift: 0.5 }', [], True),
    ('type: "Power" power_param { power: 2 scale: -1.5 shift: 0.5 }', [], False),
    ('type: "Power" power_param { power: 3 scale: 0.5 }', [], False),
    ('type: "Power" power_param { power: 0.5 scale: 2 shift: 3 }', [], True),
    ('type: "Power" power_param { power: 1 scale: -2 shift: 1 }', [], False),
    ('type: "ReLU"', [0.0], False),
    ('type: "ReLU" relu_param { negative_slope: -0.2 }', [0.0], False),
    ('type: "Sigmoid"', [], False),
    ('type: "Swish" swish_param { beta: 2.5 }', [], False),
    ('type: "TanH"', [], False),
    ('type: "PReLU" prelu_param { filler { type: "uniform" min: -1 max: 1 } }', [0.0], False),
    ('type: "PReLU" prelu_param { channel_shared: true }', [0.0], False),
])
def test_neuron_gradients(text: str, kinks: list[float], positive: bool) -> None:
    x = randn(2, 3, 2, 3)
    x = x.abs() + 0.1 if positive else away_from(x, kinks)
    fd_check(build(text, [tuple(x.shape)]), [x])


def test_prelu_2d_bottom_gradients() -> None:
    x = away_from(randn(4, 5), [0.0])
    layer = build('type: "PReLU" prelu_param { filler { type: "constant" value: -0.3 } }', [(4, 5)])
    assert tuple(layer.blobs[0].shape) == (5,)
    fd_check(layer, [x])


def test_prelu_defaults_and_formula() -> None:
    x = randn(2, 3, 4)
    layer = build('type: "PReLU"', [(2, 3, 4)])
    assert tuple(layer.blobs[0].shape) == (3,)
    np.testing.assert_array_equal(layer.blobs[0].detach().numpy(), np.full(3, 0.25, np.float32))
    shared = build('type: "PReLU" prelu_param { channel_shared: true }', [(2, 3, 4)])
    assert tuple(shared.blobs[0].shape) == ()
    with torch.no_grad():
        layer.blobs[0].copy_(torch.tensor([0.1, -2.0, 3.0]))
    xn = x.numpy()
    ref = np.maximum(xn, 0) + np.array([0.1, -2.0, 3.0], np.float32)[None, :, None] * np.minimum(xn, 0)
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-6, atol=1e-7)


# --- Caffe's own rules at kinks and special cases ------------------------------------------------
def grad_of(layer: Layer, x: torch.Tensor) -> np.ndarray:
    x = x.clone().requires_grad_(True)
    layer(x).backward(torch.ones_like(x))
    return x.grad.numpy()


def test_relu_zero_takes_negative_slope() -> None:
    x = torch.tensor([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(grad_of(build('type: "ReLU" relu_param { negative_slope: 0.1 }', [(3,)]), x),
                                  np.array([0.1, 0.1, 1.0], np.float32))
    np.testing.assert_array_equal(grad_of(build('type: "ReLU"', [(3,)]), x), np.array([0, 0, 1], np.float32))


def test_prelu_zero_takes_slope() -> None:
    layer = build('type: "PReLU" prelu_param { channel_shared: true }', [(1, 3)])
    np.testing.assert_allclose(grad_of(layer, torch.tensor([[-1.0, 0.0, 2.0]])), [[0.25, 0.25, 1.0]])


def test_clip_bounds_pass_gradient() -> None:
    layer = build('type: "Clip" clip_param { min: -1 max: 1 }', [(5,)])
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    np.testing.assert_array_equal(grad_of(layer, x), np.array([0, 1, 1, 1, 0], np.float32))


def test_elu_zero_gets_alpha() -> None:
    layer = build('type: "ELU" elu_param { alpha: 0.5 }', [(3,)])
    np.testing.assert_allclose(grad_of(layer, torch.tensor([-1.0, 0.0, 1.0])),
                               [0.5 * math.exp(-1.0), 0.5, 1.0], rtol=1e-6)


def test_bnll_large_inputs_use_threshold() -> None:
    layer = build('type: "BNLL"', [(4,)])
    x = torch.tensor([-100.0, 0.0, 60.0, 1000.0])
    y = layer(x).detach().numpy()
    np.testing.assert_allclose(y, [0.0, math.log(2.0), 60.0, 1000.0], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(grad_of(layer, x), [0.0, 0.5, 1.0, 1.0], atol=1e-30)
    assert np.isfinite(grad_of(layer, x)).all()


def test_power_shift0_divides_by_x_like_caffe() -> None:
    # Caffe: dy/dx = power * y / x when shift == 0 -> NaN at x == 0 (autograd would give 0).
    layer = build('type: "Power" power_param { power: 3 scale: 2 }', [(2,)])
    g = grad_of(layer, torch.tensor([0.0, 1.5]))
    assert math.isnan(g[0])
    np.testing.assert_allclose(g[1], 3 * 2 * (2 * 1.5) ** 2, rtol=1e-6)


@pytest.mark.parametrize("text, value", [
    ('type: "Power" power_param { power: 0 scale: 3 shift: 2 }', 1.0),
    ('type: "Power" power_param { power: 2 scale: 0 shift: 3 }', 9.0),
])
def test_power_constant_cases_have_zero_gradient(text: str, value: float) -> None:
    layer = build(text, [(3,)])
    x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    y = layer(x)
    np.testing.assert_array_equal(y.detach().numpy(), np.full(3, value, np.float32))
    if y.requires_grad:
        y.backward(torch.ones(3))
    assert x.grad is None or not x.grad.any()


def test_exp_log_values() -> None:
    x = torch.tensor([0.5, 1.0, 2.0])
    e = build('type: "Exp" exp_param { base: 2 scale: 3 shift: -1 }', [(3,)])
    np.testing.assert_allclose(e(x).numpy(), 2.0 ** (3 * x.numpy() - 1), rtol=1e-6)
    lg = build('type: "Log" log_param { base: 2 scale: 3 shift: 1 }', [(3,)])
    np.testing.assert_allclose(lg(x).numpy(), np.log2(3 * x.numpy() + 1), rtol=1e-6)


def test_threshold_is_strict() -> None:
    layer = build('type: "Threshold" threshold_param { threshold: 0.5 }', [(3,)])
    np.testing.assert_array_equal(layer(torch.tensor([0.4, 0.5, 0.6])).numpy(), [0, 0, 1])
    assert not layer.has_backward


# --- Dropout --------------------------------------------------------------------------------------
def test_dropout_test_is_identity() -> None:
    x = randn(3, 4)
    np.testing.assert_array_equal(build('type: "Dropout"', [(3, 4)], TEST)(x).numpy(), x.numpy())


def test_dropout_train_inverted_scaling_and_gradient() -> None:
    torch.manual_seed(0)
    p = 0.3
    layer = build(f'type: "Dropout" dropout_param {{ dropout_ratio: {p} }}', [(200, 500)], TRAIN)
    x = (randn(200, 500).abs() + 0.5).requires_grad_(True)
    y = layer(x)
    kept = y.detach() != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    np.testing.assert_allclose(y.detach()[kept].numpy(), (x.detach()[kept] / (1 - p)).numpy(), rtol=1e-6)
    y.backward(torch.ones_like(y))
    np.testing.assert_allclose(x.grad.numpy(), kept.float().numpy() / (1 - p), rtol=1e-6)


def test_dropout_scale_train_false_moves_scaling_to_test() -> None:
    text = 'type: "Dropout" dropout_param { dropout_ratio: 0.25 scale_train: false }'
    x = randn(50, 40).abs() + 0.5
    y = build(text, [(50, 40)], TRAIN)(x)
    kept = y != 0
    np.testing.assert_array_equal(y[kept].numpy(), x[kept].numpy())
    np.testing.assert_allclose(build(text, [(50, 40)], TEST)(x).numpy(), x.numpy() * 0.75, rtol=1e-6)


# --- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, shape", [
    ('type: "Clip" clip_param { min: 0 }', (2, 3)),
    ('type: "Exp" exp_param { base: -2 }', (2, 3)),
    ('type: "Log" log_param { base: 0 }', (2, 3)),
    ('type: "Log" log_param { base: 1 }', (2, 3)),
    ('type: "Dropout" dropout_param { dropout_ratio: 1 }', (2, 3)),
    ('type: "PReLU"', (6,)),
])
def test_invalid_params(text: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(CaffeportError):
        build(text, [shape])


def test_neuron_needs_one_bottom() -> None:
    with pytest.raises(CaffeportError, match="bottom"):
        build('type: "ReLU"', [(2,), (2,)])


def test_absval_refuses_in_place() -> None:
    with pytest.raises(CaffeportError, match="in-place"):
        build('type: "AbsVal" bottom: "x" top: "x"', [(2, 3)])
    build('type: "ReLU" bottom: "x" top: "x"', [(2, 3)])  # other neurons may run in place
