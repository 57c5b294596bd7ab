"""CLI for ``caffe train`` / ``caffe test`` / ``caffe time``, with Caffe's flags and log lines.

Flags are accepted as ``--flag value``, ``--flag=value`` and gflags' ``-flag=value``; the solver can
also be given positionally (``caffeport train solver.prototxt --weights x.caffemodel``). Logs are
glog-format lines on stderr (and appended to ``--log FILE``), so ``parse_log.py``/``parse_log.sh``
read them; a progress bar is shown only on an interactive terminal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from caffeport.cli._group import allow_python_layers_option, main
from caffeport.errors import CaffeportError


def _opt(name: str, dest: str | None = None, **kw: Any) -> Callable[[Any], Any]:
    """An option reachable as --name, --name-with-dashes and -name (gflags style)."""
    decls = [f"--{name}", f"-{name}"]
    if "_" in name:
        decls.insert(1, "--" + name.replace("_", "-"))
    return click.option(*decls, dest or name, **kw)


def _stages(stage: str) -> list[str]:
    return [s for s in stage.split(",") if s] if stage else []


def _device(gpu: str | None, log: Any, single: bool = True) -> torch.device | None:
    """``-gpu 0``, ``-gpu 0,1`` or ``-gpu all`` -> the torch device to use (None: not given)."""
    if not gpu:
        return None
    if gpu == "all":
        ids = list(range(torch.cuda.device_count()))
    else:
        try:
            ids = [int(x) for x in gpu.split(",") if x.strip()]
        except ValueError:
            raise CaffeportError(f"--gpu \"{gpu}\": expected device ids separated by ',' or 'all'") from None
    if not ids or not torch.cuda.is_available():
        log.info(f"GPU {gpu} requested but CUDA is not available: using the CPU", "caffe.cpp:220")
        log.info("Use CPU.", "caffe.cpp:222")
        return torch.device("cpu")
    if len(ids) > 1:
        what = "multi-GPU training is not supported yet" if not single else "single-GPU function"
        log.info(f"{what}: using GPU {ids[0]} only (not {', '.join(str(i) for i in ids[1:])})", "caffe.cpp:220")
    for i in ids[:1]:
        if i >= torch.cuda.device_count():
            raise CaffeportError(f"--gpu {gpu}: no CUDA device {i} ({torch.cuda.device_count()} available)")
    log.info(f"Using GPUs {ids[0]}", "caffe.cpp:224")
    log.info(f"GPU {ids[0]}: {torch.cuda.get_device_name(ids[0])}", "caffe.cpp:229")
    return torch.device("cuda", ids[0])


@main.command("train")
@allow_python_layers_option
@click.argument("solver_file", required=False, type=click.Path(dir_okay=False))
@_opt("solver", default=None, help="The solver definition protocol buffer text file.")
@_opt("weights", default=None, help="Pretrained weights to fine-tune from, separated by ','. Not with --snapshot.")
@_opt("snapshot", default=None, help="A .solverstate to resume training from.")
@_opt("gpu", default=None, help="GPU device ids separated by ',' or 'all': one solver process per device, "
     "gradients averaged (effective batch = batch_size x devices). Testing aid: cpu:N runs N CPU processes.")
@_opt("iterations", type=int, default=None, help="Override the solver's max_iter.")
@_opt("level", type=int, default=None, help="Network level (train_state level).")
@_opt("stage", default="", help="Network stages (train_state), separated by ','.")
@_opt("sigint_effect", default="stop", show_default=True, help="On SIGINT: snapshot, stop or none.")
@_opt("sighup_effect", default="snapshot", show_default=True, help="On SIGHUP: snapshot, stop or none.")
@_opt("log", "log_file", default=None, type=click.Path(dir_okay=False), help="Also append the log to FILE.")
@_opt("net", default=None, help="Use this train net file instead of the solver's net/train_net.")
@_opt("snapshot_prefix", default=None, help="Use this snapshot prefix instead of the solver's.")
@click.option("--fast", is_flag=True, help="Fast training: channels_last, bf16 conv/fc where the hardware has "
              "it, torch.compile on CUDA (eager on the CPU, where it measured faster); the same Caffe-exact "
              "update; the first batch is checked against exact.")
def train_cmd(solver_file: str | None, solver: str | None, weights: str | None, snapshot: str | None,
              gpu: str | None, iterations: int | None, level: int | None, stage: str, sigint_effect: str,
              sighup_effect: str, log_file: str | None, net: str | None, snapshot_prefix: str | None,
              fast: bool = False) -> None:
    """Train or fine-tune a model (``caffe train``)."""
    from caffeport.solver import Glog, SignalActions
    from caffeport.solver.parallel import TrainJob, launch, plan_devices, run_torchrun, torchrun_env, train

    if solver_file and solver and solver_file != solver:
        raise CaffeportError(f"two solvers given: {solver_file} and --solver {solver}")
    path = solver or solver_file
    if not path:
        raise CaffeportError("need a solver definition to train: caffeport train SOLVER.prototxt (or --solver)")
    if snapshot and weights:
        raise CaffeportError("give a snapshot to resume training or weights to fine-tune, but not both "
                             "(--snapshot and --weights)")
    job = TrainJob(path, net=net, level=level, stages=tuple(_stages(stage)), weights=weights, snapshot=snapshot,
                   iterations=iterations, snapshot_prefix=snapshot_prefix, log_file=log_file,
                   sigint_effect=sigint_effect, sighup_effect=sighup_effect)
    actions = SignalActions(sigint_effect, sighup_effect)  # validates the effects up front
    if fast and (torchrun_env() is not None or plan_devices(gpu) is not None):
        raise CaffeportError("--fast is single-process only: data-parallel training (--gpu with several "
                             "devices, cpu:N, torchrun) runs in exact mode; drop --fast or train on one device")
    if torchrun_env() is not None:  # one rank of a torchrun / env:// job (multi-node data parallel)
        from caffeport.io import read_solver

        if not Path(path).exists():
            raise CaffeportError(f"solver file not found: {path}")
        read_solver(Path(path), net=net)
        run_torchrun(job, gpu)
        return
    devices = plan_devices(gpu)
    if devices is not None:  # Caffe's multi-GPU training: one process per device
        from caffeport.io import read_solver

        if not Path(path).exists():
            raise CaffeportError(f"solver file not found: {path}")
        read_solver(Path(path), net=net)  # parse errors here, before starting the workers
        launch(job, devices)
        return
    log = Glog.stderr(log_file)
    try:
        device = _device(gpu, log, single=False)
        after_load = None
        if fast:
            def after_load(s: Any) -> None:
                s.enable_fast()
                s.add_update_hook(_log_fast_once(s, log))
        train(job, device, log, actions, after_load=after_load, signals=actions)
    finally:
        log.close()


def _log_fast_once(s: Any, log: Any) -> Callable[[int, float], None]:
    """An update hook logging, after the first update, the one line of what fast mode did."""
    done = []

    def hook(it: int, rate: float) -> None:
        if not done and s.fast is not None and s.fast.checked:
            done.append(True)
            log.info(f"Fast mode: {s.fast.summary()}", "fast_train.py:0")
    return hook


_fast_opt = click.option("--fast", is_flag=True, help="Fast mode (inference): folded BatchNorm/Scale, channels_last, "
                         "torch.compile, bf16 where the CPU has it; checked once against the exact forward.")


@main.command("test")
@allow_python_layers_option
@_opt("model", required=True, help="The model definition (net prototxt) to score.")
@_opt("weights", required=True, help="The weights (.caffemodel, ',' separated) to score.")
@_opt("iterations", type=int, default=50, show_default=True, help="Number of batches.")
@_opt("gpu", default=None, help="GPU device id (only the first is used).")
@_opt("level", type=int, default=0, help="Network level.")
@_opt("stage", default="", help="Network stages, separated by ','.")
@_opt("log", "log_file", default=None, type=click.Path(dir_okay=False), help="Also append the log to FILE.")
@_fast_opt
def test_cmd(model: str, weights: str, iterations: int, gpu: str | None, level: int, stage: str,
             log_file: str | None, fast: bool = False) -> None:
    """Score a model in the TEST phase (``caffe test``): per-batch outputs, then their means."""
    from caffeport.net import TEST, Net
    from caffeport.solver.logging import Glog, cfloat

    log = Glog.stderr(log_file, progress=False)
    try:
        device = _device(gpu, log) or torch.device("cpu")
        if device.type == "cpu" and not gpu:
            log.info("Use CPU.", "caffe.cpp:283")
        net = Net(model, weights=weights, phase=TEST, level=level, stages=_stages(stage), device=device)
        fast_net = None
        if fast:
            from caffeport.fast import build_fast

            fast_net = build_fast(net)
            log.info(f"Fast mode: {fast_net.report.summary()}; {fast_net.precision}, "
                     f"{'compiled' if fast_net.compiled else 'eager'}; max relative error vs exact "
                     f"{fast_net.max_rel_error:.3g} (tolerance {fast_net.tolerance:g})", "fast.py:0")
        log.info(f"Running for {iterations} iterations.", "caffe.cpp:290")
        sums: list[np.float32] = []
        ids: list[str] = []
        loss = np.float32(0.0)
        for i in range(iterations):
            if fast_net is not None:
                touts = fast_net()
                outs = {k: v.cpu().numpy() for k, v in touts.items()}
                lw = net.loss_weights
                net.loss = float(sum(float(touts[k].double().sum()) * w for k, w in lw.items() if k in touts))
            else:
                with torch.no_grad():
                    outs = net.forward()
            loss = np.float32(loss + np.float32(net.loss or 0.0))
            idx = 0
            for name in net.outputs:
                for v in np.asarray(outs[name], dtype=np.float32).ravel():
                    if i == 0:
                        sums.append(np.float32(v))
                        ids.append(name)
                    else:
                        sums[idx] = np.float32(sums[idx] + v)
                    log.info(f"Batch {i}, {name} = {cfloat(v)}", "caffe.cpp:313")
                    idx += 1
        loss = np.float32(loss / np.float32(max(iterations, 1)))
        log.info(f"Loss: {cfloat(loss)}", "caffe.cpp:318")
        weights_by_name = net.loss_weights
        for s, name in zip(sums, ids):
            mean = np.float32(s / np.float32(iterations))
            w = weights_by_name.get(name, 0.0)
            extra = f" (* {cfloat(w)} = {cfloat(np.float32(w * mean))} loss)" if w else ""
            log.info(f"{name} = {cfloat(mean)}{extra}", "caffe.cpp:330")
    finally:
        log.close()


class _LayerTimer:
    """Per-layer forward/backward wall times through module and tensor hooks (device-synchronised)."""

    def __init__(self, net: Any, device: torch.device):
        self.net = net
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        n = len(net.layers)
        self.fwd = [0.0] * n
        self.bwd = [0.0] * n
        self._t0: dict[int, float] = {}
        self._bstart: dict[int, float] = {}
        self._bend: dict[int, float] = {}
        self._handles: list[Any] = []
        for i, layer in enumerate(net.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(i)))
            self._handles.append(layer.register_forward_hook(self._post(i)))
            for p in layer.blobs:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._end(i)))

    def _now(self) -> float:
        self.sync()
        return time.perf_counter()

    def _pre(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple) -> None:
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    a.register_hook(self._end(i))
            self._t0[i] = self._now()
        return hook

    def _post(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple, out: Any) -> None:
            self.fwd[i] += self._now() - self._t0.pop(i)
            outs = out if isinstance(out, tuple) else (out,)
            for o in outs:
                if isinstance(o, torch.Tensor) and o.requires_grad:
                    o.register_hook(self._start(i))
        return hook

    def _start(self, i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            t = self._now()
            self._bstart[i] = min(self._bstart.get(i, t), t)
        return hook

    def _end(self, i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            t = self._now()
            self._bend[i] = max(self._bend.get(i, t), t)
        return hook

    def begin_backward(self, t: float) -> None:
        # the loss layers' backward starts when backward is called
        for i, layer in enumerate(self.net.layers):
            if getattr(layer, "is_loss", False):
                self._bstart.setdefault(i, t)

    def end_iteration(self) -> None:
        for i, t in self._bend.items():
            s = self._bstart.get(i)
            if s is not None and t >= s:
                self.bwd[i] += t - s
        self._bstart.clear()
        self._bend.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@main.command("time")
@allow_python_layers_option
@_opt("model", required=True, help="The model definition (net prototxt) to time.")
@_opt("iterations", type=int, default=50, show_default=True, help="Number of forward-backward passes.")
@_opt("phase", default="TRAIN", show_default=True, type=click.Choice(["TRAIN", "TEST"]), help="Net phase.")
@_opt("gpu", default=None, help="GPU device id (only the first is used).")
@_opt("level", type=int, default=0, help="Network level.")
@_opt("stage", default="", help="Network stages, separated by ','.")
@_opt("log", "log_file", default=None, type=click.Path(dir_okay=False), help="Also append the log to FILE.")
@_fast_opt
def time_cmd(model: str, iterations: int, phase: str, gpu: str | None, level: int, stage: str,
             log_file: str | None, fast: bool = False) -> None:
    """Benchmark per-layer forward/backward times (``caffe time``)."""
    from caffeport.net import TEST, TRAIN, Net
    from caffeport.solver.logging import Glog, cfloat

    log = Glog.stderr(log_file, progress=False)
    try:
        device = _device(gpu, log) or torch.device("cpu")
        if device.type == "cpu" and not gpu:
            log.info("Use CPU.", "caffe.cpp:360")
        net = Net(model, phase=TRAIN if phase == "TRAIN" and not fast else TEST, level=level, stages=_stages(stage),
                  device=device)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        if fast:
            _time_fast(net, iterations, log, sync)
            return

        def fwd_bwd() -> tuple[float, float]:
            with torch.enable_grad():
                t0 = time.perf_counter()
                table = net.module.run(dict(net._inputs))
                loss = net.module.loss(table)
                sync()
                t1 = time.perf_counter()
                if timer is not None:
                    timer.begin_backward(t1)
                if loss is not None and loss.requires_grad:
                    loss.backward()
                sync()
                t2 = time.perf_counter()
            net.clear_param_diffs()
            return t1 - t0, t2 - t1

        timer = None
        log.info("Performing Forward", "caffe.cpp:372")
        with torch.no_grad():
            net.forward()
        log.info(f"Initial loss: {cfloat(net.loss or 0.0)}", "caffe.cpp:377")
        log.info("Performing Backward", "caffe.cpp:378")
        fwd_bwd()
        timer = _LayerTimer(net, device)
        log.info("*** Benchmark begins ***", "caffe.cpp:388")
        log.info(f"Testing for {iterations} iterations.", "caffe.cpp:389")
        total_f = total_b = 0.0
        t_all = time.perf_counter()
        for j in range(iterations):
            t_it = time.perf_counter()
            f, b = fwd_bwd()
            timer.end_iteration()
            total_f += f
            total_b += b
            log.info(f"Iteration: {j + 1} forward-backward time: {cfloat((time.perf_counter() - t_it) * 1e3)} ms.",
                     "caffe.cpp:414")
        total = time.perf_counter() - t_all
        timer.remove()
        n = max(iterations, 1)
        log.info("Average time per layer: ", "caffe.cpp:417")
        for i, layer in enumerate(net.layers):
            log.info(f"{layer.name:>10}\tforward: {cfloat(timer.fwd[i] * 1e3 / n)} ms.", "caffe.cpp:420")
            log.info(f"{layer.name:>10}\tbackward: {cfloat(timer.bwd[i] * 1e3 / n)} ms.", "caffe.cpp:423")
        log.info(f"Average Forward pass: {cfloat(total_f * 1e3 / n)} ms.", "caffe.cpp:428")
        log.info(f"Average Backward pass: {cfloat(total_b * 1e3 / n)} ms.", "caffe.cpp:430")
        log.info(f"Average Forward-Backward: {cfloat(total * 1e3 / n)} ms.", "caffe.cpp:432")
        log.info(f"Total Time: {cfloat(total * 1e3)} ms.", "caffe.cpp:433")
        log.info("*** Benchmark ends ***", "caffe.cpp:434")
    finally:
        log.close()


def _time_fast(net: Any, iterations: int, log: Any, sync: Callable[[], None]) -> None:
    """``caffeport time --fast``: forward-only timing of the fast module (no per-layer times: the
    layers are folded and compiled into one program; no backward: fast mode is inference, TEST phase)."""
    from caffeport.fast import build_fast
    from caffeport.solver.logging import cfloat

    fast = build_fast(net)
    log.info(f"Fast mode: {fast.report.summary()}; {fast.precision}, {'compiled' if fast.compiled else 'eager'}; "
             f"max relative error vs exact {fast.max_rel_error:.3g} (tolerance {fast.tolerance:g})", "fast.py:0")
    feeds = {k: net.blobs[k].data.copy() for k in net.inputs}
    fast(**feeds)
    log.info("*** Benchmark begins ***", "caffe.cpp:388")
    log.info(f"Testing for {iterations} iterations.", "caffe.cpp:389")
    total = 0.0
    for j in range(iterations):
        t0 = time.perf_counter()
        fast(**feeds)
        sync()
        dt = time.perf_counter() - t0
        total += dt
        log.info(f"Iteration: {j + 1} forward time: {cfloat(dt * 1e3)} ms.", "caffe.cpp:414")
    n = max(iterations, 1)
    log.info(f"Average Forward pass: {cfloat(total * 1e3 / n)} ms.", "caffe.cpp:428")
    log.info(f"Total Time: {cfloat(total * 1e3)} ms.", "caffe.cpp:433")
