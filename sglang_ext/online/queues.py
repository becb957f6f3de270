"""The one kind of queue between the stages of the online path: a FIFO bounded in bytes.

    scheduler --CapturedRequest--> replay buffer thread --ReplayRecord--> supervisor thread --socket-->
    trainer's records thread --ReplayRecord--> training loop

Each hand-off is a `ByteQueue` (the `--online-train-queue-bytes` bound each): `put` never blocks, and past
the bound the oldest items are dropped and counted, so a slow or stuck consumer never grows a producer's
memory (the scheduler's least of all). The newest item is always kept, even when it alone is over the bound.
Thread-safe; plain standard library.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class ByteQueue(Generic[T]):
    def __init__(self, max_bytes: int, size: Callable[[T], int] = len):
        self.max_bytes = int(max_bytes)
        self.size = size                            # item -> its bytes (fixed while it is queued)
        self._items: deque[tuple[T, int]] = deque()
        self._cond = threading.Condition()
        self.nbytes = 0
        self.dropped = 0                            # since the last take_dropped()
        self.dropped_total = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T, front: bool = False) -> None:
        """Enqueue (never blocks); `front`: put back an item taken too early (it is the oldest again)."""
        n = int(self.size(item))
        with self._cond:
            if front:
                self._items.appendleft((item, n))
            else:
                self._items.append((item, n))
            self.nbytes += n
            while self.nbytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popleft()
                self.nbytes -= old
                self.dropped += 1
                self.dropped_total += 1
            self._cond.notify()

    def get(self, timeout: float | None = 0.0) -> T | None:
        """The oldest item; waits up to `timeout` seconds for one (0: never waits); None when there is none."""
        with self._cond:
            if not self._items and timeout != 0.0:
                self._cond.wait(timeout)
            if not self._items:
                return None
            item, n = self._items.popleft()
            self.nbytes -= n
            return item

    def clear(self) -> None:
        with self._cond:
            self._items.clear()
            self.nbytes = 0

    def take_dropped(self) -> int:
        """Items dropped since the last call (for a counter metric)."""
        with self._cond:
            n, self.dropped = self.dropped, 0
            return n
