"""Hand freed heap memory back to the OS in the scheduler process (glibc's `malloc_trim`).

Why: the replay buffer keeps records of varying sizes (a few KB to a few MB each) under its byte budget and frees
them oldest first, from its own thread. glibc serves such blocks from that thread's arena once its dynamic mmap
threshold has risen past them, and a freed block in the middle of an arena stays resident: the arena's RSS creeps
up in steps although what is live stays under the budget (the soak, `benchmarks/soak_online_train.py`: +54 MB/h
of the server's RSS, all in thread arenas). `malloc_trim(0)` walks every arena and returns the whole free pages in
it to the OS (madvise), so what stays resident is what is live plus the pages a live block shares with free
space. With it, a 2-hour soak's RSS was flat from 40 minutes on (-0.3 MB/h over its second half). It takes the
arenas' locks as any malloc does, so it is safe from any thread; a call took 12-14 ms in the soaks (a scheduler
allocation may wait that long), done once a minute (--online-train-malloc-trim-seconds) from the replay buffer's
thread.

Elsewhere (musl, macOS, a static build) there is no `malloc_trim`: `Trimmer.available` is False and nothing is
done.
"""
from __future__ import annotations

import ctypes
import logging
import os
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)


def _malloc_trim():
    """The malloc_trim of the C library this process already uses (dlopen(NULL): no search, no subprocess), or
    None where there is none."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def rss_bytes() -> int | None:
    """This process's resident set (Linux), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class TrimResult:
    seconds: float            # how long the call took
    rss_before: int | None    # bytes, when /proc tells
    rss_after: int | None

    @property
    def released_bytes(self) -> int:
        """RSS given back (0 when /proc does not tell; other threads allocate meanwhile, so approximate)."""
        if self.rss_before is None or self.rss_after is None:
            return 0
        return max(0, self.rss_before - self.rss_after)


class Trimmer:
    """`maybe_trim(now)` trims when `interval_s` passed since the last trim (never more often)."""

    def __init__(self, interval_s: float):
        """interval_s: --online-train-malloc-trim-seconds (0: never)."""
        self.interval_s = interval_s
        self._fn = _malloc_trim() if interval_s > 0 else None
        self.last = time.monotonic()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._fn is not None

    def maybe_trim(self, now: float) -> TrimResult | None:
        if self._fn is None or now - self.last < self.interval_s:
            return None
        self.last = now
        return self.trim()

    def trim(self) -> TrimResult | None:
        """Trim now (None where malloc_trim is not available)."""
        if self._fn is None:
            return None
        before = rss_bytes()
        start = time.perf_counter()
        self._fn(0)
        seconds = time.perf_counter() - start
        result = TrimResult(seconds, before, rss_bytes())
        self.trims += 1
        logger.debug("sglang_ext: malloc_trim gave back %.1f MB in %.1f ms", result.released_bytes / 2**20,
                     seconds * 1e3)
        return result


__all__ = ["Trimmer", "TrimResult", "rss_bytes"]
