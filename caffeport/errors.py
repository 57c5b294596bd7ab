"""The one error type users see.

Every failure caused by user input (a malformed prototxt, a weight blob of the wrong shape, a
missing LMDB...) is raised as :class:`CaffeportError` with a message that names the file, the
field or line, and the layer. The CLI prints ``str(err)`` on one line and exits non-zero.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CaffeportError(Exception):
    """A user-facing error: the message alone must say what is wrong and where."""


class CaffeportWarning(UserWarning):
    """Something caffeport tolerated that BVLC Caffe would have rejected or treated differently."""


def nearest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """`` (did you mean 'A', 'B'?)`` for the closest valid names, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + ", ".join(repr(c) for c in close) + "?)"
