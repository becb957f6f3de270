"""Replay buffer of the online path: finished requests -> ReplayRecords, kept under a byte budget (oldest
dropped, counted) and, with a persist directory, written as `trainer.replay` shards that
`python -m trainer.finetune` reads unchanged. Runs in its own thread of the recorder process
(sglang_ext/online/recorder/process.py), out of SGLang's scheduler process.

Every record is checked before it is kept, persisted or sent to the trainer (`protocol.check_record`: token ids
inside the target's vocabulary, finite features, consistent shapes); a poison record is dropped and counted
(sglang:online_train_poison_records_total{reason}). Kept records are numbered (`meta["seq"]`), which is how the
trainer names a record whose step failed, so that it is never re-sent.

Persistence (`--online-train-persist-dir`): records wait in memory until a shard is due, which is when they
reach `shard_tokens` tokens or `shard_max_bytes` feature bytes (half the replay budget, at most 64 MiB, and at
most a quarter of --online-train-persist-max-bytes), or the oldest waited `shard_seconds`
(--online-train-shard-seconds), whichever comes first, or when the buffer stops. The byte cap bounds what a
shard write holds in memory at once (the records' features concatenated, their storage-dtype copy, the file's
bytes), and keeps shards small enough for retention to keep several. A shard write that fails is
retried (backoff 1 s doubling to 60 s) with the records kept; what waits is bounded by the replay budget (the
records waiting are mostly the ones the in-memory buffer holds anyway), past which
the oldest waiting records are given up and counted as lost (sglang:online_train_persist_lost_records_total).
After each shard, with --online-train-persist-max-bytes, the oldest shards of the directory are deleted until
it fits, shards and listing files (manifest, journals) together (counted); the writer's journal is then kept
under a sixteenth of the limit (folded into the manifest and restarted past it). At startup, temp files and
shard files no manifest lists (left by a crash) are swept.
A stop writes what waits (`stop`, from the recorder's stop); what a crash of the recorder loses: the records
still waiting, at most `shard_seconds` of traffic (bounded by `shard_tokens` tokens / half the replay budget).
Memory: records of varying sizes freed oldest first leave free pages inside this thread's malloc arena, which
glibc keeps resident; once a minute (--online-train-malloc-trim-seconds) the thread gives them back
(`sglang_ext.online.recorder.memory`, counted and timed on /metrics).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from sglang_ext.online.protocol import check_record, record_nbytes
from sglang_ext.online.queues import ByteQueue
from sglang_ext.online.recorder.memory import Trimmer

logger = logging.getLogger(__name__)
RETRY_BACKOFF_S = (1.0, 60.0)       # a failed shard write is retried after this, doubling up to the second
SHARD_MAX_FEATURE_BYTES = 64 << 20  # a shard is written once its records hold this many feature bytes in memory
JOURNAL_MAX_BYTES = (64 << 10, 8 << 20)   # writer journal bound with a retention limit: limit/16, within these


@dataclass
class BufferStats:
    records: int = 0          # records currently in memory
    bytes: int = 0            # their feature bytes
    added: int = 0            # records ever added
    dropped: int = 0          # records dropped for the budget
    poison: int = 0           # records refused by check_record (never kept, persisted or sent)
    persisted: int = 0        # records written to shards
    persisted_shards: int = 0
    persisted_bytes: int = 0  # bytes of those shards
    persist_errors: int = 0   # failed shard writes (each retried)
    persist_lost: int = 0     # records given up on (past the bound of what waits to be written, or refused)
    pruned_shards: int = 0    # shards deleted by the retention limit ...
    pruned_bytes: int = 0
    pruned_records: int = 0
    swept_files: int = 0      # orphan shards and temp files deleted at startup


class ReplayBuffer:
    def __init__(self, cfg, spec, metrics, flush_interval_s: float = 1.0, *, vocab_size: int | None = None,
                 start: bool = True):
        """flush_interval_s: how often the thread wakes without traffic to check whether a shard is due;
        vocab_size: the target's vocabulary, for the token id check (None: not checked); start: run the thread
        (False: the caller drives `accept` and `write_due_shard`, as tests do)."""
        self.cfg = cfg
        self.spec = spec                      # trainer.replay.ReplaySpec
        self.metrics = metrics
        self.flush_interval_s = flush_interval_s
        self.vocab_size = vocab_size
        self.width = spec.num_layers * spec.hidden_size
        self.records: deque = deque()
        self.stats = BufferStats()
        self.lock = threading.Lock()
        # finished requests from the scheduler thread (CapturedRequest), bounded in bytes
        self.inbox: ByteQueue = ByteQueue(cfg.queue_bytes, size=lambda finished: finished.nbytes())
        self.writer = None
        self.on_record = None                 # e.g. TrainerGroupSupervisor.offer: called with each new record
        self.prefix_store = None              # radix-cache hits are filled from the rows of earlier records
        self.seq = 0                          # number of the next kept record (meta["seq"])
        # records waiting to be persisted (oldest first), their tokens and bytes, when the oldest arrived
        self.pending: deque = deque()
        self.pending_tokens = 0
        self.pending_bytes = 0
        self.pending_since: float | None = None
        self.retry_at = 0.0
        self.retry_backoff = RETRY_BACKOFF_S[0]
        self.dir_bytes = 0                    # bytes of the shards the persist directory lists
        # records freed oldest first leave free pages inside this thread's malloc arena: given back regularly
        self.trimmer = Trimmer(cfg.malloc_trim_seconds)
        self._stop = threading.Event()
        if cfg.prefix_store_bytes > 0:
            from sglang_ext.online.recorder.prefix_store import PrefixFeatureStore
            self.prefix_store = PrefixFeatureStore(cfg.prefix_store_bytes)
        if cfg.persist_dir:
            from trainer.replay import ShardWriter
            self._sweep()
            # The buffer decides when a shard is written (tokens, bytes, age): the writer never flushes by itself
            self.writer = ShardWriter(cfg.persist_dir, spec, max_shard_tokens=1 << 62,
                                      journal_max_bytes=self.journal_max_bytes)
            self._update_dir_bytes()
            self._retain()                    # a directory already over the limit is brought under it now
        self.thread = threading.Thread(target=self._run, name="sglang-ext-replay", daemon=True)
        if start:
            self.thread.start()

    @property
    def shard_max_bytes(self) -> int:
        """Feature bytes (in memory) past which a shard is written anyway: half of what may wait (the replay
        budget), at most SHARD_MAX_FEATURE_BYTES, and at most a quarter of the retention limit (stored features
        are never larger than in memory: bf16 or fp8 from float32 or bf16)."""
        cap = min(int(self.cfg.replay_budget_bytes) // 2, SHARD_MAX_FEATURE_BYTES)
        if self.cfg.persist_max_bytes:
            cap = min(cap, int(self.cfg.persist_max_bytes) // 4)
        return max(1, cap)

    @property
    def journal_max_bytes(self) -> int:
        """The shard writer's journal bound: a sixteenth of the retention limit (within JOURNAL_MAX_BYTES), or
        the writer's default without one."""
        low, high = JOURNAL_MAX_BYTES
        if not self.cfg.persist_max_bytes:
            return high
        return min(high, max(low, int(self.cfg.persist_max_bytes) // 16))

    # -- scheduler thread ------------------------------------------------------------------------------
    def submit(self, finished) -> None:
        """Called from the scheduler thread; never blocks (past the inbox's bound the oldest are dropped)."""
        self.inbox.put(finished)
        if self.inbox.dropped:
            self.metrics.queue("replay_inbox", self.inbox.nbytes, self.inbox.take_dropped())

    def snapshot(self) -> list:
        with self.lock:
            return list(self.records)

    def stop(self, timeout: float = 30.0) -> None:
        """Write what waits to be persisted and end the thread (the recorder process's stop: a signal, or the
        scheduler process gone)."""
        self._stop.set()
        if self.thread.is_alive():
            if self.thread is not threading.current_thread():
                self.thread.join(timeout)
        elif self.writer is not None:             # no thread (start=False): write here
            self.write_due_shard(time.monotonic(), final=True)
            self._close_writer()

    def _close_writer(self) -> None:
        """Fold the writer's journal into the manifest (trainer.replay.ShardWriter.close; nothing is left to
        flush by then)."""
        writer, self.writer = self.writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception:
            logger.exception("sglang_ext: could not close the replay writer of %s", self.cfg.persist_dir)

    # -- the buffer's thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()                # then: take what is in the inbox, write, end
            finished = self.inbox.get(timeout=0.0 if stopping else self.flush_interval_s)
            self.metrics.queue("replay_inbox", self.inbox.nbytes, self.inbox.take_dropped())
            if finished is not None:
                self._take(finished)
            last = stopping and finished is None
            if self.writer is not None:
                self.write_due_shard(time.monotonic(), final=last)
            self._trim(time.monotonic())
            if last:
                self._close_writer()
                return

    def _take(self, finished) -> None:
        from sglang_ext.online.recorder.records import assemble_record
        try:
            record = assemble_record(finished, self.cfg.include_prompt_loss, self.prefix_store)
        except Exception:                      # never let one bad request kill the buffer
            logger.exception("sglang_ext: could not assemble the record of request %s", finished.rid)
            return
        if record is not None:
            self.accept(record)

    def accept(self, record) -> bool:
        """A finished request's record: checked (poison: dropped, counted), numbered, kept under the budget,
        handed to the trainer and queued for the next shard."""
        problem = check_record(record, self.vocab_size, self.width)
        if problem is not None:
            self._poison(record, problem)
            return False
        record.meta["seq"] = self.seq
        self.seq += 1
        self._add(record)
        self.metrics.prefix_rows(record.meta.get("prefix_filled_rows", 0) + record.meta.get("prefix_pool_rows", 0),
                                 sum(b - a for a, b in record.meta.get("feature_gaps", ())),
                                 self.prefix_store.nbytes if self.prefix_store is not None else 0)
        if self.on_record is not None:
            try:
                self.on_record(record)
            except Exception:
                logger.exception("sglang_ext: could not hand request %s to the trainer", record.meta.get("rid"))
        if self.writer is not None:
            self._queue_for_shard(record)
        return True

    def _poison(self, record, problem: str) -> None:
        reason = problem.split(":", 1)[0]
        self.stats.poison += 1
        self.metrics.poison_records(reason)
        logger.warning("sglang_ext: request %s not recorded (poison record, %s)", record.meta.get("rid"), problem)

    # -- persistence -----------------------------------------------------------------------------------
    def _queue_for_shard(self, record) -> None:
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append(record)
        self.pending_tokens += len(record)
        self.pending_bytes += record_nbytes(record)
        limit = self.cfg.replay_budget_bytes
        if self.pending_bytes > limit and time.monotonic() >= self.retry_at:
            # Over the bound with no failed write outstanding: write now (a small record then a large one can
            # pass the bound between two of the thread's due checks); only a failed write gives records up.
            self.write_due_shard(time.monotonic())
        lost = 0
        while self.pending_bytes > limit and len(self.pending) > 1:              # bounded while writes fail
            self._unqueue_oldest()
            lost += 1
        if lost:
            self._lost(lost, f"{lost} record(s) waiting to be persisted given up (over the {limit} "
                             f"byte bound while shard writes fail)")

    def _unqueue_oldest(self):
        old = self.pending.popleft()
        self.pending_tokens -= len(old)
        self.pending_bytes -= record_nbytes(old)
        return old

    def _lost(self, n: int, why: str) -> None:
        self.stats.persist_lost += n
        self.metrics.persist_lost(n)
        logger.error("sglang_ext: %s (%s)", why, self.cfg.persist_dir)

    def shard_due(self, now: float, final: bool = False) -> bool:
        """A shard is due: enough tokens or bytes wait, or the oldest waited shard_seconds, or the buffer
        stops; not before a failed write's retry time (except when stopping)."""
        if not self.pending or (now < self.retry_at and not final):
            return False
        return (final or self.pending_tokens >= self.cfg.shard_tokens or self.pending_bytes >= self.shard_max_bytes
                or now - self.pending_since >= self.cfg.shard_seconds)

    def write_due_shard(self, now: float, final: bool = False) -> None:
        """Write one shard of everything waiting if it is due (never raises: persistence must not stop the
        buffer)."""
        try:
            if self.shard_due(now, final):
                self._write_pending(final)
        except Exception:
            logger.exception("sglang_ext: replay persistence failed unexpectedly")

    def _write_pending(self, final: bool) -> None:
        records = list(self.pending)
        try:
            path = self._write_shard(records)
        except Exception as e:
            self.stats.persist_errors += 1
            self.metrics.persist_error()
            self.retry_at = time.monotonic() + self.retry_backoff
            logger.error("sglang_ext: could not write a replay shard of %d records to %s (%s: %s); kept, retrying "
                         "in %.0fs", len(records), self.cfg.persist_dir, type(e).__name__, e, self.retry_backoff)
            self.retry_backoff = min(2 * self.retry_backoff, RETRY_BACKOFF_S[1])
            if final:
                self._lost(len(self.pending), f"{len(self.pending)} record(s) not persisted at shutdown")
            return
        for _ in records:
            self._unqueue_oldest()
        self.pending_since = time.monotonic() if self.pending else None
        self.retry_at, self.retry_backoff = 0.0, RETRY_BACKOFF_S[0]
        nbytes = path.stat().st_size if path is not None else 0
        self.stats.persisted += len(records)
        self.stats.persisted_shards += 1
        self.stats.persisted_bytes += nbytes
        self.dir_bytes += nbytes
        self.metrics.persisted(len(records))
        self.metrics.persisted_shard(nbytes)
        self._retain()

    def _write_shard(self, records: list):
        """One shard of `records` (a record the writer refuses is given up, counted as lost)."""
        writer = self.writer
        refused = 0
        try:
            for record in records:
                try:
                    writer.add(record)
                except ValueError as e:            # trainer.replay.ReplayError: this record cannot be stored
                    refused += 1
                    logger.error("sglang_ext: request %s cannot be persisted: %s", record.meta.get("rid"), e)
            if refused:
                self._lost(refused, f"{refused} record(s) refused by the shard writer")
            return writer.flush()
        finally:
            _discard_buffered(writer)              # a failed flush leaves nothing behind in the writer

    def _metadata_bytes(self) -> int:
        """Bytes of the directory's listing files (manifest, lock, journals): a few stats."""
        from trainer import replay
        try:
            return replay.metadata_bytes(self.cfg.persist_dir)
        except OSError:
            return 0

    def _retain(self) -> None:
        """--online-train-persist-max-bytes: delete the directory's oldest shards until its shards and listing
        files fit (counted); the gauge gets both. A prune journals its removals, which the listing files then
        also hold: a second (rarely a third) pass deletes one more shard for them."""
        limit = self.cfg.persist_max_bytes
        from trainer import replay
        total = replay.PruneResult()
        metadata = self._metadata_bytes()
        for _ in range(3):
            if not limit or self.dir_bytes + metadata <= limit:
                break
            try:
                pruned = replay.prune_replay(self.cfg.persist_dir, max(0, limit - metadata))
            except Exception:
                logger.exception("sglang_ext: could not apply --online-train-persist-max-bytes to %s",
                                 self.cfg.persist_dir)
                break
            self.dir_bytes = max(0, self.dir_bytes - pruned.bytes)
            total.shards, total.bytes, total.records = (total.shards + pruned.shards, total.bytes + pruned.bytes,
                                                        total.records + pruned.records)
            metadata = self._metadata_bytes()           # the prune journaled its removals, may have compacted
            if not pruned.shards:
                break
        self.metrics.persist_dir_bytes(self.dir_bytes + metadata)
        if total.shards:
            self.stats.pruned_shards += total.shards
            self.stats.pruned_bytes += total.bytes
            self.stats.pruned_records += total.records
            self.metrics.persist_pruned(total.shards, total.bytes, total.records)
            logger.info("sglang_ext: retention: deleted the %d oldest shard(s) (%d records, %d bytes) of %s to "
                        "stay under %d bytes", total.shards, total.records, total.bytes, self.cfg.persist_dir,
                        limit)

    def _sweep(self) -> None:
        """Startup: temp files and unlisted shards a crashed writer left in the persist directory."""
        from trainer import replay
        try:
            swept = replay.sweep_replay(self.cfg.persist_dir)
        except FileNotFoundError:
            return
        except Exception:
            logger.exception("sglang_ext: could not sweep %s", self.cfg.persist_dir)
            return
        if swept:
            self.stats.swept_files += len(swept)
            self.metrics.persist_swept(len(swept))
            logger.warning("sglang_ext: swept %d leftover file(s) from %s: %s", len(swept), self.cfg.persist_dir,
                           ", ".join(p.name for p in swept[:8]) + (" ..." if len(swept) > 8 else ""))

    def _update_dir_bytes(self) -> None:
        """Bytes of the shards the directory lists, read at startup (a listing read), then kept up to date by
        adding each shard written and subtracting each pruned, so a flush stays O(1) (other writers' shards in
        the same directory are seen by prune_replay, not here); the listing files are stat'ed each time."""
        from trainer import replay
        try:
            self.dir_bytes = int(replay.replay_bytes(self.cfg.persist_dir))
        except Exception:
            logger.warning("sglang_ext: could not size %s", self.cfg.persist_dir, exc_info=True)
        self.metrics.persist_dir_bytes(self.dir_bytes + self._metadata_bytes())

    # -- memory ----------------------------------------------------------------------------------------
    def _trim(self, now: float) -> None:
        """Every cfg.malloc_trim_seconds: freed heap pages back to the OS (counted, timed)."""
        try:
            trimmed = self.trimmer.maybe_trim(now)
        except Exception:                       # never let it stop the buffer
            logger.exception("sglang_ext: malloc_trim failed")
            self.trimmer = Trimmer(0)
            return
        if trimmed is not None:
            self.metrics.malloc_trimmed(trimmed.seconds, trimmed.released_bytes)

    def _add(self, record) -> None:
        nbytes = record_nbytes(record)
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


def _discard_buffered(writer) -> None:
    """Empty a ShardWriter's own buffer (the records stay in ReplayBuffer.pending, the one source of truth)."""
    buffered = getattr(writer, "_buffer", None)
    if buffered:
        buffered.clear()
    if hasattr(writer, "_buffered_tokens"):
        writer._buffered_tokens = 0
