"""pycaffe's small module-level functions: ``caffe.Timer``, ``init_log``/``log``, ``__version__``,
the solver count/rank/multiprocess globals and the NCCL entry points.

Where caffeport differs from pycaffe:

- ``init_log(level, stderr)``: glog writes to log files under ``/tmp`` unless ``stderr`` is true;
  caffeport writes no log files: ``log(msg)`` prints a glog-format line on stderr before
  ``init_log`` is called (as glog does before it is initialised) and after ``init_log(level, True)``,
  and is silent after ``init_log()`` / ``init_log(level)``. ``level`` is glog's minloglevel
  (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL): ``log`` writes INFO lines, shown only at level 0.
- ``solver_count``/``solver_rank``/``set_multiprocess`` are plain process-wide values (Caffe's
  globals); caffeport's own multi-device training (``caffeport train --gpu 0,1``) does not read
  them.
- ``has_nccl()`` is False and ``NCCL(...)`` raises a CaffeportError: pycaffe's NCCL multi-GPU
  recipe (``python/train.py``) is replaced by ``caffeport train --gpu 0,1`` (torch.distributed).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from caffeport.errors import CaffeportError

__all__ = ["__version__", "Timer", "init_log", "log", "solver_count", "set_solver_count", "solver_rank",
           "set_solver_rank", "set_multiprocess", "multiprocess", "has_nccl", "NCCL"]

__version__ = "1.0.0"  # the Caffe version pycaffe reports (CAFFE_VERSION of BVLC Caffe 1.0)

_STATE: dict[str, Any] = {"minloglevel": 0, "to_stderr": True, "solver_count": 1, "solver_rank": 0,
                          "multiprocess": False}


class Timer:
    """``caffe.Timer()``: ``start()``, ``stop()``, ``ms`` (milliseconds between them).

    As Caffe's CPU timer, ``ms`` is a whole number of milliseconds (boost's
    ``total_milliseconds`` truncates), reading it stops a running timer, and a timer never started
    reads 0."""

    def __init__(self) -> None:
        self._running = False
        self._has_run = False
        self._start = 0.0
        self._stop = 0.0

    def start(self) -> None:
        if not self._running:
            self._start = time.perf_counter()
            self._running = True
            self._has_run = True

    def stop(self) -> None:
        if self._running:
            self._stop = time.perf_counter()
            self._running = False

    @property
    def ms(self) -> float:
        if not self._has_run:
            log_line("Timer has never been run before reading time.", level="W")
            return 0.0
        if self._running:
            self.stop()
        return float(int((self._stop - self._start) * 1000.0))


def init_log(level: int = 0, stderr: bool = False) -> None:
    """``caffe.init_log([level[, stderr]])``: set glog's minimum level; see the module notes."""
    _STATE["minloglevel"] = int(level)
    _STATE["to_stderr"] = bool(stderr)


def log_line(msg: str, level: str = "I", where: str = "_caffe.cpp:68") -> None:
    from caffeport.solver.logging import glog_prefix

    rank = {"I": 0, "W": 1, "E": 2, "F": 3}[level]
    if rank < _STATE["minloglevel"]:
        return
    if _STATE["to_stderr"] or rank >= 2:  # glog copies ERROR and above to stderr
        sys.stderr.write(glog_prefix(where, level) + str(msg) + "\n")
        sys.stderr.flush()


def log(msg: str) -> None:
    """``caffe.log(msg)``: one INFO line in glog's format."""
    log_line(msg)


def solver_count() -> int:
    return int(_STATE["solver_count"])


def set_solver_count(count: int) -> None:
    _STATE["solver_count"] = int(count)


def solver_rank() -> int:
    return int(_STATE["solver_rank"])


def set_solver_rank(rank: int) -> None:
    _STATE["solver_rank"] = int(rank)


def set_multiprocess(value: bool) -> None:
    _STATE["multiprocess"] = bool(value)


def multiprocess() -> bool:
    return bool(_STATE["multiprocess"])


def has_nccl() -> bool:
    """False: caffeport has no pycaffe NCCL object (multi-device training: ``caffeport train --gpu``)."""
    return False


_NO_NCCL = ("caffe.NCCL is not available in caffeport (has_nccl() is False); for multi-device training "
            "run `caffeport train --solver S --gpu 0,1` (one process per device over torch.distributed)")


class NCCL:
    """Raises: pycaffe's NCCL is not provided (see :func:`has_nccl`)."""

    def __init__(self, solver: Any = None, uid: Any = None) -> None:
        raise CaffeportError(_NO_NCCL)

    @staticmethod
    def new_uid() -> bytes:
        raise CaffeportError(_NO_NCCL)
