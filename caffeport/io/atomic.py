"""Atomic file writes: every file caffeport writes goes to a temp name beside its target and is
renamed over it only when complete, so a crash, Ctrl-C or a full disk never leaves a half-written
file. OS errors become a :class:`CaffeportError` that names the target."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from caffeport.errors import CaffeportError

PathLike = str | os.PathLike


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temp file name beside ``path`` to write; on success it replaces ``path`` (with the
    permissions a plain ``open`` would give), on any failure it is removed."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent if str(path.parent) else ".")
    except OSError as e:
        raise CaffeportError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise CaffeportError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def atomic_write(path: PathLike, data: bytes | bytearray | memoryview | Sequence[bytes]) -> None:
    """Write ``data`` (or a sequence of chunks) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if isinstance(data, bytes | bytearray | memoryview):
            f.write(data)
        else:
            for chunk in data:
                f.write(chunk)
