"""Persistence of the online replay buffer at scale (issue 14, item 2, online side), no server:

  * shards roll by size (`shard_tokens`) or age (`--online-train-shard-seconds`), whichever comes first, not
    once a second under traffic; what waits is written when the buffer stops;
  * --online-train-persist-max-bytes deletes the oldest shards after a flush, counted;
  * leftover temp files and unlisted shards are swept when the buffer starts, counted;
  * a shard write that fails is retried with the records kept; past the bound of what may wait they are
    counted as lost; the buffer's thread survives;
  * poison records (token id outside the vocabulary, non-finite features, bad shapes) are dropped and counted
    before they are kept, persisted or handed to the trainer.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

import sglang_ext.online.recorder.records as records
from sglang_ext.online.recorder.buffer import ReplayBuffer
from sglang_ext.online.config import OnlineTrainConfig
from trainer.replay import ReplayReader, ReplayRecord, ReplaySpec
from trainer.target import TargetIdentity

LAYERS, HIDDEN, VOCAB = (1, 2), 3, 100
WIDTH = len(LAYERS) * HIDDEN
SPEC = ReplaySpec(TargetIdentity("tiny", "0" * 16), LAYERS, HIDDEN, "bfloat16")


class Metrics:
    """Records every metric call (thread-safe): the buffer's view of OnlineMetrics."""

    def __init__(self):
        self.events: list[tuple[str, tuple]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name):
        def record(*args, **kwargs):
            with self._lock:
                self.events.append((name, args))
        return record

    def total(self, name: str, index: int = 0) -> int:
        with self._lock:
            return sum(args[index] if args else 1 for n, args in self.events if n == name)

    def calls(self, name: str) -> list[tuple]:
        with self._lock:
            return [args for n, args in self.events if n == name]


def record(i: int, length: int = 30, **over) -> ReplayRecord:
    g = torch.Generator().manual_seed(i)
    fields = dict(input_ids=torch.randint(0, VOCAB, (length,), generator=g),
                  features=torch.randn(length, WIDTH, generator=g).to(torch.bfloat16),
                  positions=torch.arange(length).expand(3, length).clone(),
                  loss_mask=torch.ones(length, dtype=torch.bool))
    fields.update(over)
    return ReplayRecord(**fields, meta={"rid": f"r{i}", "prefix_filled_rows": 0, "feature_gaps": []})


def make_buffer(tmp_path: Path, start: bool = False, **cfg) -> tuple[ReplayBuffer, Metrics]:
    values = dict(enabled=True, persist_dir=str(tmp_path / "replay"), shard_tokens=100, shard_seconds=300.0)
    values.update(cfg)
    metrics = Metrics()
    return ReplayBuffer(OnlineTrainConfig(**values), SPEC, metrics, flush_interval_s=0.05, vocab_size=VOCAB,
                        start=start), metrics


def rids(replay_dir: Path) -> list[str]:
    reader = ReplayReader(replay_dir)
    return [reader.read(i).meta["rid"] for i in range(len(reader))]


def shard_files(replay_dir: Path) -> list[Path]:
    return sorted(replay_dir.glob("shard-*.safetensors"))


def test_shards_roll_by_tokens_or_age_not_every_second(tmp_path):
    buf, metrics = make_buffer(tmp_path)
    out = tmp_path / "replay"
    t0 = time.monotonic()
    for i in range(3):                                   # 90 tokens: under shard_tokens (100), young
        assert buf.accept(record(i))
        buf.write_due_shard(t0 + 10 * i)                 # 20 s later still nothing: neither bound reached
    assert shard_files(out) == [] and len(buf.pending) == 3
    assert buf.accept(record(3))                         # 120 tokens >= 100: one shard of all four
    buf.write_due_shard(t0 + 30)
    assert len(shard_files(out)) == 1 and not buf.pending
    assert rids(out) == ["r0", "r1", "r2", "r3"]
    buf.accept(record(4))                                # one record: written once it waited shard_seconds
    since = buf.pending_since
    buf.write_due_shard(since + 299.0)
    assert len(shard_files(out)) == 1
    buf.write_due_shard(since + 300.0)
    assert len(shard_files(out)) == 2 and rids(out) == [f"r{i}" for i in range(5)]
    assert buf.stats.persisted == 5 and buf.stats.persisted_shards == 2
    assert metrics.total("persisted") == 5 and len(metrics.calls("persisted_shard")) == 2
    assert buf.stats.persisted_bytes == sum(p.stat().st_size for p in shard_files(out))
    assert all(r.meta["seq"] == i for i, (r, _) in enumerate(buf.snapshot()))


def test_a_small_then_a_large_record_past_the_bound_are_both_written_not_given_up(tmp_path):
    """The bound on what waits drops records only while writes fail: a 10-token record (under half the budget,
    so no shard is due) then a 60-token one pass the budget together; both go to a shard, none is lost (this
    lost a finished request in the capture server test)."""
    buf, metrics = make_buffer(tmp_path, shard_tokens=10_000, replay_budget_bytes=64 * WIDTH * 2)
    t = time.monotonic()
    assert buf.accept(record(0, length=10))
    buf.write_due_shard(t)                               # 10 tokens: under every bound, nothing written
    assert len(buf.pending) == 1 and shard_files(tmp_path / "replay") == []
    assert buf.accept(record(1, length=60))              # 70 tokens waiting > the 64-token budget
    assert buf.stats.persist_lost == 0 and metrics.total("persist_lost") == 0
    assert not buf.pending and rids(tmp_path / "replay") == ["r0", "r1"] and buf.stats.persisted == 2


class Finished:
    """What the scheduler submits (a CapturedRequest), reduced to its record (assemble_record patched)."""

    def __init__(self, rec: ReplayRecord):
        self.record, self.rid = rec, rec.meta["rid"]

    def nbytes(self) -> int:
        return 1                                         # the inbox's bound is not what these tests are about


def test_thread_under_traffic_writes_few_shards_and_the_rest_at_stop(tmp_path, monkeypatch):
    """Records arriving every 50 ms for 1.5 s with shard_seconds 1: one shard by age (the old buffer wrote one
    per second of traffic, and one more per quiet poll), the rest when the buffer stops."""
    monkeypatch.setattr(records, "assemble_record", lambda finished, *a: finished.record)
    buf, _ = make_buffer(tmp_path, start=True, shard_tokens=10_000, shard_seconds=1.0)
    for i in range(30):
        buf.submit(Finished(record(i, length=10)))
        time.sleep(0.05)
    buf.stop()
    assert not buf.thread.is_alive()
    out = tmp_path / "replay"
    assert 1 <= len(shard_files(out)) <= 2
    assert rids(out) == [f"r{i}" for i in range(30)] and buf.stats.persisted == 30


def test_failed_writes_are_retried_then_counted_as_lost_and_the_thread_survives(tmp_path, monkeypatch):
    import sglang_ext.online.recorder.buffer as buffer_mod
    buf, metrics = make_buffer(tmp_path, replay_budget_bytes=4 * 30 * WIDTH * 2)   # 4 records of 30 tokens wait
    real_flush, fails = buf.writer.flush, {"left": 2}

    def flaky_flush():
        if fails["left"]:
            fails["left"] -= 1
            raise OSError(28, "No space left on device")
        return real_flush()

    monkeypatch.setattr(buf.writer, "flush", flaky_flush)
    t = time.monotonic()
    for i in range(4):
        buf.accept(record(i))
    buf.write_due_shard(t)                               # due (120 tokens), fails: kept, retry after 1 s
    assert buf.stats.persist_errors == 1 and len(buf.pending) == 4 and buf.stats.persist_lost == 0
    assert metrics.total("persist_error") == 1
    buf.write_due_shard(time.monotonic())                # before the retry time: not tried
    assert buf.stats.persist_errors == 1
    buf.write_due_shard(buf.retry_at)                    # fails again, backoff doubles
    assert buf.stats.persist_errors == 2 and buf.retry_backoff == 4.0
    buf.accept(record(4))                                # a fifth record: over the bound, the oldest is given up
    assert buf.stats.persist_lost == 1 and metrics.total("persist_lost") == 1 and len(buf.pending) == 4
    buf.write_due_shard(buf.retry_at)                    # the disk has room again: everything left is written
    assert not buf.pending and rids(tmp_path / "replay") == ["r1", "r2", "r3", "r4"]
    assert buf.stats.persisted == 4 and buf.retry_backoff == 1.0

    # A writer that always fails, under the thread: records keep flowing to memory (and the trainer), what
    # waits stays bounded, losses are counted, the thread lives on.
    buf2, metrics2 = make_buffer(tmp_path / "b", start=True, shard_tokens=30,
                                 replay_budget_bytes=3 * 30 * WIDTH * 2)
    monkeypatch.setattr(buffer_mod, "RETRY_BACKOFF_S", (0.01, 0.01))
    buf2.retry_backoff = 0.01
    monkeypatch.setattr(buf2.writer, "flush", lambda: (_ for _ in ()).throw(PermissionError(13, "read-only")))
    offered = []
    buf2.on_record = offered.append
    monkeypatch.setattr(records, "assemble_record", lambda finished, *a: finished.record)
    for i in range(10):
        buf2.submit(Finished(record(i)))
    deadline = time.monotonic() + 20
    while buf2.stats.added < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert buf2.thread.is_alive() and buf2.stats.added == 10 and len(offered) == 10
    assert buf2.stats.persist_errors >= 2 and buf2.stats.persisted == 0
    assert len(buf2.pending) <= 3 and buf2.stats.persist_lost == 10 - len(buf2.pending)
    buf2.stop()
    assert buf2.stats.persist_lost == 10                 # nothing could be written at stop either: all counted
    assert metrics2.total("persist_lost") == 10


def test_poison_records_are_dropped_counted_never_kept_persisted_or_sent(tmp_path):
    buf, metrics = make_buffer(tmp_path, shard_tokens=1)
    offered = []
    buf.on_record = offered.append
    nan = record(1)
    nan.features[3, 2] = float("nan")
    bad = {"token_id": [record(0, input_ids=torch.full((30,), VOCAB)), record(5, input_ids=torch.full((30,), -1))],
           "non_finite": [nan],
           "shape": [record(2, positions=torch.zeros(2, 30, dtype=torch.long)),
                     record(3, features=torch.zeros(30, WIDTH + 1)),
                     record(4, loss_mask=torch.ones(29, dtype=torch.bool))]}
    for recs in bad.values():
        for r in recs:
            assert not buf.accept(r)
    assert buf.accept(record(9))
    buf.write_due_shard(time.monotonic())
    assert [r.meta["rid"] for r in offered] == ["r9"] and offered[0].meta["seq"] == 0
    assert rids(tmp_path / "replay") == ["r9"] and buf.stats.added == 1
    assert buf.stats.poison == 6
    assert {reason: metrics.calls("poison_records").count((reason,)) for reason in bad} == \
        {reason: len(recs) for reason, recs in bad.items()}


def dir_total(replay_dir: Path) -> int:
    """Every byte the directory holds (shards, manifest, lock, journals)."""
    return sum(p.stat().st_size for p in replay_dir.iterdir() if p.is_file())


def test_retention_deletes_the_oldest_shards_and_counts(tmp_path):
    from trainer import replay
    buf, metrics = make_buffer(tmp_path, shard_tokens=30)
    out = tmp_path / "replay"
    buf.accept(record(0))
    buf.write_due_shard(time.monotonic())
    one = shard_files(out)[0].stat().st_size
    # room for two shards and the listing files (a journal line per shard, the retention journal's lines)
    buf.cfg.persist_max_bytes = int(2.5 * one) + replay.metadata_bytes(out) + 1500
    for i in range(1, 5):
        buf.accept(record(i))
        buf.write_due_shard(time.monotonic())
        assert dir_total(out) <= buf.cfg.persist_max_bytes
        assert metrics.calls("persist_dir_bytes")[-1] == (dir_total(out),)
    assert rids(out) == ["r3", "r4"]                     # the oldest went first
    assert buf.stats.pruned_shards == 3 and buf.stats.pruned_records == 3
    assert metrics.total("persist_pruned", 0) == 3 and metrics.total("persist_pruned", 2) == 3
    assert metrics.total("persist_pruned", 1) == buf.stats.pruned_bytes >= 3 * one - 64


def test_retention_holds_the_whole_directory_under_the_limit_over_many_shards(tmp_path):
    """Many small shards: the journals (a line per shard added, per shard pruned) would outgrow a small limit
    if only shards counted (a 60-min soak ended at 3.0 MB under a 2 MB limit). Shards and listing files are
    counted together, and the writer's journal is restarted past a sixteenth of the limit."""
    limit = 256 << 10
    buf, metrics = make_buffer(tmp_path, shard_tokens=30, persist_max_bytes=limit)
    assert buf.writer.journal_max_bytes == 64 << 10
    out = tmp_path / "replay"
    first_journal = buf.writer.journal
    for i in range(400):
        assert buf.accept(record(i))
        buf.write_due_shard(time.monotonic())
        total = dir_total(out)
        assert total <= limit, f"after shard {i}: {total} bytes in the directory, limit {limit}"
        assert metrics.calls("persist_dir_bytes")[-1] == (total,)
    kept = rids(out)
    assert kept == [f"r{i}" for i in range(400 - len(kept), 400)] and len(kept) > 100   # the newest, many
    assert buf.stats.pruned_shards == 400 - len(kept) == metrics.total("persist_pruned", 0)
    assert buf.writer.journal != first_journal and not first_journal.exists()     # restarted past its bound
    assert len(list(out.glob("journal-*.jsonl"))) <= 2   # the writer's and retention's


def test_shards_are_capped_in_bytes_by_the_budget_a_fixed_cap_and_the_retention_limit(tmp_path):
    """What a shard write holds in memory at once is bounded, and a retention limit keeps several shards."""
    from sglang_ext.online.recorder.buffer import SHARD_MAX_FEATURE_BYTES
    mib = 1 << 20
    cases = [(dict(replay_budget_bytes=64 * mib), 32 * mib, 8 << 20),
             (dict(replay_budget_bytes=2048 * mib), SHARD_MAX_FEATURE_BYTES, 8 << 20),
             (dict(replay_budget_bytes=64 * mib, persist_max_bytes=2 * mib), mib // 2, 128 << 10),
             (dict(replay_budget_bytes=64 * mib, persist_max_bytes=mib // 2), mib // 8, 64 << 10),
             (dict(replay_budget_bytes=2048 * mib, persist_max_bytes=1 << 40), SHARD_MAX_FEATURE_BYTES, 8 << 20)]
    for n, (cfg, shard_bytes, journal_bytes) in enumerate(cases):
        buf, _ = make_buffer(tmp_path / str(n), **cfg)
        assert (buf.shard_max_bytes, buf.journal_max_bytes, buf.writer.journal_max_bytes) == \
            (shard_bytes, journal_bytes, journal_bytes), cfg
    assert SHARD_MAX_FEATURE_BYTES == 64 * mib
    # a shard is due once its records' feature bytes reach the cap, whatever shard_tokens says
    buf, _ = make_buffer(tmp_path / "due", shard_tokens=10**6, persist_max_bytes=4 * 30 * WIDTH * 2 * 3)
    assert buf.shard_max_bytes == 3 * 30 * WIDTH * 2     # three 30-token bf16 records
    for i in range(3):
        assert not shard_files(tmp_path / "due" / "replay")
        buf.accept(record(i))
        buf.write_due_shard(time.monotonic())
    assert len(shard_files(tmp_path / "due" / "replay")) == 1 and not buf.pending


def test_startup_sweeps_temp_files_and_unlisted_shards(tmp_path):
    from trainer import replay
    out = tmp_path / "replay"
    replay.write_replay(out, SPEC, [record(0)])
    listed = shard_files(out)
    leftovers = [out / "shard-000009-deadbeef.safetensors", out / "manifest.json.tmp", out / "x.tmp"]
    for p in leftovers:
        p.write_bytes(b"partial")
        old = time.time() - 2 * 3600                     # older than the sweep's minimum age
        os.utime(p, (old, old))
    fresh = out / "y.tmp"                                # possibly another writer's file in progress: kept
    fresh.write_bytes(b"in progress")
    buf, metrics = make_buffer(tmp_path)
    swept = [p for p in leftovers if not p.exists()]
    assert buf.stats.swept_files == len(swept) >= 2 and metrics.total("persist_swept") == len(swept)
    assert (out / "shard-000009-deadbeef.safetensors") in swept and fresh.exists()
    assert shard_files(out) == listed and rids(out) == ["r0"]
