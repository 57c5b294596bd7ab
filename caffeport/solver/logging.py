"""Log lines in glog's format, so Caffe's log tools keep working on caffeport's training logs.

Every line gets glog's prefix ``Lmmdd hh:mm:ss.uuuuuu  tid file:line] `` followed by the message
Caffe prints (``Iteration 100 (1.2 iter/s, 83.1s/100 iters), loss = 0.693``...), so that
``tools/extra/parse_log.py`` (regexes on ``Iteration (\\d+)``, ``Train net output``, ``lr = ``) and
``parse_log.sh`` (``awk`` on whitespace-separated fields) parse them as they parse Caffe's logs.
The ``file:line`` tags are those of Caffe 1.0's sources (they only matter to the eye).

Numbers are formatted as C++'s ``operator<<`` prints a ``float`` (6 significant digits, ``%g``).

A :class:`Glog` writes to any number of text streams (stderr for the CLI, a ``--log`` file). A
progress line (``\\r``-rewritten) is shown only when the terminal stream is interactive and never
goes into files.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterable
from typing import TextIO

__all__ = ["Glog", "cfloat", "glog_prefix"]

# Tags of Caffe 1.0 (BVLC 9b891540) for the lines the solver and `caffe` tool print.
WHERE = {
    "solve": "solver.cpp:289",
    "policy": "solver.cpp:290",
    "restore": "solver.cpp:294",
    "display": "solver.cpp:218",
    "train_output": "solver.cpp:237",
    "lr": "sgd_solver.cpp:105",
    "multistep": "sgd_solver.cpp:46",
    "clip": "sgd_solver.cpp:92",
    "test": "solver.cpp:330",
    "test_loss": "solver.cpp:394",
    "test_output": "solver.cpp:397",
    "test_interrupted": "solver.cpp:380",
    "snapshot_model": "solver.cpp:447",
    "snapshot_model_h5": "solver.cpp:458",
    "snapshot_state": "sgd_solver.cpp:273",
    "snapshot_state_h5": "sgd_solver.cpp:290",
    "restore_history": "sgd_solver.cpp:318",
    "final_loss": "solver.cpp:310",
    "done": "solver.cpp:315",
    "stopped": "solver.cpp:303",
    "scaffold": "solver.cpp:72",
    "init": "solver.cpp:48",
    "train_net": "solver.cpp:91",
    "test_net": "solver.cpp:181",
    "caffe": "caffe.cpp:259",
}


def cfloat(x: float) -> str:
    """``x`` as ``std::ostream << (float)x`` prints it: ``%g`` with 6 significant digits."""
    x = float(x)
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:g}"


def glog_prefix(where: str, level: str = "I", now: float | None = None) -> str:
    """glog's line prefix: ``I1123 20:33:12.123456 12345 solver.cpp:218] ``."""
    t = time.time() if now is None else now
    lt = time.localtime(t)
    usec = int((t - math.floor(t)) * 1e6)
    tid = threading.get_native_id() if hasattr(threading, "get_native_id") else os.getpid()
    return (f"{level}{lt.tm_mon:02d}{lt.tm_mday:02d} {lt.tm_hour:02d}:{lt.tm_min:02d}:{lt.tm_sec:02d}."
            f"{usec:06d} {tid:5d} {where}] ")


class Glog:
    """A glog-like line logger writing to several streams.

    ``Glog()`` (no streams) is silent: the Python API is quiet by default like pycaffe, whose glog
    output goes to log files, not the terminal. The CLI passes ``sys.stderr`` (and the ``--log`` file).
    """

    def __init__(self, streams: Iterable[TextIO] = (), progress: bool = False):
        self.streams: list[TextIO] = list(streams)
        self._progress_on = bool(progress) and any(_isatty(s) for s in self.streams)
        self._progress_shown = False
        self.lines: list[str] | None = None  # set to a list to also keep the lines (tests)

    @classmethod
    def stderr(cls, log_file: str | os.PathLike | None = None, progress: bool = True) -> Glog:
        streams: list[TextIO] = [sys.stderr]
        if log_file is not None:
            streams.append(open(log_file, "a", encoding="utf-8"))  # noqa: SIM115 - closed by close()
        return cls(streams, progress=progress)

    @property
    def enabled(self) -> bool:
        return bool(self.streams) or self.lines is not None

    def info(self, msg: str, where: str = "solver.cpp:218", level: str = "I") -> None:
        """Write one glog line (``where`` is a key of :data:`WHERE` or a ``file:line`` tag)."""
        if not self.enabled:
            return
        line = glog_prefix(WHERE.get(where, where), level) + msg
        if self.lines is not None:
            self.lines.append(line)
        for s in self.streams:
            if self._progress_shown and _isatty(s):
                s.write("\r\033[K")
            s.write(line + "\n")
            s.flush()
        self._progress_shown = False

    def warning(self, msg: str, where: str = "solver.cpp:218") -> None:
        self.info(msg, where, level="W")

    def progress(self, done: int, total: int, extra: str = "") -> None:
        """A one-line progress bar on interactive terminals only (not in files, not in ``lines``)."""
        if not self._progress_on or total <= 0:
            return
        width = 30
        filled = int(width * min(done, total) / total)
        bar = "#" * filled + "-" * (width - filled)
        text = f"\r[{bar}] {done}/{total} {extra}"
        for s in self.streams:
            if _isatty(s):
                s.write(text + "\033[K")
                s.flush()
        self._progress_shown = True

    def close(self) -> None:
        for s in self.streams:
            if s not in (sys.stderr, sys.stdout):
                s.close()
        self.streams = []


def _isatty(s: TextIO) -> bool:
    try:
        return bool(s.isatty())
    except (AttributeError, ValueError):
        return False
