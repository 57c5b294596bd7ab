"""Opt-in fast inference: ``load_module(model, weights, fast=True)``, ``Net(..., fast=True)``, ``--fast``.

A fast build is the exact TEST net put through, in order:

1. the graph passes of :mod:`caffeport.passes` (BatchNorm/Scale/Bias/Power folded into the
   preceding conv/fc, TEST-phase Dropout dropped);
2. ``channels_last`` memory format for 4-D weights and inputs;
3. ``torch.compile`` (inductor) with inductor's ``freezing``: the weights become constants of the
   compiled graph, so oneDNN prepacks them and fuses conv/fc with the ReLU after them (batch 1 on this
   CPU: MobileNet 60 -> 113 img/s, SqueezeNet ~78 -> ~105, GoogLeNet 33 -> 42). The fast module is a
   private folded copy, so later edits of the exact net's weights never reach it - build again. The
   compiled graph's wrapper (the code that calls its kernels one after another) is C++ (inductor's
   ``cpp_wrapper``), not Python: the same kernels and bit-identical outputs, 1-12% less time per
   call (most at batch 1: SqueezeNet 5.9 -> 5.2 ms, CaffeNet 11.3 -> 10.5 ms); when that build fails
   the Python wrapper is tried (``FastModule.cpp_wrapper`` says which). When no compiler is usable
   the build falls back to eager with one notice (a ``FastModeNotice`` warning);
4. ``torch.inference_mode`` around every call;
5. bf16 autocast, only on CPUs that have AVX512-BF16 or AMX and on CUDA devices with bf16
   (``precision="auto"``), or when asked
   (``precision="bf16"``); ``precision="fp32"`` keeps float32 everywhere. In bf16 the weight
   matrices and kernels (floating parameters of 2 or more dims: conv, fc, deconv, recurrent weights)
   are stored in bf16 once at build time (``FastModule.weights_dtype``), so autocast does not re-cast
   them on every call (it caches casts only inside one autocast region: CaffeNet's 150 MB fc6 was
   re-cast each forward). 1-D parameters (biases, per-channel scales) stay fp32; ops on autocast's
   fp32 list (LRN's pooling, losses, norms) still run in fp32, and every output is returned as fp32.
   When the stored-bf16 build fails or misses the tolerance, the build keeps fp32 weights under
   autocast (one ``FastModeNotice``).

Every build is checked once against the exact fp32 forward on a seeded sample batch: the max relative
error (``max|fast - exact| / max|exact|`` over each output, the worst output) is stored in
``FastModule.max_rel_error`` and the build is refused with a ``CaffeportError`` when it is above
``FP32_TOLERANCE`` (1e-4) for fp32 or ``BF16_TOLERANCE`` (5e-2) for bf16 (outputs of layers without a
gradient, Accuracy or ArgMax, are discrete and not compared). Data layers run eagerly in the exact
net and feed the fast net. Storing the weights in bf16 rounds them exactly as autocast did, so the
errors did not change (seeded corpus nets, batch 1/16: CaffeNet 5.0e-3/6.3e-3, GoogLeNet
3.0e-3/3.4e-3, ResNet-50 2.6e-3/3.3e-3, SqueezeNet 2.9e-3/3.0e-3, MobileNet 1.4e-2/1.7e-2: all
below 5e-2). Speed on a CPU shared with other jobs: start Python with ``OMP_WAIT_POLICY=PASSIVE``
(torch's spinning OpenMP barriers were 7-10x slower at batch 1 when another process held a core);
with the cores to itself keep OpenMP's default (PASSIVE then costs a thread wake-up per op:
SqueezeNet batch 1, 111 vs 195 img/s).
Where Caffe differs: none of this is Caffe's arithmetic any more (folding re-rounds, bf16 keeps 8
mantissa bits), which is why exact mode stays the default.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from caffeport.errors import CaffeportError

__all__ = ["FP32_TOLERANCE", "BF16_TOLERANCE", "FastModeNotice", "FastModule", "build_fast",
           "cpu_has_bf16", "fast_module", "attach"]

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 5e-2


class FastModeNotice(UserWarning):
    """Fast mode changed its plan (e.g. no usable compiler: eager instead of torch.compile)."""


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    g = got.detach().double()
    w = want.detach().double()
    if g.shape != w.shape:
        return float("inf")
    denom = float(w.abs().max()) if w.numel() else 0.0
    diff = float((g - w).abs().max()) if w.numel() else 0.0
    if not np.isfinite(diff):
        return float("inf")
    return diff / denom if denom > 0 else diff


class FastModule(nn.Module):
    """The fast net: call it as the exact ``NetModule`` (inputs in order or by name) and get
    ``{output: float32 tensor}``. Attributes: ``precision``, ``compiled``, ``cpp_wrapper``, ``max_rel_error``,
    ``tolerance``, ``report`` (the passes' ``PassReport``), ``notices``."""

    def __init__(self, inner: nn.Module, input_names: list[str], output_names: list[str],
                 precision: str, channels_last: bool):
        super().__init__()
        self.inner = inner
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.precision = precision
        self.channels_last = channels_last
        self.compiled = False
        self.cpp_wrapper = False  # compiled with inductor's C++ wrapper
        self._call: Callable[..., Any] = inner
        self.max_rel_error = float("nan")
        self.tolerance = FP32_TOLERANCE
        self.report: Any = None
        self.notices: list[str] = []
        self.data_plans: list[Any] = []  # the exact net's data layers: run eagerly, their tops fed
        self.weights_dtype = "fp32"  # "bf16" when the weight matrices/kernels are stored in bf16
        self.device = torch.device("cpu")  # the net's device: inputs are moved there

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch of every data layer (read by the exact net's own readers)."""
        feeds: dict[str, torch.Tensor] = {}
        for plan in self.data_plans:
            with torch.no_grad():
                out = plan.layer()
            for t, v in zip(plan.tops, (out,) if isinstance(out, torch.Tensor) else out):
                feeds[t] = v
        return feeds

    def _prepare(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in feeds.items():
            t = torch.as_tensor(v, dtype=torch.float32, device=self.device)
            if self.channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            out[k] = t
        return out

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        if self.data_plans and not all(t in feeds for p in self.data_plans for t in p.tops):
            feeds.update({k: v for k, v in self.next_batch().items() if k not in feeds})
        feeds = self._prepare(feeds)
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    outs = self._call(**feeds)
            else:
                outs = self._call(**feeds)
            return {k: v.float().contiguous() for k, v in outs.items()}

    def net_forward(self, net: Any, blobs: Any, start: Any, end: Any, kwargs: Mapping[str, Any]
                    ) -> dict[str, np.ndarray]:
        """``Net.forward`` of a ``Net(..., fast=True)``: the whole net only (folded blobs are gone);
        the outputs are also written into ``net.blobs[output].data``."""
        if start is not None or end is not None or blobs:
            raise CaffeportError(f"{net.source}: a fast Net runs the whole net only (start/end/blobs "
                                 "need intermediate blobs that the fast passes folded away); use exact mode")
        for name in kwargs:
            if name not in net.inputs:
                raise CaffeportError(f"{net.source}: '{name}' is not an input of this net "
                                     f"(inputs: {', '.join(net.inputs)})")
        feeds = {name: np.asarray(kwargs[name] if name in kwargs else net.blobs[name].data, dtype=np.float32)
                 for name in net.inputs}
        outs = {k: v.cpu().numpy() for k, v in self(**feeds).items()}
        for name, value in outs.items():
            if tuple(net.blobs[name].shape) == value.shape:
                net.blobs[name].data[...] = value
        net.loss = None
        return outs


def _sample_feeds(net: Any, seed: int) -> dict[str, torch.Tensor]:
    """Seeded normal values; zeros (a valid class/index) for inputs read as labels or indices."""
    gen = torch.Generator().manual_seed(seed)
    index_like = {p.bottoms[i] for p in net._plans for i in type(p.layer).no_grad_bottoms if i < len(p.bottoms)}
    names = list(net.inputs) + [t for p in net._plans if p.layer.is_data and not p.layer.is_input for t in p.tops]
    return {name: (torch.zeros(tuple(net.blobs[name].shape)) if name in index_like
                   else torch.randn(tuple(net.blobs[name].shape), generator=gen)).to(net._device) for name in names}


def _channels_last(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)


def _store_bf16(module: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """Cast the floating parameters of 2+ dims (weight matrices, kernels) to bf16 in place, keeping
    their memory format; returns the fp32 tensors they replaced (for :func:`_restore`)."""
    replaced: dict[nn.Parameter, torch.Tensor] = {}
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2 and p.dtype == torch.float32:
                replaced[p] = p.data
                p.data = p.data.to(torch.bfloat16)
    return replaced


def _restore(replaced: Mapping[nn.Parameter, torch.Tensor]) -> None:
    with torch.no_grad():
        for p, data in replaced.items():
            p.data = data


def _compile(module: nn.Module, cpp_wrapper: bool = True) -> Callable[..., Any]:
    """``torch.compile`` (inductor, static shapes) with inductor's freezing: the weights are constants
    of the graph (oneDNN prepacks them and fuses conv/fc with ReLU); the module is a private folded
    copy, so nothing changes its weights after the build. ``cpp_wrapper``: the graph's kernel calls
    are made from C++ rather than Python."""
    return _Frozen(torch.compile(module, backend="inductor", dynamic=False), cpp_wrapper)


class _Frozen(nn.Module):
    """Runs a compiled module with inductor's ``freezing`` (and ``cpp_wrapper``) flags set (inductor
    reads them when it (re)compiles; ``torch.compile(options={"freezing": True})`` did not reach it in
    torch 2.13)."""

    def __init__(self, compiled: nn.Module, cpp_wrapper: bool = True):
        import torch._inductor.config as inductor_config

        super().__init__()
        self.compiled = compiled
        self.cpp_wrapper = bool(cpp_wrapper)
        self._config = inductor_config

    def forward(self, **feeds: torch.Tensor) -> Any:
        with self._config.patch(freezing=True, cpp_wrapper=self.cpp_wrapper):
            return self.compiled(**feeds)


def build_fast(net: Any, *, compile: bool | None = None, precision: str = "auto",
               channels_last: bool = True, tolerance: float | None = None, seed: int = 0,
               passes: Callable[[Any], tuple[Any, Any]] | None = None) -> FastModule:
    """A :class:`FastModule` for a built TEST ``Net`` (left unchanged), checked against it.

    ``compile=None`` compiles unless ``CAFFEPORT_NO_COMPILE=1``; ``precision`` is ``auto`` (bf16 on
    AVX512-BF16/AMX CPUs, else fp32), ``bf16`` or ``fp32``; ``passes`` replaces the graph passes
    (a callable ``net -> (net, report)``). Raises ``CaffeportError`` when the check fails."""
    if net.phase != 1:
        raise CaffeportError(f"{net.source}: fast mode is for TEST-phase (inference) nets")
    if precision not in ("auto", "fp32", "bf16"):
        raise CaffeportError(f"fast mode precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "auto":
        if net._device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            precision = "bf16" if (cpu_has_bf16() and net._device.type == "cpu") else "fp32"
    if compile is None:
        compile = os.environ.get("CAFFEPORT_NO_COMPILE", "") not in ("1", "true", "yes")
    if passes is None:
        from caffeport.passes import optimize_net

        def passes(n: Any) -> tuple[Any, Any]:
            return optimize_net(n, data_as_input=True)
    opt, report = passes(net)
    inner = opt.module.eval()
    for p in inner.parameters():
        p.requires_grad_(False)
    if channels_last:
        _channels_last(inner)
    data_layers = [p for p in net._plans if p.layer.is_data and not p.layer.is_input]
    fast = FastModule(inner, net.inputs, net.outputs, precision, channels_last)
    fast.data_plans = data_layers
    fast.device = net._device
    fast.report = report
    fast.tolerance = float(tolerance) if tolerance is not None else (
        BF16_TOLERANCE if precision == "bf16" else FP32_TOLERANCE)
    feeds = _sample_feeds(net, seed)
    with torch.no_grad():
        exact = net.module(**{k: v.clone() for k, v in feeds.items()})
    replaced = _store_bf16(inner) if precision == "bf16" and inner is not net.module else {}
    if replaced:
        fast.weights_dtype = "bf16"
        try:
            worst, where = _check(fast, net, feeds, exact, compile)
            why = f"max relative error {worst:.3g} on '{where}'"
        except Exception as e:  # a layer that cannot take bf16 parameters
            worst, why = float("inf"), f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if worst <= fast.tolerance:
            fast.max_rel_error = worst
            return fast
        _restore(replaced)
        fast.weights_dtype = "fp32"
        fast.compiled, fast.cpp_wrapper, fast._call = False, False, inner
        msg = (f"caffeport fast mode: bf16-stored weights did not pass the check ({why}); "
               "keeping fp32 weights under bf16 autocast")
        fast.notices.append(msg)
        warnings.warn(msg, FastModeNotice, stacklevel=2)
    worst, where = _check(fast, net, feeds, exact, compile)
    fast.max_rel_error = worst
    if not worst <= fast.tolerance:
        raise CaffeportError(
            f"{net.source}: fast mode refused: on a seeded sample batch its output '{where}' differs from the "
            f"exact fp32 forward by max relative error {worst:.3g}, above the {precision} tolerance "
            f"{fast.tolerance:g} (the folded/compiled/reduced-precision net would not compute what Caffe "
            "computes); run in exact mode, or try precision fp32")
    return fast


def _check(fast: FastModule, net: Any, feeds: Mapping[str, torch.Tensor], exact: Mapping[str, torch.Tensor],
           compile: bool) -> tuple[float, str]:
    """Compile (or fall back to eager with one notice), run the sample batch, and return the worst
    ``(max relative error, output)`` against the exact forward."""
    inner = fast.inner
    got = None
    if compile:
        for cpp_wrapper in (True, False):  # C++ wrapper first; the Python one when that fails
            try:
                fast._call = _compile(inner, cpp_wrapper=cpp_wrapper)
                got = fast(**feeds)
                fast.compiled, fast.cpp_wrapper = True, cpp_wrapper
                break
            except Exception as e:  # no compiler, unsupported op, ...
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if cpp_wrapper:
                    fast.notices.append(f"caffeport fast mode: inductor's C++ wrapper failed ({why}); "
                                        "using its Python wrapper")
        if got is None:  # eager, one notice
            msg = f"caffeport fast mode: torch.compile is not usable here ({why}); running eager"
            fast.notices.append(msg)
            warnings.warn(msg, FastModeNotice, stacklevel=3)
            fast._call = inner
    if got is None:
        got = fast(**feeds)
    discrete = {t for p in net._plans if not p.layer.has_backward for t in p.tops}
    checked = [n for n in net.outputs if n not in discrete] or list(net.outputs)
    worst, where = 0.0, ""
    for name in checked:
        if name not in got:
            raise CaffeportError(f"{net.source}: fast mode refused: output '{name}' is missing from the fast net")
        err = _rel_error(got[name], exact[name])
        if err > worst or where == "":
            worst, where = err, name
    return worst, where


def fast_module(net: Any, **kwargs: Any) -> FastModule:
    """``load_module(..., fast=True)``: the checked fast module of a built TEST ``Net``."""
    return build_fast(net, **kwargs)


def attach(net: Any, **kwargs: Any) -> None:
    """``Net(..., fast=True)``: attach a checked fast module; ``net.forward`` then runs it."""
    net._fast = build_fast(net, **kwargs)
