# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Read-ahead: load the next work items on a thread while the current one infers."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Sequence

__all__ = ["Prefetcher"]


class Prefetcher(threading.Thread):
    """Calls ``load`` on each item in order on a background thread; iterate to get the results.

    At most ``slots`` results are alive at once (the one in use plus ``slots - 1`` read ahead): the consumer
    calls :meth:`release` when it is done with one. ``slots=1`` reads only after the previous item is released.

    Args:
        items: what to load, in order.
        load: ``item -> result`` (should not raise: return the error inside the result).
        slots: results alive at once.
    """

    def __init__(self, items: Sequence[Any], load: Callable[[Any], Any], slots: int = 2) -> None:
        super().__init__(daemon=True, name="ulite-dicom-prefetch")
        self.items, self.load = list(items), load
        self._slots = threading.Semaphore(max(1, slots))
        self._queue: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()

    def run(self) -> None:
        for item in self.items:
            self._slots.acquire()
            if self._cancelled.is_set():
                break
            self._queue.put(self.load(item))
        self._queue.put(None)

    def __iter__(self) -> Iterator[Any]:
        while True:
            loaded = self._queue.get()
            if loaded is None:
                return
            yield loaded

    def release(self) -> None:
        """Free the slot of a result the consumer is done with."""
        self._slots.release()

    def cancel(self) -> None:
        """Stop loading further items (the thread ends after the load in progress)."""
        self._cancelled.set()
        self._slots.release()
