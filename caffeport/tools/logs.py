"""Caffe training logs: ``parse-log`` (Caffe's ``tools/extra/parse_log.py``) and ``plot-log`` (the
cats-vs-dogs tutorial's ``plot_learning_curve.py``).

Both read the glog lines that ``caffe train`` (and ``caffeport train``) print::

    I0728 14:52:02.285944  5447 solver.cpp:337] Iteration 0, Testing net (#0)
    I0728 14:56:06.601838  5447 solver.cpp:404]     Test net output #0: accuracy = 0.496
    I0728 14:56:06.602041  5447 solver.cpp:404]     Test net output #1: loss = 0.704933 (* 1 = 0.704933 loss)
    I0728 14:56:08.362238  5447 solver.cpp:244]     Train net output #0: loss = 0.860079 (* 1 = ...)
    I0728 14:56:08.362278  5447 sgd_solver.cpp:106] Iteration 0, lr = 0.001

``parse_log`` follows ``parse_log.py`` exactly: the current iteration is the last ``Iteration N``
seen; nothing is recorded before the first one; ``Seconds`` is the time since the ``Solving`` line
(the first glog line when there is none); each ``Train/Test net output #k: name = value`` line adds a
column to the row of the current iteration, and a row is complete when it has as many columns as the
first row; the first row's ``LearningRate`` (NaN, the lr is printed after the first outputs) is copied
from the second row. CSV columns: ``NumIters,Seconds,LearningRate,<output names>``, written to
``<OUTDIR>/<log name>.train`` and ``.test``.

One deliberate difference: ``parse_log.py`` takes the year from the log file's ctime and cannot
handle a log that runs past New Year; here a timestamp that goes back in time rolls the year over.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from caffeport.errors import CaffeportError
from caffeport.io.atomic import atomic_write

__all__ = ["ParsedLog", "parse_log", "parse_log_lines", "write_parse_log_csv", "plot_log", "atomic_write_bytes"]

_RE_ITERATION = re.compile(r"Iteration (\d+)")
_RE_TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
_RE_TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
_RE_LR = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
_RE_GLOG = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d+))?\s")

Row = "OrderedDict[str, float]"


@dataclass
class ParsedLog:
    """The rows of a parsed log: ``train`` and ``test`` lists of ordered ``{column: value}``."""

    train: list[OrderedDict[str, float]] = field(default_factory=list)
    test: list[OrderedDict[str, float]] = field(default_factory=list)

    @staticmethod
    def _columns(rows: list[OrderedDict[str, float]]) -> list[str]:
        return list(rows[0].keys()) if rows else []

    @property
    def train_columns(self) -> list[str]:
        return self._columns(self.train)

    @property
    def test_columns(self) -> list[str]:
        return self._columns(self.test)

    def column(self, which: str, name: str) -> list[float]:
        """One column of the ``'train'`` or ``'test'`` table (NaN where a row lacks it)."""
        rows = self.train if which == "train" else self.test
        return [float(r.get(name, math.nan)) for r in rows]


class _Clock:
    """glog timestamps (month, day, time; no year) -> seconds, rolling the year over when time runs
    backwards (a log that crosses New Year)."""

    def __init__(self) -> None:
        self.year = 2000  # a leap year, so a Feb 29 timestamp parses
        self.last: _dt.datetime | None = None

    def parse(self, line: str) -> _dt.datetime | None:
        m = _RE_GLOG.match(line.lstrip())
        if not m:
            return None
        mo, d, h, mi, s, frac = m.groups()
        us = int((frac or "0")[:6].ljust(6, "0"))
        try:
            t = _dt.datetime(self.year, int(mo), int(d), int(h), int(mi), int(s), us)
        except ValueError:
            return None
        if self.last is not None and t < self.last - _dt.timedelta(days=180):
            self.year += 1
            t = t.replace(year=self.year)
        self.last = t
        return t


def _net_output(regex: re.Pattern[str], row: OrderedDict[str, float] | None, rows: list[OrderedDict[str, float]],
                line: str, iteration: float, seconds: float, lr: float) -> OrderedDict[str, float] | None:
    m = regex.search(line)
    if m:
        if row is None or row["NumIters"] != iteration:
            if row is not None:
                rows.append(row)
            row = OrderedDict([("NumIters", iteration), ("Seconds", seconds), ("LearningRate", lr)])
        row[m.group(2)] = float(m.group(3))
    if row is not None and rows and len(row) == len(rows[0]):
        rows.append(row)
        row = None
    return row


def parse_log_lines(lines: Iterable[str]) -> ParsedLog:
    """Parse glog lines of a Caffe (or caffeport) training log; see the module docstring."""
    clock = _Clock()
    it = iter(lines)
    buffered: list[str] = []
    start: _dt.datetime | None = None
    first: _dt.datetime | None = None
    for line in it:  # parse_log.py: the start time is the 'Solving' line's; lines before it are skipped
        t = clock.parse(line)
        if first is None and t is not None:
            first = t
        buffered.append(line)
        if "Solving" in line and t is not None:
            start = t
            buffered = []
            break
    if start is None:  # no 'Solving' line: use the first timestamp and keep every line
        start = first
        clock = _Clock()
        body: Iterable[str] = buffered
    else:
        body = it
    out = ParsedLog()
    iteration = -1.0
    lr = math.nan
    train_row: OrderedDict[str, float] | None = None
    test_row: OrderedDict[str, float] | None = None
    for line in body:
        m = _RE_ITERATION.search(line)
        if m:
            iteration = float(m.group(1))
        t = clock.parse(line)
        if iteration == -1:
            continue
        seconds = (t - start).total_seconds() if (t is not None and start is not None) else math.nan
        m = _RE_LR.search(line)
        if m:
            lr = float(m.group(1))
        train_row = _net_output(_RE_TRAIN_OUTPUT, train_row, out.train, line, iteration, seconds, lr)
        test_row = _net_output(_RE_TEST_OUTPUT, test_row, out.test, line, iteration, seconds, lr)
    for rows in (out.train, out.test):
        if len(rows) > 1:
            rows[0]["LearningRate"] = rows[1]["LearningRate"]
    return out


def parse_log(path: str | os.PathLike[str]) -> ParsedLog:
    """Parse a Caffe training log file (see the module docstring)."""
    p = Path(path)
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            return parse_log_lines(f)
    except OSError as e:
        raise CaffeportError(f"cannot read log '{p}': {e.strerror}") from None


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def _csv_bytes(rows: list[OrderedDict[str, float]], delimiter: str) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), delimiter=delimiter, lineterminator="\r\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def write_parse_log_csv(log: str | os.PathLike[str], out_dir: str | os.PathLike[str], delimiter: str = ",",
                        parsed: ParsedLog | None = None) -> list[Path]:
    """``parse_log.py LOG OUTDIR``: write ``OUTDIR/<log name>.train`` and ``.test`` (a table with no
    rows is not written, as parse_log.py). Returns the files written."""
    parsed = parsed or parse_log(log)
    out = Path(out_dir)
    written = []
    for suffix, rows in ((".train", parsed.train), (".test", parsed.test)):
        if not rows:
            continue
        target = out / (Path(log).name + suffix)
        atomic_write_bytes(target, _csv_bytes(rows, delimiter))
        written.append(target)
    return written


def _pick(columns: list[str], *names: str) -> str | None:
    for n in names:
        if n in columns:
            return n
    for n in names:  # e.g. 'loss' inside 'loss-cats-dogs'
        for c in columns:
            if n in c.lower():
                return c
    return None


def plot_log(log: str | os.PathLike[str], out_png: str | os.PathLike[str], title: str = "Training Curve",
             parsed: ParsedLog | None = None) -> Path:
    """The tutorial's ``plot_learning_curve.py``: training loss and test loss (left axis, 0..1 as the
    tutorial, widened when the losses are larger) and test accuracy (right axis, 0..1) against
    iterations, saved as a PNG with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    parsed = parsed or parse_log(log)
    if not parsed.train and not parsed.test:
        raise CaffeportError(f"'{log}' has no 'Train net output' / 'Test net output' lines to plot")
    fig = Figure(figsize=(8, 6), dpi=100)
    ax1 = fig.add_subplot(1, 1, 1)
    handles, labels = [], []
    ymax = 1.0
    train_loss = _pick(parsed.train_columns[3:], "loss")
    if train_loss:
        ys = parsed.column("train", train_loss)
        (h,) = ax1.plot(parsed.column("train", "NumIters"), ys, color="red", alpha=0.5)
        handles.append(h)
        labels.append("Training Loss")
        ymax = max(ymax, *[y for y in ys if math.isfinite(y)] or [1.0])
    test_loss = _pick(parsed.test_columns[3:], "loss")
    if test_loss:
        ys = parsed.column("test", test_loss)
        (h,) = ax1.plot(parsed.column("test", "NumIters"), ys, linewidth=2, color="green")
        handles.append(h)
        labels.append("Test Loss")
        ymax = max(ymax, *[y for y in ys if math.isfinite(y)] or [1.0])
    ax1.set_ylim(0, ymax if ymax <= 1.0 else ymax * 1.05)
    ax1.set_xlabel("Iterations", fontsize=15)
    ax1.set_ylabel("Loss", fontsize=15)
    ax1.tick_params(labelsize=12)
    acc = _pick(parsed.test_columns[3:], "accuracy")
    if acc:
        ax2 = ax1.twinx()
        (h,) = ax2.plot(parsed.column("test", "NumIters"), parsed.column("test", acc), linewidth=2, color="blue")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("Accuracy", fontsize=15)
        ax2.tick_params(labelsize=12)
        handles.append(h)
        labels.append("Test Accuracy")
    fig.legend(handles, labels, loc="center right", bbox_to_anchor=(0.88, 0.6))
    ax1.set_title(title, fontsize=18)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out_png, buf.getvalue())
    return Path(out_png)
