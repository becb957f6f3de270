"""sglang_ext.online.recorder.memory: the replay buffer's thread hands freed heap pages back to the OS
(glibc malloc_trim).

The soak (benchmarks/soak_online_train.py) found the scheduler's RSS creeping in steps in a malloc thread arena:
records of varying sizes, freed oldest first from the buffer's thread, leave free pages resident inside it.
"""
from __future__ import annotations

import platform
import threading
import time

import torch

from sglang_ext.online.recorder.buffer import ReplayBuffer
from sglang_ext.online.config import OnlineTrainConfig
from sglang_ext.online.recorder.memory import Trimmer, rss_bytes
from trainer.replay import ReplayRecord, ReplaySpec
from trainer.target import TargetIdentity

MB = 2 ** 20
SPEC = ReplaySpec(TargetIdentity("tiny", "0" * 16), (1, 2), 8, "bfloat16")    # 2 layers x hidden 8


class TrimMetrics:
    """The buffer's metrics: malloc_trimmed calls kept, the rest ignored."""

    def __init__(self):
        self.trims: list[tuple[float, int]] = []

    def malloc_trimmed(self, seconds, released_bytes):
        self.trims.append((seconds, released_bytes))

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def a_record(length: int = 12) -> ReplayRecord:
    return ReplayRecord(input_ids=torch.arange(length), features=torch.randn(length, 16).bfloat16(),
                        positions=torch.arange(length).expand(3, length).clone(),
                        loss_mask=torch.ones(length, dtype=torch.bool), meta={"rid": "r"})


def glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_trim_gives_back_the_free_pages_a_fifo_of_records_leaves_in_a_thread_arena():
    """What the buffer does: a thread keeps records of varying sizes and frees them oldest first. Their free
    pages stay resident (glibc keeps them in the thread's arena) until malloc_trim gives them back."""
    assert glibc(), "this machine (and CI) run glibc Linux: malloc_trim must be found"
    trimmer = Trimmer(interval_s=3600.0)
    assert trimmer.available
    kept: list[torch.Tensor] = []
    after_free: list[int] = []

    def churn():
        # a block past the initial mmap threshold, freed: glibc raises the threshold past it, so the records
        # below come from this thread's arena (as they do in a server that has run a while)
        big = torch.ones(8 * MB, dtype=torch.uint8)
        del big
        g = torch.Generator().manual_seed(0)
        records = [torch.ones(int(torch.randint(150_000, 600_000, (1,), generator=g)), dtype=torch.uint8)
                   for _ in range(400)]                   # ~150 MB, every page touched
        kept.extend(records[i] for i in range(0, len(records), 16))   # a few stay live, spread over the arena
        records.clear()                                   # the rest are freed: holes between the live ones
        after_free.append(rss_bytes())

    thread = threading.Thread(target=churn)
    thread.start()
    thread.join()
    result = trimmer.trim()
    assert result is not None and result.seconds >= 0 and result.rss_after is not None
    freed = after_free[0] - result.rss_after
    # ~140 MB was freed between ~9 MB of live records: most of it must leave the RSS
    assert freed > 60 * MB, f"malloc_trim gave back only {freed / MB:.1f} MB"
    assert all(int(t[0]) == 1 and int(t[-1]) == 1 for t in kept)      # live records untouched


def test_trimmer_waits_its_interval_and_zero_turns_it_off():
    trimmer = Trimmer(interval_s=10.0)
    start = trimmer.last
    assert trimmer.maybe_trim(start + 5.0) is None
    assert trimmer.maybe_trim(start + 10.0) is not None
    assert trimmer.maybe_trim(start + 15.0) is None and trimmer.trims == 1
    off = Trimmer(interval_s=0)
    assert not off.available and off.maybe_trim(time.monotonic() + 1e6) is None and off.trim() is None


def test_the_buffer_thread_trims_and_reports_it_on_metrics():
    metrics = TrimMetrics()
    buf = ReplayBuffer(OnlineTrainConfig(enabled=True, malloc_trim_seconds=0.05), SPEC, metrics,
                       flush_interval_s=0.02, vocab_size=100)
    try:
        for _ in range(20):
            buf.accept(a_record())
        deadline = time.monotonic() + 10
        while len(metrics.trims) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        buf.stop()
    calls = list(metrics.trims)
    assert len(calls) >= 2
    assert all(seconds >= 0 and released >= 0 for seconds, released in calls)
    assert buf.stats.records == 20                    # the records are untouched


def test_a_buffer_with_trimming_off_never_trims():
    metrics = TrimMetrics()
    buf = ReplayBuffer(OnlineTrainConfig(enabled=True, malloc_trim_seconds=0), SPEC, metrics,
                       flush_interval_s=0.02, vocab_size=100)
    try:
        buf.accept(a_record())
        time.sleep(0.3)
    finally:
        buf.stop()
    assert metrics.trims == [] and buf.stats.records == 1
