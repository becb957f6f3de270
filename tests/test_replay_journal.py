"""Replay persistence at scale: per-writer journals (a flush is O(1)), compaction, old directories,
retention (prune_replay), sweeping (sweep_replay) and replay_bytes."""
from __future__ import annotations

import json
import os
import threading
import time
import warnings
from pathlib import Path

import pytest

from trainer.replay import (MANIFEST, RETENTION_JOURNAL, PruneResult, ReplayError, ReplayReader, ShardWriter,
                            prune_replay, read_manifest, replay_bytes, sweep_replay, write_replay)
from test_replay import make_records, spec


def journals(d: Path) -> list[Path]:
    return sorted(d.glob("journal-*.jsonl"))


def test_flush_appends_one_journal_line_and_leaves_the_manifest_alone(tmp_path):
    d = tmp_path / "r"
    write_replay(d, spec(), make_records(2, seed=1))                 # an existing directory
    manifest_before = (d / MANIFEST).read_bytes()
    w = ShardWriter(d, spec())
    recs = make_records(5, seed=2)
    for r in recs:
        w.add(r)
        w.flush()
    assert (d / MANIFEST).read_bytes() == manifest_before            # no manifest rewrite per flush
    lines = w.journal.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(x)["op"] == "add" for x in lines)
    assert w.listed_bytes == replay_bytes(d) == sum(p.stat().st_size for p in d.glob("shard-*.safetensors"))
    reader = ReplayReader(d)                                         # manifest + journal merged, in order
    assert [r.meta["rid"] for r in reader.records] == [f"req-1-{i}" for i in range(2)] + \
        [f"req-2-{i}" for i in range(5)]
    w.close()                                                        # folded into the manifest, journal gone
    assert not journals(d)
    m = json.loads((d / MANIFEST).read_text())
    assert m["schema_version"] == 2 and len(m["shards"]) == 6 and m["journals"] == {}
    assert [r.meta["rid"] for r in ReplayReader(d).records] == [r.meta["rid"] for r in reader.records]


def test_shard_names_need_no_glob(tmp_path, monkeypatch):
    d = tmp_path / "r"
    write_replay(d, spec(), make_records(1))
    w = ShardWriter(d, spec())
    monkeypatch.setattr(Path, "glob", lambda *a, **k: (_ for _ in ()).throw(AssertionError("glob in flush")))
    w.add(make_records(1, seed=3)[0])
    p = w.flush()
    monkeypatch.undo()
    assert p.name.startswith("shard-") and p.name.endswith(".safetensors")
    w.close()


def test_torn_last_line_is_ignored_other_bad_lines_reported(tmp_path):
    d = tmp_path / "r"
    w = ShardWriter(d, spec())
    for r in make_records(3, seed=4):
        w.add(r)
        w.flush()
    os.close(w._journal_fd)                                          # a killed writer: journal left as it is
    w._journal_fd = None
    j = w.journal
    lines = j.read_bytes().splitlines(keepends=True)
    j.write_bytes(b"".join(lines) + lines[0][:40])                   # torn append
    with pytest.warns(UserWarning, match="torn last line"):
        assert len(ReplayReader(d, strict=True)) == 3
    j.write_bytes(lines[0] + b'{"op": "add", "created": "soon"}\n' + lines[1] + lines[2])
    with pytest.raises(ReplayError, match="created") as e:
        ReplayReader(d, strict=True)
    assert e.value.path == str(j)
    with pytest.warns(UserWarning, match="created"):
        reader = ReplayReader(d)
    assert len(reader) == 3 and reader.problems


def test_old_manifest_only_directory_reads_and_grows(tmp_path):
    d = tmp_path / "r"
    write_replay(d, spec(), make_records(3, seed=5), max_shard_tokens=60)
    m = json.loads((d / MANIFEST).read_text())
    m["schema_version"] = 1                                          # what the previous writer produced
    del m["journals"]
    (d / MANIFEST).write_text(json.dumps(m))
    assert len(ReplayReader(d, strict=True)) == 3
    write_replay(d, spec(), make_records(2, seed=6))
    assert len(ReplayReader(d, strict=True)) == 5


def test_prune_deletes_oldest_first_and_journals_before_unlinking(tmp_path):
    d = tmp_path / "r"
    w = ShardWriter(d, spec())
    paths = []
    for r in make_records(6, seed=7):
        w.add(r)
        paths.append(w.flush())
    sizes = [p.stat().st_size for p in paths]
    limit = sum(sizes[3:])
    result = prune_replay(d, limit)
    assert result == PruneResult(shards=3, bytes=sum(sizes[:3]), records=3)
    assert [p.exists() for p in paths] == [False] * 3 + [True] * 3
    removed = [json.loads(x)["file"] for x in (d / RETENTION_JOURNAL).read_text().splitlines()]
    assert removed == [p.name for p in paths[:3]]
    assert replay_bytes(d) == limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # no missing-shard report: removal is listed
        reader = ReplayReader(d, strict=True)
    assert [r.meta["rid"] for r in reader.records] == [f"req-7-{i}" for i in range(3, 6)]
    assert prune_replay(d, limit) == PruneResult()
    w.add(make_records(1, seed=8)[0])                                # the writer keeps going after a prune
    w.flush()
    w.close()                                                        # compaction: removals folded, file emptied
    assert len(read_manifest(d)["shards"]) == 4 and (d / RETENTION_JOURNAL).stat().st_size == 0
    assert json.loads((d / MANIFEST).read_text())["journals"] == {RETENTION_JOURNAL: 0}
    assert prune_replay(d, 0).shards == 4 and replay_bytes(d) == 0


def test_prune_with_concurrent_writers(tmp_path):
    d = tmp_path / "r"
    write_replay(d, spec(), make_records(1, seed=9))
    errors = []

    def write(seed):
        try:
            with ShardWriter(d, spec()) as w:
                for r in make_records(8, seed=seed):
                    w.add(r)
                    w.flush()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def prune():
        try:
            for _ in range(20):
                prune_replay(d, 60_000)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s,)) for s in (10, 11)] + [threading.Thread(target=prune)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    prune_replay(d, 60_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reader = ReplayReader(d, strict=True)
    listed = {s["file"] for s in read_manifest(d)["shards"]}
    assert listed == {p.name for p in d.glob("shard-*.safetensors")}     # nothing listed-but-missing or stray
    assert replay_bytes(d) <= 60_000 and len(reader) == sum(len(s["records"]) for s in read_manifest(d)["shards"])


def test_sweep_deletes_only_old_temp_files_and_unlisted_shards(tmp_path):
    d = tmp_path / "r"
    write_replay(d, spec(), make_records(2, seed=12))
    listed = [d / s["file"] for s in read_manifest(d)["shards"]]
    old = time.time() - 7200
    orphan_old, orphan_young = d / "shard-0000000000000000001-deadbeef.safetensors", d / "shard-2-young.safetensors"
    tmp_old, tmp_young = d / ".shard-x.safetensors.1234abcd.tmp", d / ".manifest.json.5678.tmp"
    for p in (orphan_old, orphan_young, tmp_old, tmp_young):
        p.write_bytes(b"x")
    for p in (orphan_old, tmp_old, *listed):
        os.utime(p, (old, old))
    deleted = sweep_replay(d)
    assert sorted(deleted) == sorted([orphan_old, tmp_old])
    assert all(p.exists() for p in (*listed, orphan_young, tmp_young))
    assert sweep_replay(d, min_age_s=0.0) == sorted([orphan_young, tmp_young], key=lambda p: p.name)
    assert len(ReplayReader(d, strict=True)) == 2


def test_sweep_keeps_unlisted_shards_when_the_listing_is_damaged(tmp_path):
    d = tmp_path / "r"
    write_replay(d, spec(), make_records(2, seed=13))
    (d / MANIFEST).write_text("{not json")
    shards = sorted(d.glob("shard-*.safetensors"))
    assert sweep_replay(d, min_age_s=0.0) == [] and all(p.exists() for p in shards)
    with pytest.raises(ReplayError, match="bad JSON"):
        prune_replay(d, 0)
    assert all(p.exists() for p in shards)


def test_damaged_manifest_rebuild_recovers_meta_from_the_journals(tmp_path):
    d = tmp_path / "r"
    write_replay(d, spec(), make_records(2, seed=14))                 # compacted: meta only in the manifest
    w = ShardWriter(d, spec())
    for r in make_records(2, seed=15):                               # journaled: meta in the journal too
        w.add(r)
        w.flush()
    (d / MANIFEST).write_text('{"format": ')
    with pytest.warns(UserWarning, match="record meta lost .* for 1 of them"):
        reader = ReplayReader(d)
    assert sorted(r.meta.get("rid", "?") for r in reader.records) == ["?", "?", "req-15-0", "req-15-1"]
    with pytest.raises(ReplayError, match="bad JSON") as e:
        ReplayReader(d, strict=True)
    assert e.value.path == str(d / MANIFEST)
    os.close(w._journal_fd)
    w._journal_fd = None


def test_a_full_journal_is_folded_and_replaced(tmp_path):
    d = tmp_path / "r"
    w = ShardWriter(d, spec(), journal_max_bytes=1)                  # every line fills it
    recs = make_records(3, seed=16)
    for r in recs:
        w.add(r)
        w.flush()
        assert not journals(d)                                       # folded into the manifest, file deleted
    assert [r.meta["rid"] for r in ReplayReader(d, strict=True).records] == [r.meta["rid"] for r in recs]
    w.close()


def test_sweep_folds_and_deletes_idle_journals_and_a_live_writer_carries_on(tmp_path):
    d = tmp_path / "r"
    killed = ShardWriter(d, spec())
    for r in make_records(2, seed=17):
        killed.add(r)
        killed.flush()
    os.close(killed._journal_fd)                                     # killed: journal never folded
    live = ShardWriter(d, spec())
    live.add(make_records(1, seed=18)[0])
    live.flush()
    old = time.time() - 7200
    for j in journals(d):
        os.utime(j, (old, old))
    assert sorted(sweep_replay(d)) == sorted([killed.journal, live.journal])
    assert not journals(d) and len(read_manifest(d)["shards"]) == 3   # their entries are in the manifest now
    live.add(make_records(1, seed=19)[0])
    live.flush()                                                     # finds its journal gone: starts a new one
    assert len(journals(d)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reader = ReplayReader(d, strict=True)
    assert sorted(r.meta["rid"] for r in reader.records) == ["req-17-0", "req-17-1", "req-18-0", "req-19-0"]
    live.close()
    assert not journals(d)


def test_a_shard_pruned_after_validation_is_a_clear_read_error(tmp_path):
    d = tmp_path / "r"
    write_replay(d, spec(), make_records(3, seed=22), max_shard_tokens=40)
    reader = ReplayReader(d)
    first = reader.records[0].shard
    assert prune_replay(d, replay_bytes(d) - 1).shards >= 1 and not first.exists()
    with pytest.raises(ReplayError, match="no longer readable") as e:
        reader[0]
    assert e.value.path == str(first) and e.value.field == "read"
