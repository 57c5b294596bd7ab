"""Caffe's six solvers as ``torch.optim.Optimizer`` subclasses.

``SGD(params, solver_param)`` ... ``Adam(params, solver_param)``: ``params`` are tensors or param
groups (dicts with ``params`` and optionally ``lr_mult`` / ``decay_mult`` / ``lr`` /
``weight_decay``); ``solver_param`` is a ``SolverParameter``, a solver prototxt path or None; keyword
arguments override its fields (``lr`` = ``base_lr``, ``momentum``, ``momentum2``, ``delta``,
``rms_decay``, ``weight_decay``, ``regularization_type``, ``clip_gradients``, ``iter_size``).

``step()`` is Caffe's ``ApplyUpdate`` (the math lives in :mod:`caffeport.solver.updates`, shared with
``caffeport train``). Where it differs from ``torch.optim``:

- a group's ``lr`` is Caffe's *policy* rate; each parameter moves with ``lr * lr_mult`` and decays
  with ``weight_decay * decay_mult`` (both rounded to float32 as Caffe's ``Dtype``);
- the lr scales the gradient *into* the history (``v = m*v + lr*g``), so an lr drop does not rescale
  the velocity at once (see :mod:`caffeport.solver.updates` for every rule);
- ``clip_gradients`` (global L2 norm over all the optimizer's parameters) and the ``1/iter_size``
  scaling are applied inside ``step()``, to the *accumulated* gradients, before weight decay;
- a parameter whose ``.grad`` is None counts as a zero gradient (Caffe's cleared diff): weight decay
  and momentum still move it; after ``step()`` each ``.grad`` holds the update value subtracted
  from the weight (as Caffe's diffs do);
- parameters with ``lr_mult`` 0 (or ``requires_grad`` False) are not moved; with weight decay and a
  rule whose history grows without the lr (AdaGrad, RMSProp, AdaDelta, Adam) their history still
  grows, as Caffe's solverstate shows.

``state_dict()`` adds ``{"caffe": {"iter": n}}`` to torch's layout (Adam's bias correction uses the
iteration count); :meth:`CaffeOptimizer.to_solverstate` / :meth:`~CaffeOptimizer.load_solverstate`
convert the history to and from Caffe's ``.solverstate`` layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2
from caffeport.solver.updates import RULES, UpdateRule, caffe_update, f32

__all__ = ["CaffeOptimizer", "SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam", "OPTIMIZERS",
           "solver_parameter", "param_groups"]

PathLike = str | os.PathLike

# optimizer keyword -> SolverParameter field
_FIELDS = {
    "lr": "base_lr", "momentum": "momentum", "momentum2": "momentum2", "delta": "delta",
    "rms_decay": "rms_decay", "weight_decay": "weight_decay", "regularization_type": "regularization_type",
    "clip_gradients": "clip_gradients", "iter_size": "iter_size",
}
# hyper-parameters Caffe has once per solver (the rule's, and the ApplyUpdate steps'): groups must agree
_GLOBAL = ("momentum", "momentum2", "delta", "rms_decay", "regularization_type", "clip_gradients", "iter_size")


def solver_parameter(solver_param: caffe_pb2.SolverParameter | PathLike | None = None) -> tuple[
        caffe_pb2.SolverParameter, str]:
    """(upgraded SolverParameter copy, source name) from a message, a solver prototxt or None (Caffe's
    defaults, ``base_lr`` 0.01, ``lr_policy`` fixed)."""
    from caffeport.io import read_solver, upgrade_solver

    if solver_param is None:
        return caffe_pb2.SolverParameter(base_lr=0.01, lr_policy="fixed"), "<SolverParameter>"
    if isinstance(solver_param, caffe_pb2.SolverParameter):
        msg = caffe_pb2.SolverParameter()
        msg.CopyFrom(solver_param)
        upgrade_solver(msg, "<SolverParameter>")
        return msg, "<SolverParameter>"
    from pathlib import Path

    p = Path(solver_param)
    if not p.exists():
        raise CaffeportError(f"solver file not found: {p}")
    return read_solver(p), str(p)


class CaffeOptimizer(torch.optim.Optimizer):
    """Base of the Caffe optimizers; ``rule_name`` picks the update rule of
    :mod:`caffeport.solver.updates`, ``history_keys`` name its per-parameter state tensors."""

    rule_name = "SGD"
    history_keys: tuple[str, ...] = ("momentum_buffer",)

    def __init__(self, params: Iterable[Any], solver_param: caffe_pb2.SolverParameter | PathLike | None = None,
                 **overrides: Any):
        msg, source = solver_parameter(solver_param)
        for k, v in overrides.items():
            if k not in _FIELDS:
                raise CaffeportError(f"{type(self).__name__}: unknown argument '{k}' (known: {', '.join(_FIELDS)})")
            setattr(msg, _FIELDS[k], v)
        self.solver_param = msg
        self.source = source
        defaults = {k: getattr(msg, f) for k, f in _FIELDS.items()}
        defaults["lr"] = f32(defaults["lr"])
        defaults["lr_mult"] = 1.0
        defaults["decay_mult"] = 1.0
        if int(defaults["iter_size"]) < 1:
            raise CaffeportError(f"{source}: iter_size should be >= 1, got {defaults['iter_size']}")
        self.iter = 0
        self.last_clip: tuple[float, float] | None = None
        self._rule: UpdateRule | None = None
        self._rule_key: tuple | None = None
        self._zeros: dict[int, torch.Tensor] = {}
        super().__init__(params, defaults)
        self._make_rule()

    # --- hyper-parameters ---------------------------------------------------------------------------
    def _global(self, key: str) -> Any:
        vals = {g[key] for g in self.param_groups}
        if len(vals) > 1:
            raise CaffeportError(f"{self.source}: '{key}' differs between param groups ({sorted(map(str, vals))}); "
                                 f"Caffe's {self.rule_name} solver has one {key} for all parameters")
        return next(iter(vals))

    def _make_rule(self) -> UpdateRule:
        key = tuple(self._global(k) for k in ("momentum", "momentum2", "delta", "rms_decay"))
        if self._rule is None or key != self._rule_key:
            p = caffe_pb2.SolverParameter(momentum=key[0], momentum2=key[1], delta=key[2], rms_decay=key[3])
            self._rule = RULES[self.rule_name](p, self.source)
            self._rule_key = key
        return self._rule

    # --- state --------------------------------------------------------------------------------------
    def history_of(self, p: torch.Tensor) -> list[torch.Tensor]:
        """The history tensors of parameter ``p`` (created as zeros on first use)."""
        st = self.state[p]
        out = []
        for k in self.history_keys:
            h = st.get(k)
            if h is None:
                h = torch.zeros_like(p, memory_format=torch.preserve_format).detach()
                st[k] = h
            out.append(h)
        return out

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["caffe"] = {"iter": int(self.iter)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        caffe = sd.pop("caffe", {}) or {}
        super().load_state_dict(sd)
        self.iter = int(caffe.get("iter", 0))

    def _mine(self) -> set[int]:
        return {id(p) for g in self.param_groups for p in g["params"]}

    def caffe_history(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The history in ``.solverstate`` order for ``params`` (the net's learnable params in
        Caffe's order): every parameter's first set, then (AdaDelta, Adam) every second set.
        Parameters this optimizer does not update (frozen ones left out) get zeros."""
        mine = self._mine()
        hs = [self.history_of(p) if id(p) in mine else [torch.zeros_like(p.detach()) for _ in self.history_keys]
              for p in params]
        return [h[s] for s in range(len(self.history_keys)) for h in hs]

    def to_solverstate(self, params: Sequence[torch.Tensor], learned_net: str = "", current_step: int = 0) -> Any:
        """A :class:`caffeport.io.SolverStateData` (iter, current_step, learned_net, history) for
        ``params`` in Caffe's order; write it with :func:`caffeport.io.write_solverstate`."""
        from caffeport.io import SolverStateData

        hist = [h.detach().cpu().numpy().astype(np.float32, copy=True) for h in self.caffe_history(params)]
        return SolverStateData(int(self.iter), int(current_step), learned_net, hist)

    @torch.no_grad()
    def load_solverstate(self, state: Any, params: Sequence[torch.Tensor]) -> Any:
        """Take ``iter`` and the history from a solverstate (path or ``SolverStateData``) for
        ``params`` in Caffe's order; returns the decoded state (``current_step``, ``learned_net``)."""
        from caffeport.io import read_solverstate

        where = str(state) if isinstance(state, (str, os.PathLike)) else "<solverstate>"
        st = read_solverstate(state) if isinstance(state, (str, os.PathLike)) else state
        flat = self.caffe_history(params)
        if len(st.history) != len(flat):
            raise CaffeportError(f"{where}: incorrect length of history blobs: the solverstate has {len(st.history)}, "
                                 f"this {self.rule_name} optimizer over {len(params)} params needs {len(flat)}")
        for j, (h, arr) in enumerate(zip(flat, st.history)):
            a = np.asarray(arr, dtype=np.float32)
            if a.size != h.numel():
                raise CaffeportError(f"{where}: history blob {j} has {a.size} values, the parameter has "
                                     f"{h.numel()} (shape {tuple(h.shape)})")
            h.copy_(torch.from_numpy(a.reshape(tuple(h.shape))))
        self.iter = int(st.iter)
        return st

    # --- the update ---------------------------------------------------------------------------------
    def _zero(self, p: torch.Tensor) -> torch.Tensor:
        z = self._zeros.get(id(p))
        if z is None or z.shape != p.shape or z.device != p.device or z.dtype != p.dtype:
            z = torch.zeros_like(p.detach())
            self._zeros[id(p)] = z
        else:
            z.zero_()
        return z

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Caffe's ``ApplyUpdate`` with each group's ``lr`` as the policy rate; increments ``iter``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rule = self._make_rule()
        lr_free = rule.uses_lr_free_history
        ws, ds, rates, decays, params = [], [], [], [], []
        for g in self.param_groups:
            rate = float(g["lr"])
            lr_mult, decay = float(g["lr_mult"]), f32(float(g["weight_decay"]) * float(g["decay_mult"]))
            for p in g["params"]:
                if p.requires_grad and lr_mult != 0:
                    if p.grad is None:  # not reached by backward: Caffe's diff is zero
                        p.grad = torch.zeros_like(p)
                    ds.append(p.grad)
                elif decay != 0 and lr_free:
                    ds.append(self._zero(p))
                else:
                    continue
                ws.append(p)
                params.append(p)
                rates.append(f32(rate * (lr_mult if p.requires_grad else 0.0)))
                decays.append(decay)
        hs = [self.history_of(p) for p in params]
        hist = [[h[s] for h in hs] for s in range(len(self.history_keys))]
        self.last_clip = caffe_update(
            rule, ws, ds, hist, rates, decays, it=self.iter, clip=float(self._global("clip_gradients")),
            iter_size=int(self._global("iter_size")), regularization=str(self._global("regularization_type")),
            source=self.source)
        self.iter += 1
        return loss


class SGD(CaffeOptimizer):
    """Caffe's SGD: ``v = momentum*v + lr*g; w -= v`` (torch's SGD puts lr after the momentum)."""

    rule_name = "SGD"
    history_keys = ("momentum_buffer",)


class Nesterov(CaffeOptimizer):
    """Caffe's Nesterov: ``v' = m*v + lr*g; w -= (1+m)*v' - m*v``."""

    rule_name = "Nesterov"
    history_keys = ("momentum_buffer",)


class AdaGrad(CaffeOptimizer):
    """Caffe's AdaGrad: ``h += g^2; w -= lr*g/(sqrt(h)+delta)`` (momentum must be 0)."""

    rule_name = "AdaGrad"
    history_keys = ("sum",)


class RMSProp(CaffeOptimizer):
    """Caffe's RMSProp: ``h = d*h + (1-d)*g^2; w -= lr*g/(sqrt(h)+delta)`` with ``d = rms_decay``."""

    rule_name = "RMSProp"
    history_keys = ("square_avg",)


class AdaDelta(CaffeOptimizer):
    """Caffe's AdaDelta (decay ``momentum``, ``delta`` inside both roots, times lr)."""

    rule_name = "AdaDelta"
    history_keys = ("square_avg", "acc_delta")


class Adam(CaffeOptimizer):
    """Caffe's Adam: delta added to ``sqrt(v)`` of the uncorrected v; L2 decay in the gradient."""

    rule_name = "Adam"
    history_keys = ("exp_avg", "exp_avg_sq")


OPTIMIZERS: dict[str, type[CaffeOptimizer]] = {
    c.rule_name: c for c in (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam)
}


def param_groups(learnable: Any, include_frozen: bool = False) -> list[dict[str, Any]]:
    """One param group per ``(lr_mult, decay_mult)``, in Caffe's parameter order, from a net's
    ``learnable_params()`` (a :class:`~caffeport.net.Net`, anything with ``learnable_params()``, or
    the list of ``(layer, index, param, lr_mult, decay_mult)``). Frozen blobs (``lr_mult`` 0 or no
    gradient) are left out unless ``include_frozen`` (Caffe's solverstate keeps their history)."""
    items = learnable.learnable_params() if hasattr(learnable, "learnable_params") else learnable
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for _, _, prm, lr_mult, decay_mult in items:
        if (lr_mult == 0 or not prm.requires_grad) and not include_frozen:
            continue
        key = (float(lr_mult), float(decay_mult))
        g = groups.setdefault(key, {"params": [], "lr_mult": key[0], "decay_mult": key[1]})
        g["params"].append(prm)
    return list(groups.values())
