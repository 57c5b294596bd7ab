"""Opt-in fast training: ``caffeport train --fast``, ``Solver.enable_fast()``, ``from_solver(..., fast=True)``.

The update is untouched: the same :mod:`caffeport.optim` optimizer (Caffe's clip -> ÷iter_size ->
decay -> rule, on fp32 master weights and fp32 gradients). Only the net's forward/backward changes:

1. ``channels_last`` memory format for 4-D weights (and their optimizer history) and 4-D inputs;
2. bf16 autocast (``precision="auto"``: on CPUs with AVX512-BF16/AMX, on CUDA devices with bf16;
   ``"bf16"`` forces it, ``"fp32"`` keeps float32) *only inside the layers whose weights are
   matrices or kernels* (floating blobs of 2+ dims: Convolution, InnerProduct, Deconvolution,
   recurrent weights). Their tops go back to fp32 at once, so every other layer (pooling, LRN,
   ReLU, Dropout masks, Softmax, the losses) computes in fp32 as in exact mode; the weights stay fp32
   (autocast casts a bf16 copy for the matmul) and their gradients arrive in fp32. Eager on the CPU,
   a layer with its own ``forward_low_precision`` (InnerProduct) runs that instead of autocast: the
   same bf16 GEMMs, but the bf16 weight copy and the weight gradient live in buffers reused every
   step. A fresh 150 MB tensor per step (CaffeNet's fc6 weight copy, its gradient) costs more in
   page faults than the GEMM that fills it: this took CaffeNet batch 32 from 1.44x to 1.76x exact;
3. ``torch.compile`` (inductor) of the whole forward (data layers excluded) and its backward, by
   default on CUDA only (``compile=True`` asks for it anywhere; ``CAFFEPORT_NO_COMPILE=1`` skips it):
   on this 2-core CPU compiled training was slower than eager (CaffeNet batch 32: 1.24x exact
   compiled, 1.41-1.46x eager before the reused buffers, same session) and its first step compiles
   for 50-70 s. When no
   compiler is usable, one :class:`~caffeport.fast.FastModeNotice` and eager instead. Compiled
   random ops use torch's eager RNG stream (inductor's ``fallback_random``), so Dropout draws the
   masks exact mode would;
4. data layers (LMDB, HDF5, ImageData...) run eagerly, as in exact mode, and feed the compute.

The first batch is checked: the exact fp32 forward/backward and the fast one run on the same batch
(same RNG state), and the relative differences of the loss (``|fast - exact| / |exact|``) and of the
gradients (global L2: ``||g_fast - g_exact|| / ||g_exact||`` over every learnable blob) are stored
(``loss_rel_error``, ``grad_rel_error``, the worst blob in ``worst_blob``) and logged. Training is
refused with a :class:`~caffeport.errors.CaffeportError` when a value is not finite or a difference
is above the tolerance: :data:`FP32_TOLERANCES` (loss 1e-4, gradient 1e-3) or
:data:`BF16_TOLERANCES` (loss 5e-2, gradient 0.1). The check's extra passes leave the gradients,
the data stream and the RNG as one exact pass would.

Where Caffe differs: bf16 keeps 8 mantissa bits in conv/fc (the loss curve drifts a little from
exact mode's; see the README's cats-vs-dogs numbers); compiled fp32 reorders sums; Dropout on a
4-D blob draws its mask in channels_last memory order (another mask than exact mode's);
``net.blobs`` after a fast step hold the data tops and the outputs only (intermediate blobs are not
written back). Exact mode stays the default.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from caffeport.errors import CaffeportError
from caffeport.fast import FastModeNotice, cpu_has_bf16

__all__ = ["FP32_TOLERANCES", "BF16_TOLERANCES", "FastTrain", "enable_fast"]

FP32_TOLERANCES = {"loss": 1e-4, "grad": 1e-3}
BF16_TOLERANCES = {"loss": 5e-2, "grad": 1e-1}


def _low_precision_layer(layer: nn.Module) -> bool:
    """A layer autocast runs in bf16: it holds a floating weight matrix or kernel (2+ dims)."""
    return any(b.dim() >= 2 and b.is_floating_point() for b in getattr(layer, "blobs", ()))


class _Compute(nn.Module):
    """The net's forward from fed data tops to ``(loss, {kept blob: fp32 tensor})``: the unit that is
    compiled. Weight layers run under bf16 autocast when ``bf16``; their tops return to fp32."""

    def __init__(self, net: Any, keep: Sequence[str], bf16: bool, device_type: str, own_kernels: bool = False):
        super().__init__()
        self.layers = net.module.layers  # the same modules (and parameters) as the exact net
        object.__setattr__(self, "_net_module", net.module)
        self._plans = list(net._plans)
        self._low = [bf16 and _low_precision_layer(p.layer) for p in self._plans]
        # eager CPU: layers with their own low-precision forward use it (reused buffers); else autocast
        self._own = [low and own_kernels and hasattr(p.layer, "forward_low_precision")
                     for p, low in zip(self._plans, self._low)]
        self._keep = list(keep)
        self._device_type = device_type

    def forward(self, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        table: dict[str, torch.Tensor] = {}
        for plan, low, own in zip(self._plans, self._low, self._own):
            layer = plan.layer
            if layer.is_input or layer.is_data:
                for t in plan.tops:
                    table[t] = feeds[t]
                continue
            ins = [table[b].detach() if det else table[b] for b, det in zip(plan.bottoms, plan.detach)]
            if own:
                out = layer.forward_low_precision(*ins, dtype=torch.bfloat16)
                outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
            elif low:
                with torch.autocast(self._device_type, dtype=torch.bfloat16):
                    out = layer(*ins)
                outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
                outs = tuple(o.float() if o.is_floating_point() else o for o in outs)
            else:
                out = layer(*ins)
                outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
            for t, o in zip(plan.tops, outs):
                table[t] = o
        loss = self._net_module.loss(table)
        return loss, {k: table[k] for k in self._keep}


def _compile(module: nn.Module) -> Callable[..., Any]:
    """``torch.compile`` (inductor, static shapes) with inductor's random ops on torch's eager RNG."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    return torch.compile(module, backend="inductor", dynamic=False)


def _first_line(e: BaseException) -> str:
    s = str(e)
    return f"{type(e).__name__}: {s.splitlines()[0][:200] if s else ''}"


class FastTrain:
    """Fast forward/backward of a TRAIN ``Net`` (its parameters are converted in place).

    ``forward_backward(feeds=None)`` is ``Net.forward_backward`` (gradients accumulate into the
    parameters' ``.grad``; returns ``(loss, {output: tensor})``); ``forward(feeds=None)`` returns
    ``{output and loss top: tensor}`` with a graph for the caller's ``backward()`` (``from_solver``'s
    model). Attributes: ``precision``, ``compiled``, ``channels_last``, ``loss_rel_error``,
    ``grad_rel_error``, ``worst_blob``, ``tolerances``, ``notices``; :meth:`summary` says it in one line.
    """

    def __init__(self, net: Any, *, compile: bool | None = None, precision: str = "auto",
                 channels_last: bool = True, tolerances: Mapping[str, float] | None = None,
                 optimizer: Any = None, history: Sequence[torch.Tensor] = ()):
        if net.phase != 0:
            raise CaffeportError(f"{net.source}: fast training needs the TRAIN-phase net")
        if precision not in ("auto", "fp32", "bf16"):
            raise CaffeportError(f"fast mode precision must be auto, fp32 or bf16, got {precision!r}")
        device = net._device
        if precision == "auto":
            if device.type == "cuda":
                precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
            else:
                precision = "bf16" if cpu_has_bf16() else "fp32"
        if compile is None:  # on the CPU, compiled training measured slower than eager (see above)
            compile = device.type == "cuda" and os.environ.get("CAFFEPORT_NO_COMPILE", "") not in ("1", "true", "yes")
        self.net = net
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.tolerances = dict(BF16_TOLERANCES if precision == "bf16" else FP32_TOLERANCES)
        self.tolerances.update(tolerances or {})
        self.want_compile = bool(compile)
        self.compiled = False
        self.notices: list[str] = []
        self.loss_rel_error = float("nan")
        self.grad_rel_error = float("nan")
        self.worst_blob = ""
        self.checked = False
        self.data_plans = [p for p in net._plans if p.layer.is_data and not p.layer.is_input]
        extra = [t for t, _ in net.module.loss_tops if t not in net.outputs]
        self.keep = list(net.outputs) + extra
        self.compute = _Compute(net, self.keep, precision == "bf16", device.type,
                                own_kernels=device.type == "cpu" and not self.want_compile)
        self._call: Callable[..., Any] = self.compute
        self._params = [prm for _, _, prm, _, _ in net.learnable_params() if prm.requires_grad]
        if self.channels_last:
            self._to_channels_last(optimizer, history)

    # --- set-up ----------------------------------------------------------------------------------
    def _to_channels_last(self, optimizer: Any, history: Sequence[torch.Tensor]) -> None:
        """4-D weights, their gradients and optimizer history tensors to channels_last, in place
        (the tensor objects stay the same, so the optimizer and solver keep their references)."""
        cl = torch.channels_last
        with torch.no_grad():
            for layer in self.net.layers:
                for b in layer.blobs:
                    if b.dim() == 4:
                        b.data = b.data.contiguous(memory_format=cl)
                        if b.grad is not None:
                            b.grad = b.grad.contiguous(memory_format=cl)
            tensors = list(history)
            if optimizer is not None:
                for st in optimizer.state.values():
                    tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
            for t in tensors:
                if t.dim() == 4:
                    t.data = t.data.contiguous(memory_format=cl)

    def summary(self) -> str:
        """One line: what fast mode does and what the first-batch check found."""
        what = [f"{self.precision} ({'conv/fc layers in bf16, the rest fp32' if self.precision == 'bf16' else 'fp32'})"]
        if self.channels_last:
            what.append("channels_last")
        what.append("compiled" if self.compiled else "eager")
        s = ", ".join(what)
        if self.checked:
            s += (f"; first batch vs exact: loss relative difference {self.loss_rel_error:.3g}, gradient "
                  f"{self.grad_rel_error:.3g} (worst blob {self.worst_blob or '-'}; tolerances loss "
                  f"{self.tolerances['loss']:g}, gradient {self.tolerances['grad']:g})")
        return s

    # --- running -----------------------------------------------------------------------------------
    def _feeds(self, feeds: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
        net = self.net
        out: dict[str, torch.Tensor] = dict(net._inputs)
        if feeds:
            out.update({k: torch.as_tensor(v) for k, v in feeds.items()})
        for plan in self.data_plans:
            if all(t in out for t in plan.tops):
                continue
            with torch.no_grad():
                got = plan.layer()
            for t, v in zip(plan.tops, (got,) if isinstance(got, torch.Tensor) else got):
                out[t] = v
        if self.channels_last:
            out = {k: (v.contiguous(memory_format=torch.channels_last)
                       if v.dim() == 4 and v.is_floating_point() else v) for k, v in out.items()}
        return out

    def _run(self, feeds: dict[str, torch.Tensor], backward: bool
             ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        with torch.enable_grad():
            loss, table = self._call(feeds)
            if backward and loss is not None and loss.requires_grad:
                loss.backward()
        return loss, table

    def _write_back(self, loss: torch.Tensor | None, table: Mapping[str, torch.Tensor],
                    feeds: Mapping[str, torch.Tensor]) -> None:
        net = self.net
        for n, t in list(feeds.items()) + list(table.items()):
            if n in net.blobs:
                net._store(n, t.detach())
        net._records = {}
        net.loss = float(loss.detach()) if loss is not None else 0.0

    def forward_backward(self, feeds: Mapping[str, Any] | None = None) -> tuple[float, dict[str, torch.Tensor]]:
        """``Net.forward_backward`` in fast mode (the first call also runs the check)."""
        f = self._feeds(feeds)
        if not self.checked:
            loss, table = self._check(f)
        else:
            loss, table = self._run(f, backward=True)
        self._write_back(loss, table, f)
        return self.net.loss or 0.0, table

    def forward(self, feeds: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The outputs and loss tops with their graph (call ``backward`` on ``model.loss(...)``)."""
        f = self._feeds(feeds)
        if not self.checked:
            rng = _rng_state(self.net._device)
            saved = [p.grad for p in self._params]
            self._check(f)
            for p, g in zip(self._params, saved):
                p.grad = g
            _set_rng_state(self.net._device, rng)
        loss, table = self._run(f, backward=False)
        self._write_back(loss, table, f)
        return table

    # --- the first-batch check -----------------------------------------------------------------------
    def _grads(self) -> list[torch.Tensor | None]:
        return [None if p.grad is None else p.grad.detach().clone() for p in self._params]

    def _check(self, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Exact then fast forward/backward on ``feeds`` from the same RNG state; compare; leave the
        parameters' gradients as ``previous + fast``. Compiles here (eager fallback, one notice)."""
        net = self.net
        device = net._device
        saved = [p.grad for p in self._params]
        rng = _rng_state(device)
        for p in self._params:
            p.grad = None
        with torch.enable_grad():
            etable = net.module.run(dict(feeds))
            eloss = net.module.loss(etable)
            if eloss is not None and eloss.requires_grad:
                eloss.backward()
        exact = self._grads()
        exact_loss = float(eloss.detach()) if eloss is not None else 0.0
        del etable, eloss
        loss, table = None, {}
        if self.want_compile:
            try:
                self._call = _compile(self.compute)
                for p in self._params:
                    p.grad = None
                _set_rng_state(device, rng)
                loss, table = self._run(feeds, backward=True)
                self.compiled = True
            except Exception as e:  # no compiler, an op inductor cannot take...: eager, one notice
                msg = f"caffeport fast training: torch.compile is not usable here ({_first_line(e)}); running eager"
                self.notices.append(msg)
                warnings.warn(msg, FastModeNotice, stacklevel=3)
                self._call = self.compute
                self.compiled = False
        if not self.compiled:
            for p in self._params:
                p.grad = None
            _set_rng_state(device, rng)
            loss, table = self._run(feeds, backward=True)
        fast = self._grads()
        fast_loss = float(loss.detach()) if loss is not None else 0.0
        self._compare(exact_loss, fast_loss, exact, fast)
        for p, old in zip(self._params, saved):
            if old is not None:
                p.grad = old + p.grad if p.grad is not None else old
        self.checked = True
        return loss, table

    def _compare(self, exact_loss: float, fast_loss: float, exact: list[torch.Tensor | None],
                 fast: list[torch.Tensor | None]) -> None:
        names = {id(prm): f"{ln}[{j}]" for ln, j, prm, _, _ in self.net.learnable_params()}
        num = den = 0.0
        worst, worst_name = -1.0, ""
        for p, e, f in zip(self._params, exact, fast):
            e = torch.zeros_like(p) if e is None else e
            f = torch.zeros_like(p) if f is None else f
            d = float((f.double() - e.double()).norm()) ** 2
            n = float(e.double().norm()) ** 2
            num, den = num + d, den + n
            rel = math.sqrt(d / n) if n > 0 else (0.0 if d == 0 else float("inf"))
            if not math.isfinite(d) or rel > worst:
                worst, worst_name = (float("inf") if not math.isfinite(d) else rel), names.get(id(p), "?")
        self.grad_rel_error = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))
        if not math.isfinite(num):
            self.grad_rel_error = float("inf")
        self.worst_blob = worst_name
        if not math.isfinite(fast_loss):
            self.loss_rel_error = float("inf")
        else:
            diff = abs(fast_loss - exact_loss)
            self.loss_rel_error = diff / max(abs(exact_loss), 1e-12) if diff else 0.0
        bad = []
        if not self.loss_rel_error <= self.tolerances["loss"]:
            bad.append(f"loss {fast_loss:.6g} vs exact {exact_loss:.6g} (relative difference "
                       f"{self.loss_rel_error:.3g} > {self.tolerances['loss']:g})")
        if not self.grad_rel_error <= self.tolerances["grad"]:
            bad.append(f"gradient relative difference {self.grad_rel_error:.3g} > {self.tolerances['grad']:g} "
                       f"(worst blob {worst_name})")
        if bad:
            raise CaffeportError(
                f"{self.net.source}: fast training refused: on the first batch the {self.precision}"
                f"{' compiled' if self.compiled else ''} forward/backward differs from exact fp32: "
                f"{'; '.join(bad)}; train without --fast (exact mode), or with precision fp32")


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def enable_fast(solver: Any, **kwargs: Any) -> FastTrain:
    """``Solver.enable_fast``: fast forward/backward for ``solver``'s train net; the test nets
    (exact mode) keep sharing the converted weights."""
    fast = FastTrain(solver.net, optimizer=solver.optimizer, history=[h for hs in solver.history for h in hs],
                     **kwargs)
    solver._share_test_weights()
    return fast
