"""Recurrent layers: RNN, LSTM and the single-step LSTMUnit, as Caffe's unrolled nets compute them.

Caffe (``recurrent_layer.cpp``, ``lstm_layer.cpp``, ``rnn_layer.cpp``, ``lstm_unit_layer.cpp``):

- bottoms ``x`` (T, N, ...), ``cont`` (T, N) sequence-continuation flags, optional static input
  ``x_static`` (N, ...), then with ``expose_hidden`` the initial states (h0 [, c0], each (1, N, H));
  tops the output (T, N, H) then with ``expose_hidden`` the final states (hT [, cT]);
- ``cont_t`` multiplies the previous hidden state before the recurrent product
  (h_conted = cont_t * h_{t-1}) and, in LSTMUnit, gates the previous cell: f = cont ? cont*sigmoid : 0;
- the parameter blobs are those of the unrolled net, in layer order: LSTM ``W_xc (4H, D)``,
  ``b_c (4H)``, [``W_xc_static (4H, D_s)``], ``W_hc (4H, H)``; RNN ``W_xh (H, D)``, ``b_h (H)``,
  [``W_xh_static (H, D_s)``], ``W_hh (H, H)``, ``W_ho (H, H)``, ``b_o (H)``; gate order i, f, o, g;
- without ``expose_hidden`` the layer is *stateful*: each forward starts from the final state of the
  previous forward (zeros at first), which only matters where ``cont_0 != 0``;
- gradients never cross forward calls: no diff reaches the exposed h0/c0 bottoms and diffs set on
  the exposed hT/cT tops are ignored (Caffe zeroes them: "we can't backpropagate across batches").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from caffeport.errors import CaffeportError
from caffeport.layers.base import Layer, Shape, register, run_function


class _LSTMUnitFn(torch.autograd.Function):
    """One LSTM step with Caffe's hand-written gradient.

    c_prev (N, H), x (N, 4H) gate pre-activations [i, f, o, g], cont (N,):
    c = f * c_prev + i * g with f = cont * sigmoid(x_f) (exactly 0 where cont == 0), h = o * tanh(c).
    Caffe's forget-gate gradient uses f * (1 - f) with the cont-scaled f, which differs from the
    true derivative when cont is neither 0 nor 1."""

    @staticmethod
    def forward(ctx, c_prev, x, cont):  # type: ignore[override]
        hdim = c_prev.shape[-1]
        xi, xf, xo, xg = x.split(hdim, dim=-1)
        i = torch.sigmoid(xi)
        cc = cont.unsqueeze(-1).to(x.dtype)
        f = torch.where(cc == 0, torch.zeros_like(xf), cc * torch.sigmoid(xf))
        o = torch.sigmoid(xo)
        g = torch.tanh(xg)
        c = f * c_prev + i * g
        tanh_c = torch.tanh(c)
        h = o * tanh_c
        ctx.save_for_backward(c_prev, i, f, o, g, tanh_c)
        return c, h

    @staticmethod
    def backward(ctx, dc, dh):  # type: ignore[override]
        c_prev, i, f, o, g, tanh_c = ctx.saved_tensors
        if dc is None:
            dc = torch.zeros_like(c_prev)
        if dh is None:
            dh = torch.zeros_like(c_prev)
        c_term = dc + dh * o * (1 - tanh_c * tanh_c)
        d_cprev = c_term * f
        di = c_term * g * i * (1 - i)
        df = c_term * c_prev * f * (1 - f)
        do = dh * tanh_c * o * (1 - o)
        dg = c_term * i * (1 - g * g)
        return d_cprev, torch.cat([di, df, do, dg], dim=-1), None


def lstm_unit(c_prev: torch.Tensor, x: torch.Tensor, cont: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Caffe's LSTMUnit step on (N, H), (N, 4H), (N,) tensors -> (c, h)."""
    return run_function(_LSTMUnitFn, c_prev, x, cont.detach())


@register("LSTMUnit")
class LSTMUnit(Layer):
    """One LSTM time step: bottoms c_prev (1, N, H), gate inputs x (1, N, 4H) ordered i, f, o, g,
    cont (1, N); tops c, h (1, N, H). ``cont == 0`` zeroes the forget gate (unlike ``nn.LSTMCell``,
    which has no reset input and applies its own weights); cont gets no gradient."""

    min_bottoms = 3
    max_bottoms = 3
    min_tops = 2
    max_tops = 2
    no_grad_bottoms = (2,)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        c, x, cont = bottom_shapes
        if len(c) != 3 or len(x) != 3 or len(cont) != 2:
            raise self.error(f"bottoms must be c_prev (1, N, H), x (1, N, 4H), cont (1, N); got {c}, {x}, {cont}")
        if c[0] != 1 or x[0] != 1 or cont[0] != 1:
            raise self.error(f"LSTMUnit runs a single timestep: first axes must be 1; got {c}, {x}, {cont}")
        n, h = c[1], c[2]
        if x[1] != n or cont[1] != n:
            raise self.error(f"bottoms disagree on the number of streams N: {c}, {x}, {cont}")
        if x[2] != 4 * h:
            raise self.error(f"gate input x must have 4*H = {4 * h} channels, got {x[2]}")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [tuple(bottom_shapes[0]), tuple(bottom_shapes[0])]

    def forward(self, c_prev: torch.Tensor, x: torch.Tensor, cont: torch.Tensor):
        c, h = lstm_unit(c_prev[0], x[0], cont[0])
        return c.unsqueeze(0), h.unsqueeze(0)


class _Recurrent(Layer):
    """Shared bottom/top bookkeeping of Caffe's RecurrentLayer."""

    num_states = 1  # recurrent state blobs (h for RNN; h, c for LSTM)

    def __init__(self, param, bottom_shapes, ctx):
        rp = param.recurrent_param
        n_exposed = self.num_states if rp.expose_hidden else 0
        # Counts depend on expose_hidden: set them before the base class checks them.
        self.min_bottoms = 2 + n_exposed
        self.max_bottoms = 3 + n_exposed
        self.min_tops = self.max_tops = 1 + n_exposed
        super().__init__(param, bottom_shapes, ctx)

    def _setup_common(self, bottom_shapes: list[Shape]) -> tuple[int, int, int | None]:
        rp = self.param.recurrent_param
        x = bottom_shapes[0]
        if len(x) < 2:
            raise self.error(f"bottom 0 must have at least 2 axes (T, N, ...), got {x}")
        self.T, n = int(x[0]), int(x[1])
        cont = bottom_shapes[1]
        if len(cont) != 2 or tuple(cont) != (self.T, n):
            raise self.error(f"bottom 1 (cont) must have shape (T, N) = {(self.T, n)}, got {cont}")
        self.hidden = int(rp.num_output)
        if self.hidden <= 0:
            raise self.error("recurrent_param.num_output must be positive")
        self.expose_hidden = bool(rp.expose_hidden)
        n_exposed = self.num_states if self.expose_hidden else 0
        self.static_input = len(bottom_shapes) > 2 + n_exposed
        static_dim = None
        if self.static_input:
            s = bottom_shapes[2]
            if len(s) < 1 or s[0] != n:
                raise self.error(f"static input (bottom 2) must have shape (N = {n}, ...), got {s}")
            static_dim = int(math.prod(s[1:]))
        if self.expose_hidden:
            off = 2 + int(self.static_input)
            for j, s in enumerate(bottom_shapes[off:]):
                if tuple(s) != (1, n, self.hidden):
                    raise self.error(f"initial state bottom {off + j} must have shape (1, {n}, {self.hidden}), "
                                     f"got {s}")
        self._states: list[torch.Tensor] | None = None
        return int(math.prod(x[2:])), n, static_dim

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        t, n = bottom_shapes[0][0], bottom_shapes[0][1]
        out: list[Shape] = [(t, n, self.hidden)]
        if self.expose_hidden:
            out += [(1, n, self.hidden)] * self.num_states
        return out

    def _split(self, bottoms: tuple[torch.Tensor, ...]):
        x, cont = bottoms[0], bottoms[1]
        if x.shape[0] != self.T:
            raise CaffeportError(f"{self.ctx.source}: layer '{self.name}' ({self.param.type}): input number of "
                                 f"timesteps changed from {self.T} to {x.shape[0]} (Caffe fixes T at setup)")
        t, n = int(x.shape[0]), int(x.shape[1])
        x3 = x.reshape(t, n, -1)
        cont = cont.detach().to(x.dtype)
        i = 2
        x_static = None
        if self.static_input:
            x_static = bottoms[2].reshape(n, -1)
            i = 3
        if self.expose_hidden:
            # Caffe shares only the data of these bottoms with the unrolled net: no gradient reaches them.
            init = [b.detach().reshape(n, self.hidden) for b in bottoms[i:i + self.num_states]]
        else:
            prev = self._states
            if prev is None or prev[0].shape != (n, self.hidden):
                prev = [x.new_zeros(n, self.hidden) for _ in range(self.num_states)]
            init = [p.to(device=x.device, dtype=x.dtype) for p in prev]
        return x3, cont, x_static, init

    def _finish(self, out: torch.Tensor, final: list[torch.Tensor]):
        n = out.shape[1]
        final = [f.detach() for f in final]
        if not self.expose_hidden:
            self._states = final
            return out
        return (out, *[f.reshape(1, n, self.hidden) for f in final])

    def reset(self) -> None:
        """Zero the carried-over hidden state (Caffe's ``RecurrentLayer::Reset``)."""
        self._states = None


@register("LSTM")
class LSTM(_Recurrent):
    """Caffe's LSTM over (T, N, ...) with sequence-continuation flags.

    Differs from ``nn.LSTM``: one bias (b_c, no separate hidden bias), gate order i, f, o, g,
    cont_t resets h_{t-1} and c_{t-1} per stream, an optional static input added to every step's
    gates, stateful carry-over between forwards, and no gradient across forward calls."""

    num_states = 2

    def setup(self, bottom_shapes: list[Shape]) -> None:
        d, _, static_dim = self._setup_common(bottom_shapes)
        rp = self.param.recurrent_param
        h4 = 4 * self.hidden
        self.add_blob((h4, d), rp.weight_filler)  # W_xc
        self.add_blob((h4,), rp.bias_filler)  # b_c
        if static_dim is not None:
            self.add_blob((h4, static_dim), rp.weight_filler)  # W_xc_static
        self.add_blob((h4, self.hidden), rp.weight_filler)  # W_hc

    def forward(self, *bottoms: torch.Tensor):
        x3, cont, x_static, (h, c) = self._split(bottoms)
        w_xc, b_c = self.blobs[0], self.blobs[1]
        w_hc = self.blobs[-1]
        gx = F.linear(x3, w_xc, b_c)  # (T, N, 4H)
        if x_static is not None:
            gx = gx + F.linear(x_static, self.blobs[2]).unsqueeze(0)
        hs = []
        for t in range(x3.shape[0]):
            ct = cont[t]
            gates = F.linear(ct.unsqueeze(1) * h, w_hc) + gx[t]
            c, h = run_function(_LSTMUnitFn, c, gates, ct)
            hs.append(h)
        return self._finish(torch.stack(hs), [h, c])


@register("RNN")
class RNN(_Recurrent):
    """Caffe's Elman RNN: h_t = tanh(W_hh (cont_t * h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_s]),
    o_t = tanh(W_ho h_t + b_o); the top is o (not h, unlike ``nn.RNN``), stateful between forwards."""

    num_states = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        d, _, static_dim = self._setup_common(bottom_shapes)
        rp = self.param.recurrent_param
        hd = self.hidden
        self.add_blob((hd, d), rp.weight_filler)  # W_xh
        self.add_blob((hd,), rp.bias_filler)  # b_h
        if static_dim is not None:
            self.add_blob((hd, static_dim), rp.weight_filler)  # W_xh_static
        self.add_blob((hd, hd), rp.weight_filler)  # W_hh
        self.add_blob((hd, hd), rp.weight_filler)  # W_ho
        self.add_blob((hd,), rp.bias_filler)  # b_o

    def forward(self, *bottoms: torch.Tensor):
        x3, cont, x_static, (h,) = self._split(bottoms)
        w_xh, b_h = self.blobs[0], self.blobs[1]
        w_hh, w_ho, b_o = self.blobs[-3], self.blobs[-2], self.blobs[-1]
        hx = F.linear(x3, w_xh, b_h)
        if x_static is not None:
            hx = hx + F.linear(x_static, self.blobs[2]).unsqueeze(0)
        hs = []
        for t in range(x3.shape[0]):
            h = torch.tanh(F.linear(cont[t].unsqueeze(1) * h, w_hh) + hx[t])
            hs.append(h)
        o = torch.tanh(F.linear(torch.stack(hs), w_ho, b_o))
        return self._finish(o, [h])
