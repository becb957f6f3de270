"""Replay buffer of the online path: finished requests -> ReplayRecords, kept under a byte budget (oldest
dropped, counted) and, with a persist directory, written as `trainer.replay` shards that
`python -m trainer.finetune` reads unchanged. Runs in its own thread, off the scheduler's hot path."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from sglang_ext.online.queues import ByteQueue

logger = logging.getLogger(__name__)
STORAGE = {"bf16": "bfloat16", "fp8": "float8_e4m3fn"}


@dataclass
class BufferStats:
    records: int = 0          # records currently in memory
    bytes: int = 0            # their feature bytes
    added: int = 0            # records ever added
    dropped: int = 0          # records dropped for the budget
    persisted: int = 0        # records written to shards
    persist_errors: int = 0


class ReplayBuffer:
    def __init__(self, cfg, spec, metrics, flush_interval_s: float = 1.0):
        self.cfg = cfg
        self.spec = spec                      # trainer.replay.ReplaySpec
        self.metrics = metrics
        self.flush_interval_s = flush_interval_s
        self.records: deque = deque()
        self.stats = BufferStats()
        self.lock = threading.Lock()
        # finished requests from the scheduler thread (CapturedRequest), bounded in bytes
        self.inbox: ByteQueue = ByteQueue(cfg.queue_bytes, size=lambda finished: finished.nbytes())
        self.writer = None
        self.on_record = None                 # e.g. TrainerSupervisor.offer: called with each new record
        self.prefix_store = None              # radix-cache hits are filled from the rows of earlier records
        if cfg.prefix_store_bytes > 0:
            from sglang_ext.online.prefix_store import PrefixFeatureStore
            self.prefix_store = PrefixFeatureStore(cfg.prefix_store_bytes)
        if cfg.persist_dir:
            from trainer.replay import ShardWriter
            self.writer = ShardWriter(cfg.persist_dir, spec, max_shard_tokens=cfg.shard_tokens)
        self.thread = threading.Thread(target=self._run, name="sglang-ext-replay", daemon=True)
        self.thread.start()

    def submit(self, finished) -> None:
        """Called from the scheduler thread; never blocks (past the inbox's bound the oldest are dropped)."""
        self.inbox.put(finished)
        if self.inbox.dropped:
            self.metrics.queue("replay_inbox", self.inbox.nbytes, self.inbox.take_dropped())

    def snapshot(self) -> list:
        with self.lock:
            return list(self.records)

    def _run(self) -> None:
        from sglang_ext.online.capture import assemble_record
        last_flush = time.monotonic()
        pending_persist = 0
        while True:
            finished = self.inbox.get(timeout=self.flush_interval_s)
            self.metrics.queue("replay_inbox", self.inbox.nbytes, self.inbox.take_dropped())
            if finished is not None:
                try:
                    record = assemble_record(finished, self.cfg.include_prompt_loss, self.prefix_store)
                except Exception:                      # never let one bad request kill the buffer
                    logger.exception("sglang_ext: could not assemble the record of request %s", finished.rid)
                    record = None
                if record is not None:
                    self._add(record)
                    self.metrics.prefix_rows(record.meta["prefix_filled_rows"],
                                             sum(b - a for a, b in record.meta["feature_gaps"]),
                                             self.prefix_store.nbytes if self.prefix_store is not None else 0)
                    if self.on_record is not None:
                        try:
                            self.on_record(record)
                        except Exception:
                            logger.exception("sglang_ext: could not hand request %s to the trainer", finished.rid)
                    if self.writer is not None:
                        try:
                            self.writer.add(record)
                            pending_persist += 1
                        except Exception:
                            self.stats.persist_errors += 1
                            logger.exception("sglang_ext: could not persist request %s", finished.rid)
            if self.writer is not None and pending_persist and (
                    finished is None or time.monotonic() - last_flush > self.flush_interval_s):
                try:
                    self.writer.flush()
                    self.stats.persisted += pending_persist
                    self.metrics.persisted(pending_persist)
                except Exception:
                    self.stats.persist_errors += 1
                    logger.exception("sglang_ext: could not write a replay shard to %s", self.cfg.persist_dir)
                pending_persist = 0
                last_flush = time.monotonic()

    def _add(self, record) -> None:
        nbytes = record.features.numel() * record.features.element_size()
        with self.lock:
            self.records.append((record, nbytes))
            self.stats.records += 1
            self.stats.bytes += nbytes
            self.stats.added += 1
            while self.stats.bytes > self.cfg.replay_budget_bytes and len(self.records) > 1:
                _, old = self.records.popleft()
                self.stats.records -= 1
                self.stats.bytes -= old
                self.stats.dropped += 1
                self.metrics.replay_dropped()
            self.metrics.replay_fill(self.stats.bytes, self.stats.records, self.cfg.replay_budget_bytes)
        self.metrics.recorded(len(record))
