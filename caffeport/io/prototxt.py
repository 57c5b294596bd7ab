"""Text-format (and auto-detected binary) nets and solvers, read and written like Caffe does.

Caffe reads a prototxt with ``TextFormat::Parse`` and then runs ``UpgradeNetAsNeeded`` /
``UpgradeSolverAsNeeded``; :func:`read_net` and :func:`read_solver` do the same and always return
the *upgraded* message. Where caffeport is more forgiving than Caffe it says so:

* **Fork spellings.** The DenseNet/OpenCV ``pooling_param { ceil_mode: true|false }`` reuses field
  number 13, which BVLC calls ``round_mode`` (an enum whose CEIL=0, FLOOR=1 is the *opposite*
  numeric sense of the bool). The text reader rewrites ``ceil_mode: true`` to ``round_mode: CEIL``
  and ``ceil_mode: false`` to ``round_mode: FLOOR`` before parsing. Binary files cannot be told
  apart: field 13 is always read as BVLC ``round_mode`` there.
* **Unknown fork blocks.** A ``xxx_param { ... }`` block inside a layer whose name the union schema
  does not know is dropped with a :class:`CaffeportWarning` naming the layer and the field; the
  layer itself is kept, so the net builder can report its type by name if it cannot run it.
* Every other unknown field or enum value is an error naming the nearest valid names.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message

from caffeport.errors import CaffeportError, CaffeportWarning, nearest
from caffeport.io.atomic import atomic_write
from caffeport.io.safe import max_file_bytes, max_prototxt_bytes, read_bounded, regular_file
from caffeport.proto import caffe_pb2

__all__ = [
    "CaffeportWarning",
    "read_net",
    "read_solver",
    "write_net",
    "write_solver",
    "parse_net_text",
    "parse_solver_text",
    "parse_text",
    "is_binary",
    "read_text_or_binary",
    "TEXT_SUFFIXES",
]

PathLike = str | os.PathLike

#: Output suffixes written as text format by the writers (anything else is binary).
TEXT_SUFFIXES = (".prototxt", ".pt", ".txt", ".pbtxt")

_POOL = caffe_pb2.DESCRIPTOR.pool


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def is_binary(data: bytes) -> bool:
    """True when ``data`` cannot be a text-format proto (binary wire format or not UTF-8)."""
    if not data:
        return False
    head = data[: 1 << 16]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # a multi-byte character cut at the 64 KiB boundary is still text
        if e.start < len(head) - 4:
            return True
    for b in head:
        if b < 32 and b not in (9, 10, 11, 12, 13):
            return True
    return False


def _line_starts(text: str) -> list[int]:
    starts = [0]
    for m in re.finditer("\n", text):
        starts.append(m.end())
    return starts


def _tokens(text: str):
    """Yield (kind, value, offset) for the text-format tokens: 'id', 'str', 'punct', 'num'."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n\f\v,;":
            i += 1
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            yield "str", text[i : j + 1], i
            i = j + 1
        elif c in "{}<>:[]":
            yield "punct", c, i
            i += 1
        else:
            m = re.compile(r"[A-Za-z0-9_.+\-]+").match(text, i)
            if not m:
                yield "punct", c, i
                i += 1
                continue
            v = m.group(0)
            yield ("id" if (v[0].isalpha() or v[0] == "_") else "num"), v, i
            i = m.end()


# DenseNet / OpenCV fork spelling -> BVLC spelling (same field number 13, different type).
_CEIL_MODE = re.compile(r"\bceil_mode(\s*:\s*)(true|false|True|False|t|f|1|0)\b")


def _rewrite_fork_spellings(text: str) -> str:
    if "ceil_mode" not in text:
        return text
    out = []
    for line in text.splitlines(keepends=True):
        code, hash_, comment = line.partition("#")
        code = _CEIL_MODE.sub(
            lambda m: "round_mode" + m.group(1) + ("CEIL" if m.group(2) in ("true", "True", "t", "1") else "FLOOR"),
            code,
        )
        out.append(code + hash_ + comment)
    return "".join(out)


def _enclosing_layer(text: str, offset: int) -> str | None:
    """Name of the top-level ``layer``/``layers`` block containing ``offset`` ('' when it has no
    name, None when ``offset`` is not inside a layer)."""
    depth = 0
    stack: list[str] = []
    last_id = ""
    layer_start = -1
    for kind, val, pos in _tokens(text):
        if pos >= offset:
            break
        if kind == "id":
            last_id = val
        elif val in "{<":
            stack.append(last_id)
            depth += 1
            if depth == 1:
                layer_start = pos if last_id in ("layer", "layers") else -1
        elif val in "}>":
            depth -= 1
            if stack:
                stack.pop()
    if depth < 1 or layer_start < 0:
        return None
    # find the layer's name: first `name: "..."` at depth 1 (V0: depth 2 inside `layer {}`)
    d = 0
    prev: list[tuple[str, str]] = []
    for kind, val, _pos in _tokens(text[layer_start:]):
        if val in "{<":
            d += 1
        elif val in "}>":
            d -= 1
            if d == 0:
                break
        elif kind == "str" and d in (1, 2) and len(prev) >= 2 and prev[-1][1] == ":" and prev[-2][1] == "name":
            return val[1:-1]
        prev.append((kind, val))
    return ""


def _block_span(text: str, start: int) -> int | None:
    """Given the offset of a field name followed by ``[:] {``, return the offset after its ``}``."""
    toks = _tokens(text[start:])
    next(toks, None)  # the field name
    depth = 0
    for _kind, val, pos in toks:
        if depth == 0 and val == ":":
            continue
        if val in "{<":
            depth += 1
        elif val in "}>":
            depth -= 1
            if depth == 0:
                return start + pos + 1
        elif depth == 0:
            return None  # a scalar value, not a block
    return None


_NO_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "(\w+)"')
_NO_ENUM = re.compile(r'Enum type "([\w.]+)" has no value named (\w+)')
_NO_ENUM_NUM = re.compile(r'Enum type "([\w.]+)" has no value with number (-?\d+) for field (\w+)')


def _explain(msg: str) -> str:
    """Append nearest valid names to protobuf's 'no field' / 'no enum value' messages."""
    m = _NO_FIELD.search(msg)
    if m:
        try:
            desc = _POOL.FindMessageTypeByName(m.group(1))
            return msg + nearest(m.group(2), desc.fields_by_name)
        except KeyError:
            return msg
    m = _NO_ENUM.search(msg)
    if m:
        try:
            desc = _POOL.FindEnumTypeByName(m.group(1))
            names = list(desc.values_by_name)
            hint = nearest(m.group(2), names) or f" (valid: {', '.join(names)})"
            return msg + hint
        except KeyError:
            return msg
    m = _NO_ENUM_NUM.search(msg)
    if m:
        try:
            desc = _POOL.FindEnumTypeByName(m.group(1))
            return msg + f" (valid: {', '.join(desc.values_by_name)})"
        except KeyError:
            return msg
    return msg


def parse_text(text: str, msg: Message, source: str, tolerant: bool = True) -> Message:
    """Parse text-format ``text`` into ``msg`` (cleared first), Caffe-style.

    ``source`` names the file in errors (``file:line:column: protobuf's message``). With
    ``tolerant``, unknown ``*_param { }`` blocks inside layers are dropped with a warning.
    """
    text = _rewrite_fork_spellings(text)
    dropped: list[str] = []
    for _ in range(10000):
        msg.Clear()
        try:
            text_format.Parse(text, msg)
            break
        except text_format.ParseError as e:
            line, col = e.GetLine(), e.GetColumn()
            raw = str(e)
            m = _NO_FIELD.search(raw)
            if tolerant and m and m.group(2).endswith("_param") and line and col:
                starts = _line_starts(text)
                off = starts[line - 1] + col - 1 if line - 1 < len(starts) else -1
                if off >= 0 and text.startswith(m.group(2), off):
                    end = _block_span(text, off)
                    layer = _enclosing_layer(text, off)
                    if end is not None and layer is not None:
                        warnings.warn(
                            f"{source}:{line}:{col}: layer '{layer}': dropped unknown block "
                            f"'{m.group(2)}' (not in caffeport's union caffe.proto); the layer is kept",
                            CaffeportWarning,
                            stacklevel=3,
                        )
                        dropped.append(m.group(2))
                        # keep line numbers stable: replace the block with the same newlines
                        blank = "".join(ch if ch == "\n" else " " for ch in text[off:end])
                        text = text[:off] + blank + text[end:]
                        continue
            detail = re.sub(r"^\d+:\d+ : ", "", raw)
            where = f"{source}:{line}:{col}" if line else source
            raise CaffeportError(f"{where}: {_explain(detail)}") from None
    return msg


def parse_net_text(text: str, source: str = "<text>") -> caffe_pb2.NetParameter:
    """Parse a text NetParameter and upgrade it (V0/V1 layers, input fields, BatchNorm specs)."""
    from caffeport.io.upgrade import upgrade_net

    msg = parse_text(text, caffe_pb2.NetParameter(), source)
    return upgrade_net(msg, source)


def parse_solver_text(text: str, source: str = "<text>") -> caffe_pb2.SolverParameter:
    """Parse a text SolverParameter and upgrade ``solver_type`` (no path handling)."""
    from caffeport.io.upgrade import upgrade_solver

    msg = parse_text(text, caffe_pb2.SolverParameter(), source)
    return upgrade_solver(msg, source)


def read_text_or_binary(path: PathLike, msg: Message) -> Message:
    """Fill ``msg`` from ``path``: text format or binary wire format, detected from the content."""
    p = Path(path)
    what = msg.DESCRIPTOR.name
    size = regular_file(p, what)  # FIFOs, devices and directories refused before any read
    limit = max_prototxt_bytes()
    if size > limit:  # big binary nets (caffemodels) are fine; text over the limit is not
        with open(p, "rb") as f:
            head = f.read(4096)
        if not is_binary(head):
            raise CaffeportError(f"{p}: text {what} of {size} bytes, more than the limit {limit} "
                                 "(CAFFEPORT_MAX_PROTOTXT_BYTES)")
        limit = max_file_bytes()
    data = read_bounded(p, what, limit)
    if is_binary(data):
        try:
            msg.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as e:
            raise CaffeportError(
                f"{p}: not a valid binary {msg.DESCRIPTOR.name} (truncated or corrupt file?): {e}"
            ) from None
        return msg
    return parse_text(data.decode("utf-8", errors="replace"), msg, str(p))


# --------------------------------------------------------------------------------------------------
# nets
# --------------------------------------------------------------------------------------------------
def read_net(path: PathLike) -> caffe_pb2.NetParameter:
    """Read a net (text prototxt or binary caffemodel, detected from the content), upgraded.

    Like Caffe's ``ReadNetParamsFrom{Text,Binary}FileOrDie`` + ``UpgradeNetAsNeeded``. Binary files
    are parsed whole by protobuf (blobs included); use :func:`caffeport.io.load_caffemodel` for
    fast weight loading.
    """
    from caffeport.io.upgrade import upgrade_net

    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(8)
        if magic == b"\x89HDF\r\n\x1a\n":
            from caffeport.io.hdf5 import read_caffemodel_h5_net

            return read_caffemodel_h5_net(p)
    msg = read_text_or_binary(p, caffe_pb2.NetParameter())
    return upgrade_net(msg, str(p))


def _atomic_write(path: PathLike, data: bytes) -> None:
    atomic_write(path, data)


def write_net(msg: caffe_pb2.NetParameter, path: PathLike) -> None:
    """Write a NetParameter: text if ``path`` ends in .prototxt/.pt/.txt/.pbtxt, binary otherwise."""
    if str(path).lower().endswith(TEXT_SUFFIXES):
        _atomic_write(path, text_format.MessageToString(msg).encode("utf-8"))
    else:
        _atomic_write(path, msg.SerializeToString())


# --------------------------------------------------------------------------------------------------
# solvers
# --------------------------------------------------------------------------------------------------
def _check_path(solver: Path, field: str, value: str, override_hint: str) -> None:
    if not Path(value).exists():
        raise CaffeportError(
            f"{solver}: {field}: \"{value}\" does not exist (relative paths are resolved against the "
            f"solver's folder {solver.resolve().parent}); fix the solver or override it ({override_hint})"
        )


def read_solver(
    path: PathLike,
    net: PathLike | None = None,
    weights: PathLike | list[PathLike] | None = None,
    resolve_paths: bool = True,
) -> caffe_pb2.SolverParameter:
    """Read a text (or binary) solver, upgraded (``solver_type`` enum -> ``type`` string).

    Caffe defaults come from the schema. Differences from Caffe, which resolves paths against the
    *working directory*: ``net``, ``train_net``, ``test_net`` and ``weights`` that are relative are
    resolved against the solver file's folder, and a missing file is a :class:`CaffeportError`
    naming the solver, the field and the path. ``net=`` (and ``weights=``) override the file's
    values (relative overrides are taken relative to the working directory), for tutorials whose
    solvers hard-code ``/home/ubuntu/...``. Like Caffe's
    ``UpgradeSnapshotPrefixProperty``, a missing ``snapshot_prefix`` becomes the solver path without
    its extension, and a prefix naming an existing folder becomes ``folder/<solver stem>``; an
    explicit relative prefix is left relative (to the working directory, as in Caffe).
    """
    p = Path(path)
    msg = read_text_or_binary(p, caffe_pb2.SolverParameter())
    from caffeport.io.upgrade import upgrade_solver

    upgrade_solver(msg, str(p))
    if net is not None:
        net_s = os.path.abspath(os.fspath(net))  # an override is relative to the working directory
        if msg.HasField("train_net"):
            msg.train_net = net_s
        else:
            msg.net = net_s
        msg.ClearField("net_param")
        msg.ClearField("train_net_param")
    if weights is not None:
        del msg.weights[:]
        ws = weights if isinstance(weights, list) else [weights]
        msg.weights.extend([os.path.abspath(os.fspath(w)) for w in ws])
    if not resolve_paths:
        return msg
    base = p.resolve().parent

    def res(v: str) -> str:
        return v if not v or os.path.isabs(v) else str(base / v)

    hint_net = "read_solver(..., net=PATH) or `--net PATH` on the command line"
    for field in ("net", "train_net"):
        if msg.HasField(field):
            setattr(msg, field, res(getattr(msg, field)))
            _check_path(p, field, getattr(msg, field), hint_net)
    for i, v in enumerate(list(msg.test_net)):
        msg.test_net[i] = res(v)
        _check_path(p, f"test_net[{i}]", msg.test_net[i], hint_net)
    new_w = []
    for v in msg.weights:
        # Caffe accepts a comma-separated list in one entry as well
        parts = [res(x.strip()) for x in v.split(",") if x.strip()]
        for x in parts:
            _check_path(p, "weights", x, "read_solver(..., weights=PATH) or `--weights PATH`")
        new_w.append(",".join(parts))
    del msg.weights[:]
    msg.weights.extend(new_w)
    if not msg.HasField("snapshot_prefix"):
        msg.snapshot_prefix = str(p.with_suffix(""))
    elif os.path.isdir(msg.snapshot_prefix):
        msg.snapshot_prefix = str(Path(msg.snapshot_prefix) / p.stem)
    return msg


def write_solver(msg: caffe_pb2.SolverParameter, path: PathLike) -> None:
    """Write a SolverParameter: text if ``path`` ends in .prototxt/.pt/.txt/.pbtxt, binary otherwise."""
    if str(path).lower().endswith(TEXT_SUFFIXES):
        _atomic_write(path, text_format.MessageToString(msg).encode("utf-8"))
    else:
        _atomic_write(path, msg.SerializeToString())


_NET_FIELDS = set(caffe_pb2.NetParameter.DESCRIPTOR.fields_by_name)
_SOLVER_FIELDS = set(caffe_pb2.SolverParameter.DESCRIPTOR.fields_by_name)


def sniff_text_kind(text: str) -> str:
    """'net', 'solver' or 'labelmap' from the top-level field names of a text proto."""
    depth = 0
    names: set[str] = set()
    prev_id = None
    for kind, val, _ in _tokens(text):
        if val in "{<":
            depth += 1
        elif val in "}>":
            depth -= 1
        elif kind == "id" and depth == 0 and prev_id is None:
            names.add(val)
        prev_id = val if (kind == "id" and depth == 0 and prev_id is None) else None
        if val == ":" or val in "{<":
            prev_id = None
    if names & (_SOLVER_FIELDS - _NET_FIELDS):
        return "solver"
    if "item" in names and not names & _NET_FIELDS:
        return "labelmap"
    return "net"
