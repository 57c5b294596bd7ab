"""Loss layers and Accuracy beyond the golden cases: numpy references of Caffe's formulas,
finite-difference gradient checks (as Caffe's GradientChecker), and parameter validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2
from tests.layers.helpers import fd_grad, make

RNG = np.random.default_rng(1234)


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def val(t: torch.Tensor) -> float:
    return float(t.detach())


def analytic(f, xs):
    out = f()
    return [g.numpy() if g is not None else np.zeros(x.shape)
            for g, x in zip(torch.autograd.grad(out, xs, allow_unused=True), xs)]


def check_grad(f, xs, atol=1e-6, rtol=1e-4):
    got = analytic(f, xs)
    with torch.no_grad():
        for x, g in zip(xs, got):
            np.testing.assert_allclose(g, fd_grad(f, x), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------
# SoftmaxWithLoss
# ------------------------------------------------------------------------------------------------
def np_softmax_loss(x, label, axis, ignore, mode):
    x = np.moveaxis(x, axis, -1)
    lab = label.reshape(x.shape[:-1]).astype(int)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    outer = int(np.prod(x.shape[:axis]))
    valid = np.ones(lab.shape, bool) if ignore is None else lab != ignore
    safe = np.where(valid, lab, 0)
    picked = np.take_along_axis(p, safe[..., None], -1)[..., 0]
    total = -np.log(np.maximum(picked, np.finfo(np.float32).tiny))[valid].sum()
    norm = {"FULL": lab.size, "VALID": valid.sum(), "BATCH_SIZE": outer, "NONE": 1}[mode]
    return total / max(1, norm)


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_softmax_loss_axis2_matches_numpy_and_fd(mode):
    shape = (2, 3, 4, 2)  # softmax over axis 2 (4 classes)
    x = RNG.normal(size=shape)
    label = RNG.integers(0, 4, size=(2, 3, 2)).astype(np.float64)
    label[0, 1, 0] = 3
    label[1, 2, 1] = 3
    params = f"softmax_param {{ axis: 2 }} loss_param {{ ignore_label: 3 normalization: {mode} }}"
    layer = make("SoftmaxWithLoss", params, [shape, label.shape])
    xt = t64(x, True)
    lt = t64(label)
    ref = np_softmax_loss(x, label, 2, 3, mode)
    assert val(layer(xt, lt)) == pytest.approx(ref, rel=1e-10)
    check_grad(lambda: layer(xt, lt), [xt])


def test_softmax_loss_legacy_normalize_false_is_batch_size_and_negative_axis():
    shape = (3, 5, 2)
    x = RNG.normal(size=shape)
    label = RNG.integers(0, 5, size=(3, 2)).astype(np.float64)
    layer = make("SoftmaxWithLoss", "softmax_param { axis: -2 } loss_param { normalize: false }", [shape, label.shape])
    assert val(layer(t64(x), t64(label))) == pytest.approx(np_softmax_loss(x, label, 1, None, "BATCH_SIZE"))


def test_softmax_loss_all_ignored_clamps_normalizer_and_gives_zero():
    x = t64(RNG.normal(size=(2, 3)), True)
    label = t64([1.0, 1.0])
    layer = make("SoftmaxWithLoss", "loss_param { ignore_label: 1 }", [(2, 3), (2,)])
    loss = layer(x, label)
    loss.backward()
    assert val(loss) == 0.0
    assert np.all(x.grad.numpy() == 0)


def test_softmax_loss_clamp_forward_not_backward():
    # p of the true class underflows: loss uses log(FLT_MIN), gradient stays p - 1.
    x = t64([[0.0, 200.0]], True)
    layer = make("SoftmaxWithLoss", "", [(1, 2), (1,)])
    loss = layer(x, t64([0.0]))
    loss.backward()
    assert val(loss) == pytest.approx(-np.log(np.float32(np.finfo(np.float32).tiny)), rel=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), [[-1.0, 1.0]], atol=1e-12)


def test_softmax_loss_second_top_is_softmax():
    x = RNG.normal(size=(2, 3))
    layer = make("SoftmaxWithLoss", "", [(2, 3), (2,)], ntop=2)
    _, prob = layer(t64(x), t64([0.0, 2.0]))
    e = np.exp(x - x.max(1, keepdims=True))
    np.testing.assert_allclose(prob.numpy(), e / e.sum(1, keepdims=True), rtol=1e-12)
    assert layer.top_shapes([(2, 3), (2,)]) == [(), (2, 3)]


# ------------------------------------------------------------------------------------------------
# SigmoidCrossEntropyLoss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,norm", [
    ("", lambda n, c, v: n),  # default BATCH_SIZE
    ("loss_param { normalization: FULL }", lambda n, c, v: c),
    ("loss_param { normalization: NONE }", lambda n, c, v: 1),
    ("loss_param { normalize: true ignore_label: 0 }", lambda n, c, v: v),  # legacy -> VALID
])
def test_sigmoid_ce_normalizations_and_fd(params, norm):
    shape = (3, 2, 2)
    x = RNG.normal(size=shape) * 3
    target = RNG.random(size=shape)
    target[0, 0, 0] = 0.0
    target[2, 1, 1] = 1.0
    layer = make("SigmoidCrossEntropyLoss", params, [shape, shape])
    xt = t64(x, True)
    tt = t64(target)
    valid = np.ones(shape, bool)
    if "ignore_label" in params:
        valid = target.astype(int) != 0  # truncated soft targets in [0, 1) are ignored too
    per = -(target * np.log(1 / (1 + np.exp(-x))) + (1 - target) * np.log(1 - 1 / (1 + np.exp(-x))))
    ref = per[valid].sum() / max(1, norm(3, x.size, valid.sum()))
    assert val(layer(xt, tt)) == pytest.approx(ref, rel=1e-9)
    check_grad(lambda: layer(xt, tt), [xt])


# ------------------------------------------------------------------------------------------------
# InfogainLoss
# ------------------------------------------------------------------------------------------------
def test_infogain_three_bottoms_axis_ignore_matches_numpy_and_fd():
    shape = (2, 3, 4)  # classes on axis 1, inner 4
    x = RNG.normal(size=shape)
    label = RNG.integers(0, 3, size=(2, 4)).astype(np.float64)
    label[0, 0] = 2
    h = RNG.random(size=(3, 3))
    layer = make("InfogainLoss", "loss_param { ignore_label: 2 normalization: VALID }",
                 [shape, label.shape, (1, 1, 3, 3)])
    xt = t64(x, True)
    ref_p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    lab = label.astype(int)
    total, count = 0.0, 0
    for n in range(2):
        for j in range(4):
            if lab[n, j] == 2:
                continue
            total -= (h[lab[n, j]] * np.log(ref_p[n, :, j])).sum()
            count += 1
    ht = t64(h.reshape(1, 1, 3, 3))
    assert val(layer(xt, t64(label), ht)) == pytest.approx(total / count, rel=1e-10)
    check_grad(lambda: layer(xt, t64(label), ht), [xt])


def test_infogain_source_file_resolves_against_root(tmp_path):
    h = np.arange(9, dtype=np.float32).reshape(3, 3) / 10
    bp = caffe_pb2.BlobProto()
    bp.num, bp.channels, bp.height, bp.width = 1, 1, 3, 3  # legacy dims, as Caffe's tools write
    bp.data.extend(h.ravel().tolist())
    (tmp_path / "H.binaryproto").write_bytes(bp.SerializeToString())
    layer = make("InfogainLoss", 'infogain_loss_param { source: "H.binaryproto" }', [(2, 3), (2,)], root=tmp_path)
    x = RNG.normal(size=(2, 3))
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    ref = -(h[1] * np.log(p[0])).sum() - (h[0] * np.log(p[1])).sum()
    assert val(layer(t64(x), t64([1.0, 0.0]))) == pytest.approx(ref / 2, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# MultinomialLogisticLoss, EuclideanLoss, HingeLoss
# ------------------------------------------------------------------------------------------------
def test_multinomial_fd_and_clamped_gradient():
    p = RNG.random(size=(4, 3)) + 0.1
    label = t64([0.0, 2.0, 1.0, 2.0])
    layer = make("MultinomialLogisticLoss", "", [(4, 3), (4,)])
    pt = t64(p, True)
    check_grad(lambda: layer(pt, label), [pt])
    # p == 0 at the label: loss uses 1e-20 and Caffe's gradient is -1/(N * 1e-20), not 0.
    z = t64([[0.0, 1.0]], True)
    loss = layer(z, t64([0.0]))
    loss.backward()
    assert val(loss) == pytest.approx(-np.log(1e-20))
    assert z.grad[0, 0].item() == pytest.approx(-1e20)
    assert z.grad[0, 1].item() == 0.0


def test_euclidean_fd_both_bottoms():
    a = t64(RNG.normal(size=(3, 2, 2)), True)
    b = t64(RNG.normal(size=(3, 4)), True)  # same count, different shape
    layer = make("EuclideanLoss", "", [(3, 2, 2), (3, 4)])
    assert val(layer(a, b)) == pytest.approx(((a.detach().numpy().reshape(3, 4) - b.detach().numpy()) ** 2).sum() / 6)
    check_grad(lambda: layer(a, b), [a, b])


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_fd_4d(norm):
    x = RNG.normal(size=(3, 2, 2, 1))
    x[np.abs(np.abs(x) - 1) < 0.05] += 0.2  # stay away from the kink
    label = t64([0.0, 3.0, 1.0])
    layer = make("HingeLoss", f"hinge_loss_param {{ norm: {norm} }}", [x.shape, (3,)])
    xt = t64(x, True)
    flat = x.reshape(3, 4).copy()
    for i, lab in enumerate([0, 3, 1]):
        flat[i, lab] *= -1
    t = np.maximum(0, 1 + flat)
    ref = (t if norm == "L1" else t * t).sum() / 3
    assert val(layer(xt, label)) == pytest.approx(ref)
    check_grad(lambda: layer(xt, label), [xt])


# ------------------------------------------------------------------------------------------------
# ContrastiveLoss
# ------------------------------------------------------------------------------------------------
def np_contrastive_grad(a, b, sim, margin, legacy):
    n = a.shape[0]
    diff = a - b
    d2 = (diff ** 2).sum(1)
    ga = np.zeros_like(a)
    for i in range(n):
        if int(sim[i]):
            ga[i] = diff[i] / n
        elif legacy:
            ga[i] = -diff[i] / n if margin - d2[i] > 0 else 0
        else:
            d = np.sqrt(d2[i])
            ga[i] = -(margin - d) / (d + 1e-4) * diff[i] / n if margin - d > 0 else 0
    return ga


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_gradient_is_caffes_formula(legacy):
    a = RNG.normal(size=(6, 3, 1, 1)) * 0.5
    b = RNG.normal(size=(6, 3, 1, 1)) * 0.5
    sim = np.array([1, 0, 0, 1, 0, 0.7])  # 0.7 truncates to 0: dissimilar
    layer = make("ContrastiveLoss", f"contrastive_loss_param {{ margin: 2.5 legacy_version: {str(legacy).lower()} }}",
                 [a.shape, b.shape, (6, 1, 1, 1)])
    at, bt = t64(a, True), t64(b, True)
    loss = layer(at, bt, t64(sim.reshape(6, 1, 1, 1)))
    loss.backward()
    ref = np_contrastive_grad(a.reshape(6, 3), b.reshape(6, 3), sim, 2.5, legacy)
    np.testing.assert_allclose(at.grad.numpy().reshape(6, 3), ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(bt.grad.numpy().reshape(6, 3), -ref, rtol=1e-10, atol=1e-14)
    if legacy:  # the legacy loss is smooth away from the margin: Caffe's gradient is exact
        check_grad(lambda: layer(at, bt, t64(sim.reshape(6, 1, 1, 1))), [at, bt])


# ------------------------------------------------------------------------------------------------
# SmoothL1Loss (py-faster-rcnn)
# ------------------------------------------------------------------------------------------------
def test_smooth_l1_with_weights_sigma_matches_numpy_and_fd():
    shape = (2, 4, 1, 3)
    a, b = RNG.normal(size=shape), RNG.normal(size=shape)
    w_in, w_out = RNG.random(size=shape), RNG.random(size=shape)
    layer = make("SmoothL1Loss", "smooth_l1_loss_param { sigma: 2.0 }", [shape] * 4)
    d = w_in * (a - b)
    s2 = 4.0
    f = np.where(np.abs(d) < 1 / s2, 0.5 * s2 * d * d, np.abs(d) - 0.5 / s2)
    at, bt = t64(a, True), t64(b, True)
    wi, wo = t64(w_in), t64(w_out)
    assert val(layer(at, bt, wi, wo)) == pytest.approx((w_out * f).sum() / 2)
    check_grad(lambda: layer(at, bt, wi, wo), [at, bt])


def test_smooth_l1_default_sigma_two_bottoms():
    a = np.array([[0.5, -2.0, 0.0]])
    layer = make("SmoothL1Loss", "", [(1, 3), (1, 3)])
    assert val(layer(t64(a), t64(np.zeros((1, 3))))) == pytest.approx(0.125 + 1.5)


# ------------------------------------------------------------------------------------------------
# Accuracy
# ------------------------------------------------------------------------------------------------
def np_accuracy(x, label, axis, top_k, ignore):
    x = np.moveaxis(x, axis, -1)
    c = x.shape[-1]
    x = x.reshape(-1, c)
    lab = label.reshape(-1).astype(int)
    correct = count = 0
    hits, nums = np.zeros(c), np.zeros(c)
    for row, lb in zip(x, lab):
        if ignore is not None and lb == ignore:
            continue
        nums[lb] += 1
        count += 1
        if (row >= row[lb]).sum() - 1 < top_k:
            correct += 1
            hits[lb] += 1
    per = np.where(nums > 0, hits / np.maximum(nums, 1), 0)
    return (correct / count if count else 0.0), per


def test_accuracy_spatial_axis_ties_count_against():
    x = RNG.integers(0, 3, size=(2, 4, 3)).astype(np.float64)  # many ties
    label = RNG.integers(0, 4, size=(2, 3)).astype(np.float64)
    layer = make("Accuracy", "accuracy_param { top_k: 2 axis: 1 ignore_label: 0 }", [x.shape, label.shape], ntop=2)
    acc, per = layer(t64(x), t64(label))
    ref_acc, ref_per = np_accuracy(np.moveaxis(x, 1, 2), label, 2, 2, 0)
    assert val(acc) == pytest.approx(ref_acc)
    np.testing.assert_allclose(per.numpy(), ref_per)


def test_accuracy_tie_rule_explicit_and_no_labels():
    layer = make("Accuracy", "", [(2, 3), (2,)])
    # row 0: true class tied with another at the top -> wrong; row 1: strict max -> right
    assert val(layer(t64([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]]), t64([0.0, 1.0]))) == 0.5
    ignore_all = make("Accuracy", "accuracy_param { ignore_label: 1 }", [(2, 3), (2,)])
    assert val(ignore_all(t64(np.zeros((2, 3))), t64([1.0, 1.0]))) == 0.0


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("type_name,params,shapes,msg", [
    ("SoftmaxWithLoss", "", [(2, 3, 4), (2, 3)], "number of labels"),
    ("SoftmaxWithLoss", "softmax_param { axis: 3 }", [(2, 3), (2,)], "out of range"),
    ("SoftmaxWithLoss", "", [(2, 3), (3,)], "first dimension"),
    ("SigmoidCrossEntropyLoss", "", [(2, 3), (2, 4)], "same count"),
    ("InfogainLoss", "", [(2, 3), (2,)], "source"),
    ("InfogainLoss", 'infogain_loss_param { source: "missing.binaryproto" }', [(2, 3), (2,)], "not found"),
    ("InfogainLoss", "loss_param { normalize: true }", [(2, 3), (2,), (3, 3)], "normalize"),
    ("InfogainLoss", "", [(2, 3), (2,), (2, 2)], "infogain"),
    ("Accuracy", "accuracy_param { top_k: 4 }", [(2, 3), (2,)], "top_k"),
    ("Accuracy", "accuracy_param { axis: 2 }", [(2, 3), (2,)], "out of range"),
    ("ContrastiveLoss", "", [(2, 3, 2, 1), (2, 3, 2, 1), (2,)], "bottoms must be"),
    ("ContrastiveLoss", "", [(2, 3, 1, 1), (3, 3, 1, 1), (2,)], "pairs"),
    ("SmoothL1Loss", "", [(2, 3), (2, 3), (2, 3)], "inside and outside"),
    ("SmoothL1Loss", "", [(2, 3), (2, 4)], "bottom 1"),
    ("EuclideanLoss", "", [(2, 3), (2, 4)], "same dimension"),
    ("MultinomialLogisticLoss", "", [(2, 3), (2, 2)], "one value per example"),
])
def test_invalid_params(type_name, params, shapes, msg):
    with pytest.raises(CaffeportError, match=msg):
        make(type_name, params, shapes)


def test_bottom_count_checked():
    with pytest.raises(CaffeportError, match="bottom"):
        make("SoftmaxWithLoss", "", [(2, 3)])


@pytest.mark.parametrize("type_name, target", [
    ("SoftmaxWithLoss", lambda: torch.full((2, 4), -1.0)),
    ("SigmoidCrossEntropyLoss", lambda: torch.full((2, 3, 4), -1.0)),
])
def test_every_position_ignored_gives_positive_zero(type_name, target):
    # Caffe accumulates `loss -= ...` from 0 and divides by max(1, valid): +0, which its log prints
    # as "0" (a -0 would print "-0"); the gradient is zero everywhere.
    layer = make(type_name, "loss_param { ignore_label: -1 }", [(2, 3, 4), tuple(target().shape)])
    x = t64(RNG.normal(size=(2, 3, 4)), grad=True)
    loss = layer(x, target().double())
    assert val(loss) == 0.0 and np.copysign(1.0, val(loss)) == 1.0
    loss.backward()
    assert float(x.grad.abs().sum()) == 0.0
