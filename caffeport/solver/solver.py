"""The training loop: Caffe's ``Solver::Solve``/``Step``/``Test`` and ``SGDSolver::ApplyUpdate``.

One iteration, in Caffe's order:

1. ``ClearParamDiffs``; a test pass when ``test_interval`` divides ``iter`` (at 0 only with
   ``test_initialization``, default true);
2. :meth:`Solver.compute_gradients`: ``iter_size`` forward/backward passes whose diffs accumulate
   (loss = their mean);
3. :meth:`Solver.reduce_gradients`: identity for one process; with ``torch.distributed``
   initialised, grads are all-reduced and divided by the world size (Caffe's multi-GPU ``P2PSync``);
4. display (``display`` divides ``iter``): smoothed loss over ``average_loss`` iterations and every
   train-net output, in glog lines;
5. :meth:`Solver.apply_update`: lr from the policy, then ``self.optimizer.step()`` (the
   :mod:`caffeport.optim` optimizer of the solver's type: clip, normalise (÷``iter_size``),
   regularise, the rule's update value, ``w -= value``); ``iter += 1``;
6. snapshot when ``snapshot`` divides the new ``iter``; signal requests (stop/snapshot).

Differences from a ``torch.optim`` loop are documented in :mod:`caffeport.solver.updates`.
Beyond Caffe: a non-finite loss or gradient stops training with a :class:`CaffeportError` naming the
iteration, after snapshotting the last finite weights (Caffe would keep training on NaNs).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2
from caffeport.solver import snapshot as snap
from caffeport.solver.logging import Glog, cfloat
from caffeport.solver.policies import learning_rate
from caffeport.solver.updates import RULES, UpdateRule, f32

__all__ = [
    "Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
    "AdamSolver", "get_solver", "SignalActions", "STOP", "SNAPSHOT", "NONE",
]

PathLike = str | os.PathLike
STOP, SNAPSHOT, NONE = "stop", "snapshot", "none"
TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def _read_param(solver: PathLike | caffe_pb2.SolverParameter, net: PathLike | None) -> tuple[
        caffe_pb2.SolverParameter, str, Path]:
    """(upgraded SolverParameter, source name, folder) from a path or a message."""
    from caffeport.io import read_solver, upgrade_solver

    if isinstance(solver, caffe_pb2.SolverParameter):
        msg = caffe_pb2.SolverParameter()
        msg.CopyFrom(solver)
        upgrade_solver(msg, "<SolverParameter>")
        if net is not None:
            if msg.HasField("train_net"):
                msg.train_net = os.fspath(net)
            else:
                msg.net = os.fspath(net)
            msg.ClearField("net_param")
            msg.ClearField("train_net_param")
        return msg, "<SolverParameter>", Path.cwd()
    p = Path(solver)
    if not p.exists():
        raise CaffeportError(f"solver file not found: {p}")
    msg = read_solver(p, net=net, resolve_paths=False)
    _resolve_solver_paths(msg, p)
    return msg, str(p), p.resolve().parent


def _resolve_solver_paths(msg: caffe_pb2.SolverParameter, solver: Path) -> None:
    """Relative ``net``/``train_net``/``test_net``/``weights`` paths: the working directory first (as
    Caffe, whose shipped solvers say ``examples/mnist/...`` from the Caffe root), then the solver's folder;
    a path found in neither is an error naming both places tried."""
    folder = solver.resolve().parent

    def res(field: str, v: str) -> str:
        if not v or os.path.isabs(v):
            if v and not Path(v).exists():
                raise CaffeportError(f"{solver}: {field}: \"{v}\" does not exist")
            return v
        tried = [Path.cwd() / v, folder / v]
        for c in tried:
            if c.exists():
                return str(c)
        raise CaffeportError(f"{solver}: {field}: \"{v}\" not found: tried {tried[0]} (the working directory, "
                             f"as Caffe) and {tried[1]} (the solver's folder); fix the path or pass net=/--net")

    for field in ("net", "train_net"):
        if msg.HasField(field):
            setattr(msg, field, res(field, getattr(msg, field)))
    for i, v in enumerate(list(msg.test_net)):
        msg.test_net[i] = res(f"test_net[{i}]", v)
    new_w = [",".join(res("weights", x.strip()) for x in v.split(",") if x.strip()) for v in msg.weights]
    del msg.weights[:]
    msg.weights.extend(new_w)
    if not msg.HasField("snapshot_prefix"):
        msg.snapshot_prefix = str(solver.with_suffix(""))
    elif os.path.isdir(msg.snapshot_prefix):
        msg.snapshot_prefix = str(Path(msg.snapshot_prefix) / solver.stem)


def _merged_state(phase: int, net_msg: caffe_pb2.NetParameter, extra: caffe_pb2.NetState | None) -> tuple[
        int, int, list[str]]:
    """Caffe's NetState precedence: solver default phase < the net's own ``state`` < train/test_state."""
    st = caffe_pb2.NetState()
    st.phase = phase
    st.MergeFrom(net_msg.state)
    if extra is not None:
        st.MergeFrom(extra)
    stages: list[str] = []
    for s in st.stage:
        if s not in stages:
            stages.append(s)
    return int(st.phase), int(st.level), stages


def build_net(model: PathLike | caffe_pb2.NetParameter, phase: int, extra: caffe_pb2.NetState | None,
              device: torch.device | None, source: str = "<solver>") -> Any:
    """A solver's train or test :class:`~caffeport.net.Net` with Caffe's NetState precedence."""
    from caffeport.io import read_net
    from caffeport.net import Net

    if isinstance(model, caffe_pb2.NetParameter):
        msg = model
    else:
        if not Path(model).exists():
            raise CaffeportError(f"{source}: net file not found: {model}")
        msg = read_net(model)
    ph, level, stages = _merged_state(phase, msg, extra)
    if isinstance(model, caffe_pb2.NetParameter):
        m = caffe_pb2.NetParameter()
        m.CopyFrom(model)
        return Net(m, phase=ph, level=level, stages=stages, device=device)
    return Net(model, phase=ph, level=level, stages=stages, device=device)


def build_train_net(param: caffe_pb2.SolverParameter, source: str, device: torch.device | None,
                    log: Glog | None = None) -> Any:
    """The TRAIN net of a solver (exactly one of net, net_param, train_net, train_net_param), as
    ``Solver::InitTrainNet``."""
    p = param
    log = log or Glog()
    fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
    if len(fields) != 1:
        raise CaffeportError(
            f"{source}: a solver must specify exactly one train net with net, net_param, train_net "
            f"or train_net_param (found {len(fields)}{': ' + ', '.join(fields) if fields else ''})")
    field = fields[0]
    model = getattr(p, field)
    if isinstance(model, str):
        log.info(f"Creating training net from {field} file: {model}", "train_net")
    else:
        log.info(f"Creating training net specified in {field}.", "train_net")
    return build_net(model, TRAIN, p.train_state if p.HasField("train_state") else None, device, source)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class SignalActions:
    """``caffe train``'s ``-sigint_effect`` / ``-sighup_effect``: signals are recorded and turned
    into a requested action (``stop``, ``snapshot`` or ``none``) checked between iterations."""

    def __init__(self, sigint_effect: str = STOP, sighup_effect: str = SNAPSHOT):
        for name, v in (("sigint_effect", sigint_effect), ("sighup_effect", sighup_effect)):
            if v not in (STOP, SNAPSHOT, NONE):
                raise CaffeportError(f"invalid {name} \"{v}\": use snapshot, stop or none")
        self.effects = {signal.SIGINT: sigint_effect}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup_effect
        self._pending: list[str] = []
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self._pending.append(self.effects.get(signum, NONE))

    def __enter__(self) -> SignalActions:
        for sig in self.effects:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def __call__(self) -> str:
        """The next requested action (``none`` when no signal is pending)."""
        while self._pending:
            a = self._pending.pop(0)
            if a != NONE:
                return a
        return NONE


class Solver:
    """A Caffe solver on caffeport nets (pycaffe's ``caffe.get_solver`` / ``caffe.SGDSolver``...).

    ``Solver(solver, net=None, level=None, stages=None, device=None, log=None)``: ``solver`` is a
    solver prototxt path or a ``SolverParameter`` (legacy ``solver_type`` upgraded); ``net``
    overrides the solver's train net path; ``level``/``stages`` set ``train_state`` (as
    ``caffe train -level -stage``); ``device`` overrides ``solver_mode``/``device_id``; ``log`` is a
    :class:`~caffeport.solver.logging.Glog` (silent by default, like pycaffe).

    The base class picks the update rule from ``type``; the subclasses force theirs.
    """

    rule_name: str | None = None

    def __init__(self, solver: PathLike | caffe_pb2.SolverParameter, *, net: PathLike | None = None,
                 level: int | None = None, stages: Sequence[str] | None = None,
                 device: str | torch.device | None = None, log: Glog | None = None,
                 weights: Sequence[PathLike] | None = None, snapshot_prefix: PathLike | None = None):
        self.param, self.source, self.folder = _read_param(solver, net)
        p = self.param
        if snapshot_prefix is not None:  # for solvers whose prefix points at someone else's machine
            p.snapshot_prefix = str(snapshot_prefix)
        if level is not None:
            p.train_state.level = int(level)
        if stages:
            p.train_state.stage.extend([s for s in stages if s])
        self.rank = _rank()
        # Data-parallel workers other than rank 0 neither log, test nor snapshot (Caffe's root_solver).
        self.log = log if (log is not None and self.rank == 0) else Glog()
        rule_name = self.rule_name or (p.type or "SGD")
        if rule_name not in RULES:
            from caffeport.errors import nearest

            raise CaffeportError(f"{self.source}: unknown solver type \"{rule_name}\" (Caffe knows "
                                 f"{', '.join(RULES)}){nearest(rule_name, RULES)}")
        self.rule: UpdateRule = RULES[rule_name](p, self.source)
        self.type = rule_name
        if p.average_loss < 1:
            raise CaffeportError(f"{self.source}: average_loss should be >= 1, got {p.average_loss}")
        if p.iter_size < 1:
            raise CaffeportError(f"{self.source}: iter_size should be >= 1, got {p.iter_size}")
        if p.lr_policy == "":
            raise CaffeportError(f"{self.source}: lr_policy is not set (Caffe has no default; "
                                 "e.g. lr_policy: \"fixed\")")
        if p.snapshot > 0:
            self._check_snapshot_prefix()
        self.device = self._pick_device(device)
        if p.random_seed >= 0:  # solver r of a data-parallel run: random_seed + r, as Caffe
            torch.manual_seed(int(p.random_seed) + self.rank)
            np.random.seed((int(p.random_seed) + self.rank) % (2**32))
        self.iter = 0
        self.current_step = 0
        self.learning_rate = 0.0
        self.requested_early_exit = False
        self.action: Callable[[], str] | None = None
        self._callbacks: list[tuple[Callable[[], None] | None, Callable[[], None] | None]] = []
        self._update_hooks: list[Callable[[int, float], None]] = []
        self._losses: list[float] = []
        self.smoothed_loss = 0.0
        self.last_loss = float("nan")
        self.last_forward_losses: list[float] = []
        self.test_results: list[dict[str, np.ndarray]] = []
        self.net = self._init_train_net()
        self.test_nets = self._init_test_nets()
        for w in list(p.weights) + [os.fspath(x) for x in (weights or [])]:
            self.copy_weights(w)
        self._learnable = self.net.learnable_params()
        # The update runs through the caffeport.optim optimizer of this type (one implementation):
        # every learnable blob in it, frozen ones too (their history may grow, as Caffe's does).
        from caffeport.optim.optimizer import OPTIMIZERS, param_groups

        self.optimizer = OPTIMIZERS[rule_name](param_groups(self._learnable, include_frozen=True), p)
        self.optimizer.source = self.source
        self.rule = self.optimizer._make_rule()
        prms = [prm for (_, _, prm, _, _) in self._learnable]
        hs = [self.optimizer.history_of(prm) for prm in prms]
        self.history: list[list[torch.Tensor]] = [[h[s] for h in hs] for s in range(self.rule.history_sets)]
        self._share_test_weights()
        self.fast: Any = None  # a caffeport.fast_train.FastTrain after enable_fast()
        self.log.info("Solver scaffolding done.", "scaffold")

    # --- construction ----------------------------------------------------------------------------
    def _pick_device(self, device: str | torch.device | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        if self.param.solver_mode == caffe_pb2.SolverParameter.GPU:
            if torch.cuda.is_available():
                return torch.device("cuda", int(self.param.device_id))
            self.log.info("solver_mode GPU requested but CUDA is not available: training on the CPU", "caffe")
        return torch.device("cpu")

    def _build_net(self, model: PathLike | caffe_pb2.NetParameter, phase: int,
                   extra: caffe_pb2.NetState | None) -> Any:
        return build_net(model, phase, extra, self.device, self.source)

    def _init_train_net(self) -> Any:
        return build_train_net(self.param, self.source, self.device, self.log)

    def _init_test_nets(self) -> list[Any]:
        p = self.param
        generic = int(p.HasField("net_param")) + int(p.HasField("net"))
        n_specific = len(p.test_net_param) + len(p.test_net)
        n_iters = len(p.test_iter)
        if generic:
            if n_iters < n_specific:
                raise CaffeportError(f"{self.source}: test_iter must be specified for each test network "
                                     f"({n_specific} test nets, {n_iters} test_iter)")
        elif n_iters != n_specific:
            raise CaffeportError(f"{self.source}: test_iter must be specified for each test network "
                                 f"({n_specific} test nets, {n_iters} test_iter)")
        n_generic = n_iters - n_specific
        total = n_specific + n_generic
        if len(p.test_state) and len(p.test_state) != total:
            raise CaffeportError(f"{self.source}: test_state must be unspecified or specified once per test net "
                                 f"({total} test nets, {len(p.test_state)} test_state)")
        if total and p.test_interval <= 0:
            raise CaffeportError(f"{self.source}: test nets are defined (test_iter) but test_interval is not > 0")
        models: list[tuple[str, Any]] = []
        models += [("test_net_param", m) for m in p.test_net_param]
        models += [(f"test_net file: {f}", f) for f in p.test_net]
        if n_generic > 0:
            if p.HasField("net_param"):
                models += [("net_param", p.net_param)] * n_generic
            elif p.HasField("net"):
                models += [(f"net file: {p.net}", p.net)] * n_generic
        nets = []
        for i, (where, model) in enumerate(models):
            self.log.info(f"Creating test net (#{i}) specified by {where}", "test_net")
            nets.append(self._build_net(model, TEST, p.test_state[i] if len(p.test_state) else None))
        return nets

    def copy_weights(self, weights: PathLike) -> None:
        """Fine-tune: copy layers by name from caffemodel(s) (comma-separated) into the train and
        test nets (``caffe train -weights``); layers absent from the file keep their fillers."""
        for w in str(weights).split(","):
            w = w.strip()
            if not w:
                continue
            if not Path(w).exists():
                raise CaffeportError(f"{self.source}: weights file not found: {w}")
            self.log.info(f"Finetuning from {w}", "caffe.cpp:136")
            self.net.copy_from(w)
            for tn in self.test_nets:
                tn.copy_from(w)
        self._share_test_weights()

    def _share_test_weights(self) -> None:
        """Caffe's ``ShareTrainedLayersWith``: test-net layers named like a train-net layer use the
        train layer's blobs (same storage, so updates are seen without copies)."""
        for k, tn in enumerate(self.test_nets):
            for name, layer in tn.layer_dict.items():
                src = self.net.layer_dict.get(name)
                if src is None or len(layer.blobs) == 0:
                    continue
                if len(src.blobs) != len(layer.blobs):
                    raise CaffeportError(f"test net #{k}: layer '{name}' has {len(layer.blobs)} blobs, the train "
                                         f"net's has {len(src.blobs)}: cannot share weights")
                for j, (dst_p, src_p) in enumerate(zip(layer.blobs, src.blobs)):
                    if dst_p is src_p or dst_p.data_ptr() == src_p.data_ptr():
                        continue
                    if dst_p.shape != src_p.shape:
                        raise CaffeportError(
                            f"test net #{k}: cannot share param {j} of layer '{name}': shape {tuple(src_p.shape)} "
                            f"in the train net, {tuple(dst_p.shape)} in the test net")
                    dst_p.data = src_p.data

    def enable_fast(self, **kwargs: Any) -> Any:
        """Fast training (:mod:`caffeport.fast_train`: channels_last, bf16 conv/fc where the hardware
        has it, ``torch.compile``) for the train net's forward/backward; the optimizer, test nets and
        snapshots stay as they are. Returns the ``FastTrain`` (its ``summary()`` after the first step)."""
        from caffeport.fast_train import enable_fast

        self.fast = enable_fast(self, **kwargs)
        return self.fast

    # --- pycaffe-style hooks -----------------------------------------------------------------------
    def add_callback(self, on_start: Callable[[], None] | None = None,
                     on_gradients_ready: Callable[[], None] | None = None) -> None:
        """pycaffe's ``solver.add_callback``: ``on_start`` runs at the start of each iteration (after
        the test pass), ``on_gradients_ready`` when the accumulated diffs are ready, before the update."""
        self._callbacks.append((on_start, on_gradients_ready))

    def add_update_hook(self, fn: Callable[[int, float], None]) -> None:
        """``fn(iter, rate)`` after each update (``iter`` = the iteration just applied)."""
        self._update_hooks.append(fn)

    # --- the loop ----------------------------------------------------------------------------------
    def _request(self) -> str:
        return self.action() if self.action is not None else NONE

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (Caffe's ``Solver::Step``)."""
        p = self.param
        start_iter = self.iter
        stop_iter = self.iter + int(iters)
        self._losses = []
        self.smoothed_loss = 0.0
        timer = time.perf_counter()
        iterations_last = self.iter
        while self.iter < stop_iter:
            self.net.clear_param_diffs()
            if (p.test_interval and self.iter % p.test_interval == 0
                    and (self.iter > 0 or p.test_initialization)):
                self.test_all()
                if self.requested_early_exit:
                    break
            for on_start, _ in self._callbacks:
                if on_start is not None:
                    on_start()
            display = bool(p.display) and self.iter % p.display == 0
            loss, table = self.compute_gradients()
            self.reduce_gradients()
            self._update_smoothed_loss(loss, start_iter)
            if display:
                lapse = time.perf_counter() - timer
                per_s = (self.iter - iterations_last) / (lapse if lapse else 1.0)
                self.log.info(f"Iteration {self.iter} ({cfloat(per_s)} iter/s, {cfloat(lapse)}s/{p.display} iters), "
                              f"loss = {cfloat(self.smoothed_loss)}", "display")
                timer = time.perf_counter()
                iterations_last = self.iter
                self._log_outputs(self.net, table, "Train", "train_output")
            for _, on_grad in self._callbacks:
                if on_grad is not None:
                    on_grad()
            self._check_finite(loss)
            self.apply_update()
            self.iter += 1
            self.log.progress(self.iter - start_iter, stop_iter - start_iter, f"loss {cfloat(self.smoothed_loss)}")
            request = self._request()
            if (p.snapshot and self.iter % p.snapshot == 0) or request == SNAPSHOT:
                self.snapshot()
            if request == STOP:
                self.requested_early_exit = True
                break

    def solve(self, resume_file: PathLike | None = None) -> None:
        """Train to ``max_iter`` (Caffe's ``Solver::Solve``), optionally resuming from a solverstate."""
        p = self.param
        self.log.info(f"Solving {self.net.net_param.name}", "solve")
        self.log.info(f"Learning Rate Policy: {p.lr_policy}", "policy")
        self.requested_early_exit = False
        if resume_file is not None:
            self.log.info(f"Restoring previous solver status from {resume_file}", "restore")
            self.restore(resume_file)
        start_iter = self.iter
        self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            self.log.info("Optimization stopped early.", "stopped")
            return
        if p.display and self.iter % p.display == 0:
            with torch.no_grad():
                self.net.forward()
            loss = float(self.net.loss or 0.0)
            self._update_smoothed_loss(loss, start_iter)
            self.log.info(f"Iteration {self.iter}, loss = {cfloat(self.smoothed_loss)}", "final_loss")
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        self.log.info("Optimization Done.", "done")

    def _update_smoothed_loss(self, loss: float, start_iter: int) -> None:
        avg = int(self.param.average_loss)
        if len(self._losses) < avg:
            self._losses.append(loss)
            n = len(self._losses)
            self.smoothed_loss = f32((self.smoothed_loss * (n - 1) + loss) / n)
        else:
            idx = (self.iter - start_iter) % avg
            self.smoothed_loss = f32(self.smoothed_loss + (loss - self._losses[idx]) / avg)
            self._losses[idx] = loss

    # --- the three steps of an iteration (separable for data parallelism) ---------------------------
    def compute_gradients(self) -> tuple[float, dict[str, torch.Tensor]]:
        """``iter_size`` forward/backward passes accumulating into the diffs; returns (mean loss,
        blob table of the last pass)."""
        n = int(self.param.iter_size)
        total = np.float32(0.0)
        losses = []
        table: dict[str, torch.Tensor] = {}
        pass_ = self.fast.forward_backward if self.fast is not None else self.net.forward_backward
        for _ in range(n):
            loss, table = pass_()
            losses.append(loss)
            total = np.float32(total + np.float32(loss))
        self.last_forward_losses = losses
        self.last_loss = float(np.float32(total / np.float32(n)))
        return self.last_loss, table

    def reduce_gradients(self) -> None:
        """Average the diffs over data-parallel workers (no-op for a single process): Caffe's
        ``P2PSync`` sums the diffs over devices and scales them by ``1/solver_count``."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        grads = []
        for _, _, prm, _, _ in self._learnable:
            if prm.grad is None:
                prm.grad = torch.zeros_like(prm)
            grads.append(prm.grad)
        # One all-reduce per ~64 MiB bucket of same-typed diffs (Caffe reduces one flat diff buffer).
        buckets: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = {}
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for g in grads:
            key = (g.device, g.dtype)
            bs = buckets.setdefault(key, [[]])
            if sizes.get(key, 0) >= 64 << 20:
                bs.append([])
                sizes[key] = 0
            bs[-1].append(g)
            sizes[key] = sizes.get(key, 0) + g.numel() * g.element_size()
        for bs in buckets.values():
            for b in bs:
                flat = b[0] if len(b) == 1 else torch._utils._flatten_dense_tensors(b)
                dist.all_reduce(flat)
                flat.mul_(1.0 / world)
                if len(b) > 1:
                    torch._foreach_copy_(b, torch._utils._unflatten_dense_tensors(flat, b))

    @torch.no_grad()
    def apply_update(self) -> None:
        """Caffe's ``SGDSolver::ApplyUpdate`` (rate, clip, normalise, regularise, update value,
        ``w -= value``) through ``self.optimizer``; does not increment ``iter``."""
        p = self.param
        rate, self.current_step, advanced = learning_rate(p, self.iter, self.current_step, self.source)
        if advanced:
            self.log.info(f"MultiStep Status: Iteration {self.iter}, step = {self.current_step}", "multistep")
        if p.display and self.iter % p.display == 0:
            self.log.info(f"Iteration {self.iter}, lr = {cfloat(rate)}", "lr")
        self.learning_rate = rate
        opt = self.optimizer
        for g in opt.param_groups:
            g["lr"] = rate
        opt.iter = self.iter
        opt.step()
        clipped = opt.last_clip
        if clipped is not None:
            self.log.info(f"Gradient clipping: scaling down gradients (L2 norm {cfloat(clipped[0])} > "
                          f"{cfloat(p.clip_gradients)}) by scale factor {cfloat(clipped[1])}", "clip")
        for fn in self._update_hooks:
            fn(self.iter, rate)

    def _check_finite(self, loss: float) -> None:
        bad = None
        if not math.isfinite(loss):
            bad = f"the loss is {cfloat(loss)}"
        else:
            grads = [prm.grad for _, _, prm, _, _ in self._learnable if prm.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                total = float(torch.stack([n.double() for n in norms]).sum())
                if not math.isfinite(total):
                    names = [f"{ln}[{j}]" for ln, j, prm, _, _ in self._learnable
                             if prm.grad is not None and not bool(torch.isfinite(prm.grad).all())]
                    bad = f"the gradient of {', '.join(names[:5])} is not finite"
        if bad is None:
            return
        model, state = self.snapshot()
        raise CaffeportError(
            f"{self.source}: training diverged at iteration {self.iter}: {bad} (loss {cfloat(loss)}, lr "
            f"{cfloat(self.learning_rate)}); stopped after snapshotting the last finite weights to {model} "
            f"and {state}; lower base_lr, add clip_gradients or check the data")

    # --- testing -----------------------------------------------------------------------------------
    def test_all(self) -> list[dict[str, np.ndarray]]:
        """Run every test net (Caffe's ``TestAll``; rank 0 only); returns their mean outputs."""
        results: list[dict[str, np.ndarray]] = []
        if self.rank != 0:
            return results
        for k in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            results.append(self.test(k))
        self.test_results = results
        return results

    @torch.no_grad()
    def test(self, test_net_id: int = 0) -> dict[str, np.ndarray]:
        """Caffe's ``Solver::Test``: ``test_iter`` forward passes of the test net (sharing the train
        net's weights); each output element averaged over the batches, accumulated in float32."""
        p = self.param
        self.log.info(f"Iteration {self.iter}, Testing net (#{test_net_id})", "test")
        self._share_test_weights()
        tn = self.test_nets[test_net_id]
        n = int(p.test_iter[test_net_id])
        sums: dict[str, np.ndarray] = {}
        loss = np.float32(0.0)
        for i in range(n):
            request = self._request()
            while request != NONE:
                if request == SNAPSHOT:
                    self.snapshot()
                elif request == STOP:
                    self.requested_early_exit = True
                request = self._request()
            if self.requested_early_exit:
                break
            outs = tn.forward()
            if p.test_compute_loss:
                loss = np.float32(loss + np.float32(tn.loss or 0.0))
            for name, arr in outs.items():
                a = np.asarray(arr, dtype=np.float32)
                if i == 0:
                    sums[name] = a.copy()
                else:
                    sums[name] = (sums[name] + a).astype(np.float32)
        if self.requested_early_exit:
            self.log.info("Test interrupted.", "test_interrupted")
            return {}
        if p.test_compute_loss:
            loss = np.float32(loss / np.float32(n))
            self.log.info(f"Test loss: {cfloat(loss)}", "test_loss")
        means = {name: (s / np.float32(n)).astype(np.float32) for name, s in sums.items()}
        weights = tn.loss_weights
        k = 0
        for name in tn.outputs:
            if name not in means:
                continue
            w = weights.get(name, 0.0)
            for v in np.asarray(means[name]).ravel():
                extra = f" (* {cfloat(w)} = {cfloat(f32(w * float(v)))} loss)" if w else ""
                self.log.info(f"    Test net output #{k}: {name} = {cfloat(v)}{extra}", "test_output")
                k += 1
        return means

    def _log_outputs(self, net: Any, table: dict[str, torch.Tensor], kind: str, where: str) -> None:
        if not self.log.enabled:
            return
        weights = net.loss_weights
        k = 0
        for name in net.outputs:
            t = table.get(name)
            if t is None:
                continue
            w = weights.get(name, 0.0)
            for v in t.detach().float().cpu().numpy().ravel():
                extra = f" (* {cfloat(w)} = {cfloat(f32(w * float(v)))} loss)" if w else ""
                self.log.info(f"    {kind} net output #{k}: {name} = {cfloat(v)}{extra}", where)
                k += 1

    # --- snapshots ---------------------------------------------------------------------------------
    def _history_flat(self) -> list[torch.Tensor]:
        return [h for hs in self.history for h in hs]

    def snapshot(self) -> tuple[str, str]:
        """Write ``<prefix>_iter_<iter>.caffemodel`` + ``.solverstate`` (or the ``.h5`` pair; rank 0
        only); returns their paths."""
        p = self.param
        hdf5 = p.snapshot_format == caffe_pb2.SolverParameter.HDF5
        prefix = p.snapshot_prefix
        self._check_snapshot_prefix()
        if hdf5:
            model = snap.snapshot_filename(prefix, self.iter, ".caffemodel.h5")
            self.log.info(f"Snapshotting to HDF5 file {model}", "snapshot_model_h5")
        else:
            model = snap.snapshot_filename(prefix, self.iter, ".caffemodel")
            self.log.info(f"Snapshotting to binary proto file {model}", "snapshot_model")
        if self.rank != 0:
            return model, snap.snapshot_filename(prefix, self.iter, ".solverstate.h5" if hdf5 else ".solverstate")
        snap.write_model(self.net, model, hdf5, with_diff=bool(p.snapshot_diff))
        if hdf5:
            state = snap.snapshot_filename(prefix, self.iter, ".solverstate.h5")
            self.log.info(f"Snapshotting solver state to HDF5 file {state}", "snapshot_state_h5")
        else:
            state = snap.snapshot_filename(prefix, self.iter, ".solverstate")
            self.log.info(f"Snapshotting solver state to binary proto file {state}", "snapshot_state")
        snap.write_state(state, self.iter, self.current_step, model, self._history_flat())
        return model, state

    def _check_snapshot_prefix(self) -> None:
        """Caffe's ``CheckSnapshotWritePermissions``: the prefix's folder must exist and be writable."""
        prefix = self.param.snapshot_prefix
        parent = Path(prefix).parent if prefix else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise CaffeportError(f"{self.source}: cannot write to snapshot prefix '{prefix}': make sure that the "
                                 f"directory {parent} exists and is writeable")

    def restore(self, state_file: PathLike) -> None:
        """Resume from a ``.solverstate`` (or ``.solverstate.h5``): weights from its ``learned_net``,
        ``iter``, ``current_step`` and the history blobs. Data layers restart from their first
        record, as Caffe's do."""
        st = snap.read_state(state_file)
        if st.learned_net:
            self.net.copy_from(str(snap.resolve_learned_net(st.learned_net, state_file)))
            self._share_test_weights()
        self.iter = int(st.iter)
        self.current_step = int(st.current_step)
        flat = self._history_flat()
        if len(st.history) != len(flat):
            raise CaffeportError(
                f"{state_file}: incorrect length of history blobs: the solverstate has {len(st.history)}, "
                f"this {self.type} solver on this net needs {len(flat)}")
        self.log.info("SGDSolver: restoring history", "restore_history")
        with torch.no_grad():
            for j, (h, arr) in enumerate(zip(flat, st.history)):
                a = np.asarray(arr, dtype=np.float32)
                if a.size != h.numel():
                    raise CaffeportError(f"{state_file}: history blob {j} has {a.size} values, the parameter "
                                         f"has {h.numel()} (shape {tuple(h.shape)})")
                h.copy_(torch.from_numpy(a.reshape(tuple(h.shape))))


class SGDSolver(Solver):
    rule_name = "SGD"


class NesterovSolver(Solver):
    rule_name = "Nesterov"


class AdaGradSolver(Solver):
    rule_name = "AdaGrad"


class RMSPropSolver(Solver):
    rule_name = "RMSProp"


class AdaDeltaSolver(Solver):
    rule_name = "AdaDelta"


class AdamSolver(Solver):
    rule_name = "Adam"


def get_solver(solver: PathLike | caffe_pb2.SolverParameter, **kwargs: Any) -> Solver:
    """pycaffe's ``caffe.get_solver``: an instance of the solver class named by the file's ``type``
    (legacy ``solver_type`` upgraded)."""
    param, _, _ = _read_param(solver, kwargs.get("net"))
    cls = _CLASSES.get(param.type or "SGD", Solver)
    return cls(solver, **kwargs)


_CLASSES: dict[str, type[Solver]] = {
    c.rule_name: c for c in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver, AdamSolver)
    if c.rule_name
}
