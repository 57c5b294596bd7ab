"""Background prefetching of batches (Caffe's ``BasePrefetchingDataLayer``).

One producer thread calls ``produce()`` repeatedly and puts the batches in a bounded queue
(``data_param.prefetch``, 4 by default, as Caffe). A single producer keeps the order of records and of
random draws deterministic. The heavy work (LMDB reads, OpenCV decoding, numpy arithmetic) releases
the GIL, so the thread overlaps with the model's forward pass. An exception raised in the producer is
re-raised by the next :meth:`Prefetcher.get`.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["Prefetcher"]

_STOP = object()


class Prefetcher:
    """Run ``produce`` in a daemon thread, ``depth`` batches ahead; ``depth=0`` = synchronous."""

    def __init__(self, produce: Callable[[], Any], depth: int = 4, name: str = "caffeport-prefetch"):
        self.produce = produce
        self.depth = max(0, int(depth))
        self.name = name
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @staticmethod
    def _run(ref: weakref.ref[Prefetcher], q: queue.Queue[Any], stop: threading.Event) -> None:
        # Holds the Prefetcher only weakly between batches, so that dropping the layer (and with it
        # the Prefetcher) ends the thread and releases the reader.
        while not stop.is_set():
            p = ref()
            if p is None:
                return
            produce = p.produce
            del p
            try:
                item: Any = ("ok", produce())
            except BaseException as e:  # forwarded to the consumer
                item = ("err", e)
            del produce
            while not stop.is_set():
                if ref() is None:
                    return
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] == "err":
                return

    def start(self) -> None:
        if self.depth == 0 or self._thread is not None:
            return
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop.clear()
        self._thread = threading.Thread(
            target=Prefetcher._run, args=(weakref.ref(self), self._queue, self._stop), name=self.name, daemon=True
        )
        self._thread.start()

    def get(self) -> Any:
        """The next batch (waits for the producer if it is behind)."""
        if self.depth == 0:
            return self.produce()
        if self._thread is None:
            self.start()
        assert self._queue is not None
        kind, value = self._queue.get()
        if kind == "err":
            self._thread = None  # a later get() retries from a fresh thread
            raise value
        return value

    def close(self) -> None:
        """Stop the producer thread (batches already queued are dropped)."""
        t = self._thread
        if t is None:
            return
        self._stop.set()
        if self._queue is not None:
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
        t.join(timeout=5)
        self._thread = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
