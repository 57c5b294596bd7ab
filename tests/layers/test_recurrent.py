"""LSTM, RNN and LSTMUnit beyond the golden cases: numpy references of Caffe's unrolled nets,
finite-difference gradient checks, stateful carry-over, exposed hidden state, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffeport.errors import CaffeportError
from tests.layers.helpers import fd_grad, make

RNG = np.random.default_rng(7)


def randomize(layer, scale=0.5):
    with torch.no_grad():
        for p in layer.blobs:
            p.copy_(torch.tensor(RNG.normal(size=tuple(p.shape)) * scale))
    return layer.double()


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def sig(z):
    return 1 / (1 + np.exp(-z))


def np_lstm(x, cont, wxc, bc, whc, xs=None, wst=None, h0=None, c0=None):
    t_, n, _ = x.shape
    hd = whc.shape[1]
    h = np.zeros((n, hd)) if h0 is None else h0
    c = np.zeros((n, hd)) if c0 is None else c0
    hs = []
    for t in range(t_):
        g = x[t] @ wxc.T + bc + (cont[t][:, None] * h) @ whc.T
        if xs is not None:
            g = g + xs @ wst.T
        i, f, o, gg = sig(g[:, :hd]), sig(g[:, hd:2 * hd]), sig(g[:, 2 * hd:3 * hd]), np.tanh(g[:, 3 * hd:])
        f = np.where(cont[t][:, None] == 0, 0, cont[t][:, None] * f)
        c = f * c + i * gg
        h = o * np.tanh(c)
        hs.append(h)
    return np.stack(hs), h, c


def np_rnn(x, cont, wxh, bh, whh, who, bo, xs=None, wst=None, h0=None):
    t_, n, _ = x.shape
    h = np.zeros((n, whh.shape[0])) if h0 is None else h0
    os_ = []
    for t in range(t_):
        z = x[t] @ wxh.T + bh + (cont[t][:, None] * h) @ whh.T
        if xs is not None:
            z = z + xs @ wst.T
        h = np.tanh(z)
        os_.append(np.tanh(h @ who.T + bo))
    return np.stack(os_), h


def fd_check(f, xs, eps=1e-6, atol=1e-7, rtol=1e-5):
    out = f()
    got = torch.autograd.grad(out, xs, allow_unused=True)
    with torch.no_grad():
        for x, g in zip(xs, got):
            num = fd_grad(f, x, eps)
            np.testing.assert_allclose(g.numpy() if g is not None else np.zeros(x.shape), num, atol=atol, rtol=rtol)


CONT = np.array([[0, 0, 1], [1, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=np.float64)  # T=4, N=3


def test_lstm_blob_shapes_with_static_input():
    layer = make("LSTM", "recurrent_param { num_output: 5 weight_filler { type: 'constant' value: 0.5 } "
                         "bias_filler { type: 'constant' value: 0.25 } }",
                 [(4, 3, 2, 3), (4, 3), (3, 7)])
    assert [tuple(p.shape) for p in layer.blobs] == [(20, 6), (20,), (20, 7), (20, 5)]
    assert float(layer.blobs[0][0, 0].detach()) == 0.5 and float(layer.blobs[1][0].detach()) == 0.25
    assert layer.top_shapes([(4, 3, 2, 3), (4, 3), (3, 7)]) == [(4, 3, 5)]


def test_lstm_static_expose_hidden_matches_numpy():
    layer = randomize(make("LSTM", "recurrent_param { num_output: 4 expose_hidden: true }",
                           [(4, 3, 2), (4, 3), (3, 5), (1, 3, 4), (1, 3, 4)], ntop=3))
    x, xs = RNG.normal(size=(4, 3, 2)), RNG.normal(size=(3, 5))
    h0, c0 = RNG.normal(size=(1, 3, 4)), RNG.normal(size=(1, 3, 4))
    h, ht, ct = layer(t64(x), t64(CONT), t64(xs), t64(h0), t64(c0))
    wxc, bc, wst, whc = (p.detach().numpy() for p in layer.blobs)
    ref_h, ref_ht, ref_ct = np_lstm(x, CONT, wxc, bc, whc, xs, wst, h0[0], c0[0])
    np.testing.assert_allclose(h.detach().numpy(), ref_h, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ht.numpy()[0], ref_ht, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ct.numpy()[0], ref_ct, rtol=1e-10, atol=1e-12)


def test_lstm_fd_gradients_x_static_params():
    layer = randomize(make("LSTM", "recurrent_param { num_output: 3 }", [(4, 3, 2), (4, 3), (3, 2)]))
    x, xs = t64(RNG.normal(size=(4, 3, 2)), True), t64(RNG.normal(size=(3, 2)), True)
    w = t64(RNG.normal(size=(4, 3, 3)))
    cont = t64(CONT)

    def f():
        layer.reset()  # every evaluation from the zero state
        return (layer(x, cont, xs) * w).sum()

    fd_check(f, [x, xs, *layer.blobs])


def test_rnn_fd_gradients_and_numpy_with_static():
    layer = randomize(make("RNN", "recurrent_param { num_output: 3 }", [(4, 3, 2), (4, 3), (3, 2)]))
    assert [tuple(p.shape) for p in layer.blobs] == [(3, 2), (3,), (3, 2), (3, 3), (3, 3), (3,)]
    x, xs = t64(RNG.normal(size=(4, 3, 2)), True), t64(RNG.normal(size=(3, 2)), True)
    w = t64(RNG.normal(size=(4, 3, 3)))
    cont = t64(CONT)
    wxh, bh, wst, whh, who, bo = (p.detach().numpy() for p in layer.blobs)
    ref, _ = np_rnn(x.detach().numpy(), CONT, wxh, bh, whh, who, bo, xs.detach().numpy(), wst)
    np.testing.assert_allclose(layer(x, cont, xs).detach().numpy(), ref, rtol=1e-10, atol=1e-12)

    def f():
        layer.reset()
        return (layer(x, cont, xs) * w).sum()

    fd_check(f, [x, xs, *layer.blobs])


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_state_carries_over_between_forwards(kind):
    # Two forwards of T=3 with cont_0 = 1 the second time == one forward of T=6.
    params = "recurrent_param { num_output: 3 }"
    short = randomize(make(kind, params, [(3, 2, 2), (3, 2)]))
    long = make(kind, params, [(6, 2, 2), (6, 2)]).double()
    with torch.no_grad():
        for a, b in zip(long.blobs, short.blobs):
            a.copy_(b)
    x = RNG.normal(size=(6, 2, 2))
    cont = np.ones((6, 2))
    cont[0] = 0
    first = short(t64(x[:3]), t64(cont[:3]))
    second = short(t64(x[3:]), t64(cont[3:]))
    whole = long(t64(x), t64(cont))
    np.testing.assert_allclose(torch.cat([first, second]).detach().numpy(), whole.detach().numpy(), rtol=1e-12)
    short.reset()
    again = short(t64(x[3:]), t64(cont[3:]))
    assert not np.allclose(again.detach().numpy(), second.detach().numpy())


def test_exposed_hidden_gets_no_gradient_and_final_state_diffs_ignored():
    layer = randomize(make("LSTM", "recurrent_param { num_output: 2 expose_hidden: true }",
                           [(3, 2, 2), (3, 2), (1, 2, 2), (1, 2, 2)], ntop=3))
    x = t64(RNG.normal(size=(3, 2, 2)), True)
    h0, c0 = t64(RNG.normal(size=(1, 2, 2)), True), t64(RNG.normal(size=(1, 2, 2)), True)
    cont = t64(np.ones((3, 2)))
    h, ht, ct = layer(x, cont, h0, c0)
    assert not ht.requires_grad and not ct.requires_grad
    h.sum().backward()
    assert h0.grad is None and c0.grad is None
    assert x.grad is not None


def np_lstm_unit_backward(c_prev, x, cont, dc, dh):
    hd = c_prev.shape[1]
    i, o, g = sig(x[:, :hd]), sig(x[:, 2 * hd:3 * hd]), np.tanh(x[:, 3 * hd:])
    f = np.where(cont[:, None] == 0, 0, cont[:, None] * sig(x[:, hd:2 * hd]))
    c = f * c_prev + i * g
    tc = np.tanh(c)
    ct = dc + dh * o * (1 - tc * tc)
    dx = np.concatenate([ct * g * i * (1 - i), ct * c_prev * f * (1 - f), dh * tc * o * (1 - o),
                         ct * i * (1 - g * g)], axis=1)
    return c, o * tc, ct * f, dx


def test_lstm_unit_non_binary_cont_uses_caffes_gradient():
    layer = make("LSTMUnit", "", [(1, 3, 2), (1, 3, 8), (1, 3)], ntop=2)
    c_prev, x = RNG.normal(size=(1, 3, 2)), RNG.normal(size=(1, 3, 8))
    cont = np.array([[0.0, 0.5, 2.0]])
    dc, dh = RNG.normal(size=(1, 3, 2)), RNG.normal(size=(1, 3, 2))
    ct, xt = t64(c_prev, True), t64(x, True)
    c, h = layer(ct, xt, t64(cont))
    torch.autograd.backward([c, h], [t64(dc), t64(dh)])
    ref_c, ref_h, ref_dcp, ref_dx = np_lstm_unit_backward(c_prev[0], x[0], cont[0], dc[0], dh[0])
    np.testing.assert_allclose(c.detach().numpy()[0], ref_c, rtol=1e-12)
    np.testing.assert_allclose(h.detach().numpy()[0], ref_h, rtol=1e-12)
    np.testing.assert_allclose(ct.grad.numpy()[0], ref_dcp, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(xt.grad.numpy()[0], ref_dx, rtol=1e-12, atol=1e-15)


def test_lstm_unit_fd_binary_cont():
    layer = make("LSTMUnit", "", [(1, 4, 3), (1, 4, 12), (1, 4)], ntop=2)
    ct, xt = t64(RNG.normal(size=(1, 4, 3)), True), t64(RNG.normal(size=(1, 4, 12)), True)
    cont = t64([[1.0, 0.0, 1.0, 0.0]])
    wc, wh = t64(RNG.normal(size=(1, 4, 3))), t64(RNG.normal(size=(1, 4, 3)))

    def f():
        c, h = layer(ct, xt, cont)
        return (c * wc).sum() + (h * wh).sum()

    fd_check(f, [ct, xt])


@pytest.mark.parametrize("type_name,params,shapes,ntop,msg", [
    ("LSTM", "recurrent_param { num_output: 0 }", [(2, 3, 4), (2, 3)], 1, "num_output"),
    ("LSTM", "recurrent_param { num_output: 2 }", [(2, 3, 4), (2, 4)], 1, "cont"),
    ("LSTM", "recurrent_param { num_output: 2 }", [(2,), (2, 3)], 1, "at least 2 axes"),
    ("RNN", "recurrent_param { num_output: 2 }", [(2, 3, 4), (2, 3), (4, 5)], 1, "static input"),
    ("RNN", "recurrent_param { num_output: 2 expose_hidden: true }", [(2, 3, 4), (2, 3)], 2, "bottoms"),
    ("RNN", "recurrent_param { num_output: 2 expose_hidden: true }", [(2, 3, 4), (2, 3), (1, 3, 3)], 2,
     "initial state"),
    ("LSTM", "recurrent_param { num_output: 2 expose_hidden: true }", [(2, 3, 4), (2, 3), (1, 3, 2), (1, 3, 2)], 1,
     "tops"),
    ("LSTMUnit", "", [(1, 3, 2), (1, 3, 7), (1, 3)], 2, "4\\*H"),
    ("LSTMUnit", "", [(2, 3, 2), (2, 3, 8), (2, 3)], 2, "single timestep"),
    ("LSTMUnit", "", [(1, 3, 2), (1, 4, 8), (1, 3)], 2, "streams"),
])
def test_invalid(type_name, params, shapes, ntop, msg):
    with pytest.raises(CaffeportError, match=msg):
        make(type_name, params, shapes, ntop)


def test_timestep_change_is_an_error():
    layer = make("RNN", "recurrent_param { num_output: 2 }", [(3, 2, 1), (3, 2)])
    with pytest.raises(CaffeportError, match="timesteps"):
        layer(torch.zeros(4, 2, 1), torch.zeros(4, 2))
