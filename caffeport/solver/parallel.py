"""Caffe's multi-GPU training (``caffe train -gpu 0,1`` / ``-gpu all``) as data parallelism over
``torch.distributed``.

Caffe 1.0 (``tools/caffe.cpp``, ``src/caffe/parallel.cpp``, ``solver.cpp``, ``data_layer.cpp``):

- one solver per device; solver ``r`` seeds its RNG with ``random_seed + r``;
- every replica starts from the root solver's weights (after ``-weights`` / ``-snapshot``);
- each solver's TRAIN Data/HDF5Data layers read records ``r, r+W, r+2W...`` (``Skip()``), so the
  effective batch is ``batch_size x W`` and one iteration reads the records one solver with a W-times
  larger batch would read;
- the diffs are summed over the devices (NCCL all-reduce) and scaled by ``1/W``, then every solver
  applies the same update;
- only the root solver (rank 0) logs, tests and snapshots.

Here: :func:`launch` starts W processes (``torch.multiprocessing`` spawn), each initialises
``torch.distributed`` (NCCL on CUDA, gloo on the CPU), builds its solver on its device (the solver
all-reduces in :meth:`~caffeport.solver.solver.Solver.reduce_gradients`; data layers stride by
themselves when ``torch.distributed`` is initialised), loads ``--weights``/``--snapshot``, takes the
weights and solver history of rank 0 (:func:`broadcast_state`) and solves.

Signals (``-sigint_effect`` / ``-sighup_effect``) are acted on by rank 0 and forwarded to the other
ranks once per iteration, after the update, so every replica stops or snapshots at the same
iteration (a signal that arrives during a test pass is acted on after the next update). Send them to
the whole process group (Ctrl-C does) or to rank 0; the launcher and the other ranks ignore them.

Multi-node: under ``torchrun`` (env:// rendezvous: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
``caffeport train`` is one rank of the job (:func:`run_torchrun`): the same meaning across machines,
records strided by global rank, NCCL on ``cuda:LOCAL_RANK`` or gloo on the CPU. Collectives time out
after ``CAFFEPORT_DIST_TIMEOUT`` seconds (default 1800), so a rank that dies ends the job with one
message instead of a hang; rank 0's snapshots are atomic files, so the last one stays intact.

Testing aid (no GPUs needed): ``--gpu cpu:N`` runs N CPU processes over gloo, and with
``CAFFEPORT_DP_DEVICE=cpu`` in the environment ``--gpu 0,1`` (any id list) does the same with one
process per listed id. CPU processes share the machine's cores (each gets ``cores / N`` threads).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch

from caffeport.errors import CaffeportError

__all__ = ["TrainJob", "ENV_DEVICE", "ENV_TIMEOUT", "plan_devices", "launch", "train", "broadcast_state",
           "SyncedActions", "torchrun_env", "run_torchrun", "collective_timeout"]

ENV_DEVICE = "CAFFEPORT_DP_DEVICE"
ENV_TIMEOUT = "CAFFEPORT_DIST_TIMEOUT"


@dataclass(frozen=True)
class TrainJob:
    """What ``caffeport train`` was asked to do (picklable, so spawned workers can rebuild it)."""

    solver: str
    net: str | None = None
    level: int | None = None
    stages: tuple[str, ...] = ()
    weights: str | None = None
    snapshot: str | None = None
    iterations: int | None = None
    snapshot_prefix: str | None = None
    log_file: str | None = None
    sigint_effect: str = "stop"
    sighup_effect: str = "snapshot"


def plan_devices(gpu: str | None) -> list[torch.device] | None:
    """The devices of a data-parallel run for ``--gpu``, or None for a single-process run.

    ``0,1`` / ``all``: one CUDA device each (``all`` = every visible device); ``cpu:N``: N CPU
    processes (testing aid); with ``CAFFEPORT_DP_DEVICE=cpu`` an id list means one CPU process per id.
    A single id, or ids without CUDA (and without the testing aid), are not data-parallel (None)."""
    if not gpu:
        return None
    spec = gpu.strip()
    if spec.lower().startswith("cpu:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise CaffeportError(f"--gpu \"{gpu}\": expected cpu:N with N the number of CPU processes") from None
        if n < 1:
            raise CaffeportError(f"--gpu \"{gpu}\": need at least 1 process")
        return [torch.device("cpu")] * n if n > 1 else None
    on_cpu = os.environ.get(ENV_DEVICE, "").strip().lower() == "cpu"
    if spec == "all":
        if on_cpu:
            raise CaffeportError(f"--gpu all with {ENV_DEVICE}=cpu: list the ids (e.g. --gpu 0,1) or use --gpu cpu:N")
        if not torch.cuda.is_available():
            return None
        ids = list(range(torch.cuda.device_count()))
    else:
        try:
            ids = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise CaffeportError(f"--gpu \"{gpu}\": expected device ids separated by ',' or 'all'") from None
    if len(ids) != len(set(ids)):
        raise CaffeportError(f"--gpu {gpu}: a device is listed twice")
    if len(ids) < 2:
        return None
    if on_cpu:
        return [torch.device("cpu")] * len(ids)
    if not torch.cuda.is_available():
        return None
    for i in ids:
        if i < 0 or i >= torch.cuda.device_count():
            raise CaffeportError(f"--gpu {gpu}: no CUDA device {i} ({torch.cuda.device_count()} available)")
    return [torch.device("cuda", i) for i in ids]


# --- one solver (every rank, and the single-process CLI) -----------------------------------------------
def train(job: TrainJob, device: torch.device | None, log: Any, actions: Callable[[], str] | None = None,
          after_load: Callable[[Any], None] | None = None, signals: Any = None) -> Any:
    """Build the solver, apply ``--iterations``, load ``--snapshot`` or ``--weights``, call
    ``after_load(solver)`` (data parallel: take rank 0's state), then solve with ``actions`` as the
    solver's action source, inside ``signals`` (a SignalActions context). Returns the solver."""
    from caffeport.solver import get_solver

    s = get_solver(job.solver, net=job.net, level=job.level, stages=list(job.stages), device=device, log=log,
                   snapshot_prefix=job.snapshot_prefix)
    if device is None:
        log.info("Use CPU." if s.device.type == "cpu" else f"Using GPUs {s.device.index or 0}", "caffe.cpp:222")
    if job.iterations is not None:
        s.param.max_iter = int(job.iterations)
    if actions is not None:
        s.action = actions
    if job.snapshot:
        log.info(f"Resuming from {job.snapshot}", "caffe.cpp:248")
        s.restore(job.snapshot)
    elif job.weights:
        s.copy_weights(job.weights)
    if after_load is not None:
        after_load(s)
    log.info("Starting Optimization", "caffe.cpp:253")
    with signals if signals is not None else contextlib.nullcontext():
        s.solve()
    log.info("Optimization Done.", "caffe.cpp:259")
    return s


# --- what the ranks share ----------------------------------------------------------------------------------
@torch.no_grad()
def broadcast_state(solver: Any, src: int = 0) -> None:
    """Give every rank the weights (every blob of the train net, BatchNorm statistics included), the
    update history, ``iter`` and ``current_step`` of rank ``src`` (Caffe's replicas copy the root
    solver's parameters; only the root reads ``--weights`` / ``--snapshot``)."""
    import torch.distributed as dist

    seen: set[int] = set()
    tensors = []
    for layer in solver.net.layers:
        for b in layer.blobs:
            if id(b) not in seen:
                seen.add(id(b))
                tensors.append(b.data)
    tensors += [h for hs in solver.history for h in hs]
    for t in tensors:
        dist.broadcast(t, src)
    # iteration and lr step: only rank ``src`` read the --snapshot
    dev = tensors[0].device if tensors else torch.device("cpu")
    counters = torch.tensor([int(solver.iter), int(solver.current_step)], dtype=torch.int64, device=dev)
    dist.broadcast(counters, src)
    solver.iter, solver.current_step = int(counters[0]), int(counters[1])


class SyncedActions:
    """Signal requests as rank 0 sees them, handed to every rank at the same iteration.

    Register :meth:`exchange` as an update hook on every rank (it runs after each update, before
    the solver checks its action) and install the object as the solver's ``action``. Rank 0 passes
    its local source (a :class:`~caffeport.solver.SignalActions`); the others pass None."""

    CODES = ("none", "stop", "snapshot")

    def __init__(self, local: Callable[[], str] | None, group: Any = None):
        self.local = local
        self.group = group
        self.pending = "none"
        self._buf = torch.zeros(1, dtype=torch.int64)  # on the CPU: the control group is gloo

    def exchange(self, it: int = 0, rate: float = 0.0) -> None:
        import torch.distributed as dist

        if self.local is not None:
            self._buf.fill_(self.CODES.index(self.local()))
        dist.broadcast(self._buf, 0, group=self.group)
        self.pending = self.CODES[int(self._buf.item())]

    def __call__(self) -> str:
        a, self.pending = self.pending, "none"
        return a


# --- the launcher ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def collective_timeout() -> timedelta:
    """How long a rank waits on a collective before the job ends (``CAFFEPORT_DIST_TIMEOUT`` seconds,
    default 1800): a rank that died or hangs then ends the job with one message instead of a hang."""
    raw = os.environ.get(ENV_TIMEOUT, "").strip()
    try:
        secs = float(raw) if raw else 1800.0
    except ValueError:
        raise CaffeportError(f"{ENV_TIMEOUT}={raw!r}: expected a number of seconds") from None
    return timedelta(seconds=max(1.0, secs))


def _peer_lost(e: BaseException) -> bool:
    """A torch.distributed failure (timeout, closed connection) rather than an error of this rank."""
    import torch.distributed as dist

    text = f"{type(e).__name__}: {e}".lower()
    kinds = tuple(k for k in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None)) if k)
    return isinstance(e, kinds) or any(w in text for w in ("timed out", "timeout", "connection closed",
                                                          "connection reset", "broken pipe", "gloo",
                                                          "nccl", "peer", "socket"))


def _run_rank(rank: int, world: int, dev: torch.device, job: TrainJob, init_method: str,
              what: str) -> None:
    """One data-parallel rank: join the process group, solve, leave. ``what`` names the launcher
    in rank 0's log line. A lost peer becomes one CaffeportError (snapshots are atomic: the last one
    written stays intact)."""
    import torch.distributed as dist

    from caffeport.solver import Glog, SignalActions

    if rank != 0:  # rank 0 acts on signals and tells the others
        for sig in (signal.SIGINT, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                signal.signal(sig, signal.SIG_IGN)
    timeout = collective_timeout()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world, device_id=dev,
                                timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=timeout)
    else:
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=timeout)
        control = None
    log = Glog.stderr(job.log_file) if rank == 0 else Glog()
    try:
        local = SignalActions(job.sigint_effect, job.sighup_effect) if rank == 0 else None
        synced = SyncedActions(local, control)

        def after_load(s: Any) -> None:
            broadcast_state(s)
            s.add_update_hook(synced.exchange)

        if rank == 0:
            log.info(f"Using GPUs {', '.join(str(d.index) for d in [dev])} (rank 0 of {world}, {what})"
                     if dev.type == "cuda" else f"Data parallel on the CPU: {world} processes (gloo, {what})",
                     "caffe.cpp:224")
            log.info(f"Starting {world} solvers ({'NCCL' if dev.type == 'cuda' else 'gloo'}); effective batch = "
                     f"batch_size x {world}", "parallel.cpp:397")
        # Only rank 0 reads --snapshot / --weights (the files may exist on its node only, as the
        # snapshots rank 0 wrote); the others take rank 0's state in after_load.
        rank_job = job if rank == 0 else replace(job, snapshot=None, weights=None)
        try:
            train(rank_job, dev, log, synced, after_load, signals=local)
            dist.barrier()
        except CaffeportError:
            raise
        except Exception as e:
            if not _peer_lost(e):
                raise
            raise CaffeportError(
                f"rank {rank} of {world}: another rank stopped answering ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'}); the job is ended. Snapshots "
                f"are written atomically by rank 0, so the last one is intact: resume the whole job with "
                f"--snapshot PREFIX_iter_N.solverstate") from None
    finally:
        log.close()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _worker(rank: int, job: TrainJob, devices: list[torch.device], init_method: str, errors: Any) -> None:
    try:
        _run_rank(rank, len(devices), devices[rank], job, init_method, "spawned by caffeport")
    except CaffeportError as e:
        errors.put((rank, str(e)))
        raise SystemExit(1) from None


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when launched by torchrun / SLURM-style env:// variables
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) with more than one rank, else None."""
    env = os.environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local = int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise CaffeportError(f"torchrun environment: RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}"
                             f", LOCAL_RANK={env.get('LOCAL_RANK')!r} must be integers") from None
    if world < 2:
        return None
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise CaffeportError(f"torchrun environment: WORLD_SIZE={world} but {', '.join(missing)} not set "
                             "(launch with torchrun, or export them for env:// rendezvous)")
    if not 0 <= rank < world:
        raise CaffeportError(f"torchrun environment: RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


def run_torchrun(job: TrainJob, gpu: str | None) -> None:
    """``caffeport train`` as one rank of a torchrun job (``--nnodes N --nproc-per-node M``): global
    rank strides the records, gradients are averaged over all ranks, rank 0 logs/tests/snapshots.
    Device: ``cuda:LOCAL_RANK`` (NCCL) when CUDA is available and ``--gpu`` is not ``cpu...``,
    else the CPU (gloo)."""
    env = torchrun_env()
    if env is None:
        raise CaffeportError("run_torchrun: no torchrun environment (RANK/WORLD_SIZE) with 2+ ranks")
    rank, world, local = env
    want_cpu = bool(gpu) and gpu.strip().lower().startswith("cpu") or \
        os.environ.get(ENV_DEVICE, "").strip().lower() == "cpu"
    if torch.cuda.is_available() and not want_cpu:
        if local >= torch.cuda.device_count():
            raise CaffeportError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                                 "devices on this node (--nproc-per-node must not exceed the GPUs per node)")
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    _run_rank(rank, world, dev, job, "env://", f"torchrun rank {rank}")


def launch(job: TrainJob, devices: list[torch.device]) -> None:
    """Run ``job`` on ``devices`` (one process each, rank = position) and wait for the end. A
    :class:`CaffeportError` in any rank is raised here (the other ranks are stopped)."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    if len(devices) < 2:
        raise CaffeportError("data-parallel training needs at least 2 devices")
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    old = {}
    for sig in (signal.SIGINT, getattr(signal, "SIGHUP", None)):  # rank 0 handles them
        if sig is not None:
            try:
                old[sig] = signal.signal(sig, signal.SIG_IGN)
            except ValueError:  # not the main thread
                pass
    try:
        mp.start_processes(_worker, args=(job, list(devices), init_method, errors), nprocs=len(devices),
                           join=True, start_method="spawn")
    except ProcessException as e:
        msgs = []
        while not errors.empty():
            msgs.append(errors.get())
        if msgs:
            rank, msg = sorted(msgs)[0]
            raise CaffeportError(msg if rank == 0 else f"rank {rank}: {msg}") from None
        raise CaffeportError(f"data-parallel training failed: {e}") from e
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
