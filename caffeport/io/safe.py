"""Guards every reader uses on files from anywhere: regular files only, bounded sizes.

Caffe's readers open whatever path they are given (a FIFO blocks forever, ``/dev/zero`` reads until
the allocator gives up); caffeport refuses what is not a regular file with one CaffeportError, and
caps what a text file may hold before reading it. Limits are configurable by environment variables:
``CAFFEPORT_MAX_PROTOTXT_BYTES`` (default 64 MiB), ``CAFFEPORT_MAX_FILE_BYTES`` for binary files
(default 64 GiB) and ``CAFFEPORT_MAX_BLOB_ELEMENTS`` for one blob (default 2^31).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from caffeport.errors import CaffeportError

PathLike = str | os.PathLike


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def max_prototxt_bytes() -> int:
    """Largest text prototxt / solver / list file read (bytes)."""
    return _env_int("CAFFEPORT_MAX_PROTOTXT_BYTES", 64 << 20)


def max_file_bytes() -> int:
    """Largest binary file (caffemodel, binaryproto, solverstate) read (bytes)."""
    return _env_int("CAFFEPORT_MAX_FILE_BYTES", 64 << 30)


def max_blob_elements() -> int:
    """Largest element count of one blob declared by a file."""
    return _env_int("CAFFEPORT_MAX_BLOB_ELEMENTS", 1 << 31)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def regular_file(path: PathLike, what: str) -> int:
    """Size of ``path`` after checking it is an existing regular file (symlinks followed); a
    CaffeportError naming the file and what it was meant to be otherwise."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise CaffeportError(f"{what} file not found: {p}") from None
    except OSError as e:
        raise CaffeportError(f"{p}: cannot read {what} file: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CaffeportError(f"{p} is {_kind(st.st_mode)}, not a {what} file")
    return int(st.st_size)


def read_bounded(path: PathLike, what: str, limit: int | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (default: the binary-file limit)."""
    limit = max_file_bytes() if limit is None else limit
    size = regular_file(path, what)
    if size > limit:
        raise CaffeportError(f"{path}: {what} file is {size} bytes, more than the limit {limit} "
                             "(raise CAFFEPORT_MAX_PROTOTXT_BYTES / CAFFEPORT_MAX_FILE_BYTES if it is genuine)")
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)  # read(n) allocates n bytes up front: n is the stat size, not the limit
    except IsADirectoryError:
        raise CaffeportError(f"{path} is a directory, not a {what} file") from None
    if len(data) > size:
        raise CaffeportError(f"{path}: {what} file grew while being read")
    return data


def read_text_bounded(path: PathLike, what: str) -> bytes:
    """A text file (prototxt, solver, list file) of at most ``max_prototxt_bytes()``."""
    return read_bounded(path, what, max_prototxt_bytes())


def element_count(shape: Sequence[int], where: str) -> int:
    """Element count of a declared shape in exact integers; CaffeportError (``where`` names the file
    and field) for a negative dimension or more than ``max_blob_elements()``."""
    n = 1
    dims = tuple(int(d) for d in shape)
    for d in dims:
        if d < 0:
            raise CaffeportError(f"{where}: shape {dims} has a negative dimension")
        n *= d
    if n > max_blob_elements():
        raise CaffeportError(f"{where}: shape {dims} declares {n} elements, more than the limit "
                             f"{max_blob_elements()} (CAFFEPORT_MAX_BLOB_ELEMENTS)")
    return n
