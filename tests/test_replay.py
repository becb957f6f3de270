"""Replay shards: round trips, fp8 size/precision, atomicity, permissions, and every bad input."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

import trainer.replay as replay
from trainer.replay import (MANIFEST, ReplayError, ReplayReader, ReplayRecord, ReplaySpec, ShardWriter,
                            read_manifest, write_replay)
from trainer.target import TargetIdentity

K, H = 3, 128
LAYERS = (1, 5, 9)
TARGET = TargetIdentity("tiny-target", "sha256:" + "ab" * 32)


def spec(dtype="bfloat16", layers=LAYERS, hidden=H, target=TARGET):
    return ReplaySpec(target, layers, hidden, dtype)


def make_records(n=6, seed=0, hidden=H, layers=K):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        S = int(torch.randint(20, 60, (1,), generator=g))
        layer_scale = torch.tensor([0.5, 4.0, 60.0][:layers]).repeat_interleave(hidden)   # layers differ in size
        feats = torch.randn(S, layers * hidden, generator=g) * layer_scale
        feats[0, :5] = torch.tensor([0.0, 1e-4, -3e-3, 7.0, -1000.0])                      # tiny, zero, huge
        out.append(ReplayRecord(input_ids=torch.randint(0, 150000, (S,), generator=g),
                                features=feats,
                                positions=torch.stack([torch.arange(S), torch.arange(S) // 2, torch.arange(S) % 7]),
                                loss_mask=torch.rand(S, generator=g) > 0.3,
                                meta={"rid": f"req-{seed}-{i}", "n_images": i % 2}))
    return out


def shard_paths(d: Path) -> list[Path]:
    return [d / s["file"] for s in read_manifest(d)["shards"]]


def rewrite_shard(d: Path, index: int, mutate) -> Path:
    """Rewrite shard `index` with mutate(tensors, metadata) applied, keeping the manifest's size and
    checksum in step, so only the mutated field is wrong."""
    m = read_manifest(d)
    entry = m["shards"][index]
    path = d / entry["file"]
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    mutate(tensors, meta)
    blob = save(tensors, metadata=meta)
    path.write_bytes(blob)
    entry["bytes"], entry["sha256"] = len(blob), hashlib.sha256(blob).hexdigest()
    (d / MANIFEST).write_text(json.dumps(m))
    return path


@pytest.fixture
def two_shard_dir(tmp_path):
    d = tmp_path / "replay"
    recs = make_records(6)
    write_replay(d, spec(), recs, max_shard_tokens=120)
    assert len(read_manifest(d)["shards"]) >= 2
    return d, recs


# ---- round trips --------------------------------------------------------------------------------------

def test_round_trip_bf16(two_shard_dir):
    d, recs = two_shard_dir
    reader = ReplayReader(d, layer_ids=LAYERS, hidden_size=H)
    assert len(reader) == len(recs) and reader.num_tokens == sum(len(r) for r in recs)
    assert reader.spec == spec()
    for i, orig in enumerate(recs):
        got = reader[i]
        assert torch.equal(got.input_ids, orig.input_ids)
        assert torch.equal(got.positions, orig.positions) and got.positions.shape == (3, len(orig))
        assert torch.equal(got.loss_mask, orig.loss_mask)
        assert torch.equal(got.features, orig.features.to(torch.bfloat16).float())
        assert got.meta == orig.meta


def test_round_trip_fp8_precision_and_size(tmp_path):
    recs = make_records(8, seed=1)
    write_replay(tmp_path / "bf16", spec("bfloat16"), recs, max_shard_tokens=150)
    write_replay(tmp_path / "fp8", spec("float8_e4m3fn"), recs, max_shard_tokens=150)
    reader = ReplayReader(tmp_path / "fp8", layer_ids=LAYERS, hidden_size=H)
    for i, orig in enumerate(recs):
        got = reader[i]
        assert torch.equal(got.input_ids, orig.input_ids) and torch.equal(got.loss_mask, orig.loss_mask)
        x = orig.features.view(len(orig), K, H)
        scale = x.abs().amax(-1, keepdim=True) / 448.0           # per token and layer
        err = (got.features.view(len(orig), K, H) - x).abs()
        # e4m3: 3 mantissa bits -> relative error <= 2^-4; subnormals: absolute <= 2^-10 * scale
        bound = x.abs() * 2.0 ** -4 + scale * 2.0 ** -10
        assert bool((err <= bound * 1.0001 + 1e-12).all()), float((err - bound).max())
        assert float(err.max()) > 0                               # it really is quantised
    size = lambda d: sum(p.stat().st_size for p in (tmp_path / d).glob("shard-*.safetensors"))  # noqa: E731
    ratio = size("fp8") / size("bf16")
    assert ratio <= 0.55, ratio


def test_multiple_dirs_mixed_dtypes(tmp_path):
    write_replay(tmp_path / "a", spec("bfloat16"), make_records(2, seed=2))
    write_replay(tmp_path / "b", spec("float8_e4m3fn"), make_records(3, seed=3))
    reader = ReplayReader([tmp_path / "a", tmp_path / "b"], layer_ids=LAYERS, hidden_size=H)
    assert len(reader) == 5 and reader[4].meta["rid"] == "req-3-2"
    other = TargetIdentity("another-model", "sha256:" + "cd" * 32)
    write_replay(tmp_path / "c", spec(target=other), make_records(1, seed=4))
    with pytest.raises(ReplayError, match="target.config_hash") as e:
        ReplayReader([tmp_path / "a", tmp_path / "c"])
    assert e.value.path == str(tmp_path / "c" / MANIFEST)


def test_reopening_a_dir_appends_and_checks_compatibility(tmp_path):
    d = tmp_path / "r"
    write_replay(d, spec(), make_records(2, seed=5))
    write_replay(d, spec(), make_records(2, seed=6))
    assert len(ReplayReader(d)) == 4
    with pytest.raises(ReplayError, match="layer_ids") as e:
        ShardWriter(d, spec(layers=(1, 5, 10)))
    assert e.value.field == "layer_ids"
    with pytest.raises(ReplayError, match="storage_dtype"):
        ShardWriter(d, spec("float8_e4m3fn"))


def test_concurrent_writers_share_one_manifest(tmp_path):
    d = tmp_path / "r"
    errors = []

    def work(seed):
        try:
            write_replay(d, spec(), make_records(3, seed=seed), max_shard_tokens=50)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (10, 11, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    reader = ReplayReader(d)
    assert len(reader) == 9
    expected = sorted(f"req-{s}-{i}" for s in (10, 11, 12) for i in range(3))
    assert sorted(r.meta["rid"] for r in reader.records) == expected


# ---- prefixes shared within a shard (shard layout v2) -------------------------------------------------------

DATA = Path(__file__).parent / "data"


def chat_turns(n_turns=4, first=40, per_turn=24, seed=3, hidden=H, rid="chat"):
    """One chat's records, as the online path makes them: turn t holds turn t-1's tokens, positions and feature
    rows (its prefix, served from the radix cache), then its own; the loss mask marks each turn's reply."""
    g = torch.Generator().manual_seed(seed)
    S = first + per_turn * (n_turns - 1)
    ids, feats = torch.randint(0, 150000, (S,), generator=g), torch.randn(S, K * hidden, generator=g)
    pos = torch.stack([torch.arange(S)] * 3)
    out = []
    for t in range(n_turns):
        n = first + per_turn * t
        mask = torch.zeros(n, dtype=torch.bool)
        mask[n - per_turn // 2:] = True
        out.append(ReplayRecord(ids[:n].clone(), feats[:n].clone(), pos[:, :n].clone(), mask,
                                meta={"rid": f"{rid}-{t}"}))
    return out


def read_all(d: Path) -> list[ReplayRecord]:
    reader = ReplayReader(d, strict=True)
    return [reader[i] for i in range(len(reader))]


def assert_same_records(got: list[ReplayRecord], want: list[ReplayRecord]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.meta == b.meta
        for name in ("input_ids", "features", "positions", "loss_mask"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (a.meta, name)


def feature_rows(d: Path) -> int:
    rows = 0
    for path in shard_paths(d):
        with safe_open(str(path), framework="pt") as f:
            rows += f.get_slice("features").get_shape()[0]
    return rows


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_chat_turns_store_their_shared_prefix_once(tmp_path, dtype):
    """Two chats' turns interleaved with unrelated records in one shard: each turn stores only the rows past the
    previous turn's, and every record reads back exactly as from a shard that shares nothing."""
    chat_a, chat_b = chat_turns(seed=3, rid="a"), chat_turns(n_turns=3, first=70, seed=4, rid="b")
    others = make_records(3, seed=5)
    records = [chat_a[0], others[0], chat_b[0], chat_a[1], chat_a[2], others[1], chat_b[1], chat_a[3], chat_b[2],
               others[2]]
    write_replay(tmp_path / "shared", spec(dtype), records)
    with ShardWriter(tmp_path / "flat", spec(dtype), share_prefixes=False) as w:
        for r in records:
            w.add(r)
    assert_same_records(read_all(tmp_path / "shared"), read_all(tmp_path / "flat"))
    unique = len(chat_a[-1]) + len(chat_b[-1]) + sum(len(r) for r in others)
    assert feature_rows(tmp_path / "shared") == unique
    assert feature_rows(tmp_path / "flat") == sum(len(r) for r in records)
    m = read_manifest(tmp_path / "shared")
    (shard,) = m["shards"]
    rows = {r["meta"]["rid"]: [row for start, n in r["feature_runs"] for row in range(start, start + n)]
            for r in shard["records"]}
    assert rows["a-0"] == list(range(40))                # each turn: the previous turn's rows, then its own
    for t in (1, 2, 3):
        assert rows[f"a-{t}"][:-24] == rows[f"a-{t - 1}"]
    size = lambda d: sum(p.stat().st_size for p in shard_paths(tmp_path / d))  # noqa: E731
    assert size("shared") < 0.6 * size("flat"), (size("shared"), size("flat"))


def test_sharing_stops_at_the_first_row_that_differs(tmp_path):
    """A later turn whose prefix rows differ from row 10 on (a gap left by the radix cache, zero rows) shares
    only the first 10 rows; a record with equal tokens but other positions shares nothing."""
    turns = chat_turns(n_turns=2)
    turns[1].features[10:20] = 0.0
    moved = ReplayRecord(turns[0].input_ids.clone(), turns[0].features.clone(), turns[0].positions + 5,
                         turns[0].loss_mask.clone(), meta={"rid": "moved"})
    write_replay(tmp_path / "r", spec(), [turns[0], turns[1], moved])
    (shard,) = read_manifest(tmp_path / "r")["shards"]
    runs = [r["feature_runs"] for r in shard["records"]]
    assert runs == [[[0, 40]], [[0, 10], [40, 54]], [[94, 40]]], runs
    assert_same_records(read_all(tmp_path / "r"), [
        ReplayRecord(r.input_ids, r.features.to(torch.bfloat16).float(), r.positions, r.loss_mask, r.meta)
        for r in (turns[0], turns[1], moved)])


def test_rows_are_compared_chunk_by_chunk_up_to_the_first_difference():
    a = torch.randn(10, 8)
    b = a.clone()
    assert replay._leading_equal_rows(a, b, 10, chunk=4) == 10
    b[6, 3] += 1.0                                       # in the second chunk
    assert replay._leading_equal_rows(a, b, 10, chunk=4) == 6
    assert replay._leading_equal_rows(a, b, 5, chunk=4) == 5


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_shards_of_layout_v1_still_read(tmp_path, dtype):
    """tests/data/replay_v1_*: written by the shard layout before prefix sharing (one feature row per token, no
    feature_runs); they read as before, equal to the same records written now."""
    recs = make_records(4, seed=11, hidden=16)
    storage = replay.STORAGE[dtype]
    old = read_all(DATA / f"replay_v1_{dtype}")
    assert all(json.loads(safe_open(str(p), framework="pt").metadata()["schema_version"]) == 1
               for p in shard_paths(DATA / f"replay_v1_{dtype}"))
    write_replay(tmp_path / "now", spec(storage, hidden=16), recs)
    assert_same_records(old, read_all(tmp_path / "now"))


def test_bad_feature_runs_are_named(tmp_path):
    write_replay(tmp_path / "r", spec(), chat_turns(n_turns=2))
    m = read_manifest(tmp_path / "r")
    m["shards"][0]["records"][1]["feature_runs"] = [[0, 40], [40, 99]]        # past the shard's 64 rows
    (tmp_path / "r" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ReplayError, match=r"records\[1\]\.feature_runs.*inside the 64 feature rows"):
        ReplayReader(tmp_path / "r", strict=True)
    m["shards"][0]["records"][1]["feature_runs"] = [[0, -1]]
    (tmp_path / "r" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ReplayError, match=r"records\[1\]\.feature_runs"):
        ReplayReader(tmp_path / "r", strict=True)


# ---- atomicity and permissions -----------------------------------------------------------------------------

def test_files_are_private_even_with_open_umask(tmp_path):
    old = os.umask(0)
    try:
        d = tmp_path / "r"
        write_replay(d, spec(), make_records(2), max_shard_tokens=40)
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / MANIFEST).stat().st_mode) == 0o600
    for p in shard_paths(d):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_failed_shard_write_leaves_nothing_behind(two_shard_dir, monkeypatch):
    d, recs = two_shard_dir
    manifest_before = (d / MANIFEST).read_bytes()
    files_before = sorted(os.listdir(d))

    def crash(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(replay.os, "replace", crash)
    w = ShardWriter(d, spec())
    w.add(make_records(1, seed=9)[0])
    with pytest.raises(OSError, match="simulated"):
        w.flush()
    monkeypatch.undo()
    assert sorted(os.listdir(d)) == files_before                # no temp file, no partial shard
    assert (d / MANIFEST).read_bytes() == manifest_before
    assert len(ReplayReader(d)) == len(recs)


def test_crash_before_manifest_update_leaves_an_ignored_orphan(two_shard_dir, monkeypatch):
    d, recs = two_shard_dir

    def crash(self, shard):
        raise KeyboardInterrupt("killed between shard rename and manifest update")

    monkeypatch.setattr(ShardWriter, "_append_to_manifest", crash)
    w = ShardWriter(d, spec())
    w.add(make_records(1, seed=9)[0])
    with pytest.raises(KeyboardInterrupt):
        w.flush()
    monkeypatch.undo()
    orphans = set(p.name for p in d.glob("shard-*.safetensors")) - set(p.name for p in shard_paths(d))
    assert len(orphans) == 1
    with pytest.warns(UserWarning, match=orphans.pop()):
        reader = ReplayReader(d)
    assert len(reader) == len(recs)


# ---- bad inputs ---------------------------------------------------------------------------------------------

def test_truncated_shard_is_named_and_skipped(two_shard_dir):
    d, recs = two_shard_dir
    bad = shard_paths(d)[1]
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(ReplayError, match="truncated") as e:
        ReplayReader(d, strict=True)
    assert e.value.path == str(bad) and e.value.field == "bytes"
    with pytest.warns(UserWarning, match=bad.name):
        reader = ReplayReader(d)
    assert [s.path for s in reader.skipped] == [bad]
    kept = {r.meta["rid"] for r in reader.records}
    lost = {r["meta"]["rid"] for r in read_manifest(d)["shards"][1]["records"]}
    assert kept == {r.meta["rid"] for r in recs} - lost and kept
    for ref_i, ref in enumerate(reader.records):                  # what is kept reads back correctly
        orig = next(r for r in recs if r.meta["rid"] == ref.meta["rid"])
        assert torch.equal(reader[ref_i].input_ids, orig.input_ids)


def test_corrupt_bytes_fail_the_checksum(two_shard_dir):
    d, _ = two_shard_dir
    bad = shard_paths(d)[0]
    data = bytearray(bad.read_bytes())
    data[-50] ^= 0xFF                                              # same size, flipped feature bits
    bad.write_bytes(bytes(data))
    with pytest.raises(ReplayError, match="checksum") as e:
        ReplayReader(d, strict=True)
    assert e.value.path == str(bad) and e.value.field == "sha256"
    with pytest.warns(UserWarning, match=bad.name):
        assert ReplayReader(d).skipped[0].path == bad


def test_shard_with_wrong_hidden_size(two_shard_dir):
    d, _ = two_shard_dir

    def shrink(t, meta):
        t["features"] = t["features"][:, : K * (H - 8)].contiguous()

    bad = rewrite_shard(d, 0, shrink)
    with pytest.raises(ReplayError, match=r"shape .* expected") as e:
        ReplayReader(d, strict=True)
    assert e.value.path == str(bad) and e.value.field == "features"
    assert "hidden size 120" in str(e.value)


def test_shard_with_wrong_dtype(two_shard_dir):
    d, _ = two_shard_dir

    def to_f16(t, meta):
        t["features"] = t["features"].to(torch.float16)

    bad = rewrite_shard(d, 1, to_f16)
    with pytest.raises(ReplayError, match="dtype F16, expected BF16") as e:
        ReplayReader(d, strict=True)
    assert e.value.path == str(bad) and e.value.field == "features"


def test_shard_header_disagreeing_with_manifest(two_shard_dir):
    d, _ = two_shard_dir

    def other_layers(t, meta):
        meta["layer_ids"] = json.dumps([1, 5, 10])

    bad = rewrite_shard(d, 0, other_layers)
    with pytest.raises(ReplayError, match=r"\[1, 5, 10\]") as e:
        ReplayReader(d, strict=True)
    assert e.value.path == str(bad) and e.value.field == "layer_ids"


def test_missing_shard_file(two_shard_dir):
    d, _ = two_shard_dir
    gone = shard_paths(d)[0]
    gone.unlink()
    with pytest.raises(ReplayError, match="missing") as e:
        ReplayReader(d, strict=True)
    assert e.value.path == str(gone)
    with pytest.warns(UserWarning, match=gone.name):
        assert len(ReplayReader(d)) > 0


def test_layer_ids_or_hidden_size_not_matching_the_draft(two_shard_dir):
    d, _ = two_shard_dir
    with pytest.raises(ReplayError, match=r"target layers \[1, 5, 9\], the draft reads \[1, 5, 10\]") as e:
        ReplayReader(d, layer_ids=[1, 5, 10])
    assert e.value.path == str(d / MANIFEST) and e.value.field == "layer_ids"
    with pytest.raises(ReplayError, match="replay has 128, expected 256") as e:
        ReplayReader(d, hidden_size=256)
    assert e.value.field == "hidden_size"
    with pytest.raises(ReplayError, match="target checkpoint hashes to") as e:
        ReplayReader(d, target_config_hash="sha256:00")
    assert e.value.field == "target.config_hash"


@pytest.mark.parametrize("content, field, message", [
    ("{not json", None, "bad JSON"),
    ("[]", None, "not a JSON object"),
    ('{"format": "sglang-ext-dflash-replay", "schema_version": 1}', "target", "missing"),
    ("PATCH:hidden_size=-3", "hidden_size", "must be positive"),
    ("PATCH:layer_ids=abc", "layer_ids", "expected list"),
    ("PATCH:schema_version=99", "schema_version", "understands 1"),
    ("PATCH:storage_dtype=float64", "storage_dtype", "not in"),
    ("DROP:shards.0.sha256", "shards[0].sha256", "missing"),
])
def test_bad_manifest_is_a_clear_error(two_shard_dir, content, field, message):
    d, recs = two_shard_dir
    if content.startswith("PATCH:"):
        key, value = content[6:].split("=")
        m = json.loads((d / MANIFEST).read_text())
        m[key] = json.loads(value) if value.lstrip("-").isdigit() else value
        content = json.dumps(m)
    elif content.startswith("DROP:"):
        m = json.loads((d / MANIFEST).read_text())
        del m["shards"][0]["sha256"]
        content = json.dumps(m)
    (d / MANIFEST).write_text(content)
    with pytest.raises(ReplayError, match=message) as e:
        ReplayReader(d, strict=True)
    assert e.value.path == str(d / MANIFEST) and e.value.field == field
    assert str(d / MANIFEST) in str(e.value)
    with pytest.raises(ReplayError, match=message):
        read_manifest(d)
    # non-strict: the directory still trains; the damage is reported naming the manifest and the field
    with pytest.warns(UserWarning, match=message) as caught:
        reader = ReplayReader(d)
    assert any(p.path == str(d / MANIFEST) and p.field == field for p in reader.problems)
    if field is not None and field.startswith("shards[0]"):          # one bad entry: only that shard is lost
        assert len(reader.skipped) == 1 and 0 < len(reader) < len(recs)
    else:                                                           # top level damaged: rebuilt from the shards
        assert len(reader) == len(recs) and not reader.skipped
        assert all(r.meta == {} for r in reader.records)            # record meta is lost, and said so
        assert any("record meta lost" in str(w.message) for w in caught)
        for i, orig in enumerate(recs):
            assert torch.equal(reader[i].input_ids, orig.input_ids)


def test_empty_or_missing_dir_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayError, match="empty replay directory"):
        ReplayReader(tmp_path / "empty")
    with pytest.raises(ReplayError, match="does not exist"):
        ReplayReader(tmp_path / "nope")
    d = tmp_path / "r"
    write_replay(d, spec(), make_records(1))
    (d / MANIFEST).unlink()
    with pytest.raises(ReplayError, match=r"manifest.json.*missing, but the directory holds 1 shard"):
        ReplayReader(d)


def test_all_shards_bad_is_an_error_naming_them(two_shard_dir):
    d, _ = two_shard_dir
    for p in shard_paths(d):
        p.write_bytes(p.read_bytes()[:200])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ReplayError, match="no usable replay records") as e:
            ReplayReader(d)
    for p in shard_paths(d):
        assert p.name in str(e.value)


def test_writer_rejects_bad_records(tmp_path):
    w = ShardWriter(tmp_path / "r", spec())
    good = make_records(1)[0]
    S = len(good)
    bad_hidden = ReplayRecord(good.input_ids, torch.randn(S, K * (H + 1)), good.positions, good.loss_mask)
    with pytest.raises(ReplayError, match="features") as e:
        w.add(bad_hidden)
    assert e.value.field == "features" and f"[{S}, {K * H}]" in str(e.value)
    nan = good.features.clone()
    nan[3, 3] = float("nan")
    with pytest.raises(ReplayError, match="NaN"):
        w.add(ReplayRecord(good.input_ids, nan, good.positions, good.loss_mask))
    with pytest.raises(ReplayError, match="positions"):
        w.add(ReplayRecord(good.input_ids, good.features, good.positions[:1], good.loss_mask))
    with pytest.raises(ReplayError, match="meta"):
        w.add(ReplayRecord(good.input_ids, good.features, good.positions, good.loss_mask, meta={"x": object()}))
    assert w.flush() is None and not (tmp_path / "r" / MANIFEST).exists()


def test_corrupt_shard_is_skipped_and_the_rest_trains(tmp_path):
    """End to end: one corrupt shard among several; finetune warns, skips it, trains on the others."""
    from trainer.finetune import main
    from support.synthetic import synthetic_records, tiny_draft_config, write_tiny_target
    from trainer.target import target_identity

    target = write_tiny_target(tmp_path / "target", hidden_size=64, num_layers=4)
    cfg = tiny_draft_config(hidden_size=64, target_layer_ids=(1, 2))
    (tmp_path / "draft.json").write_text(json.dumps(cfg.to_dict()))
    d = tmp_path / "replay"
    write_replay(d, ReplaySpec(target_identity(target), (1, 2), 64, "float8_e4m3fn"),
                 synthetic_records(12, num_layers=2, hidden_size=64), max_shard_tokens=100)
    bad = shard_paths(d)[0]
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.warns(UserWarning, match=bad.name):
        result = main(["--replay", str(d), "--target-model-path", str(target), "--draft-config",
                       str(tmp_path / "draft.json"), "--output", str(tmp_path / "out"), "--max-steps", "3",
                       "--batch-size", "4", "--num-anchors", "4", "--no-progress"])
    assert result.steps == 3 and result.final_loss is not None and result.final_loss == result.final_loss
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["skipped_shards"] == [str(bad)]
    assert summary["replay_records"] == 12 - len(read_manifest(d)["shards"][0]["records"])
    assert bad.exists()                                           # reported, never deleted


# ---- hardened reader (issue 14) ---------------------------------------------------------------------------

def test_checksum_is_checked_before_parsing(two_shard_dir):
    d, _ = two_shard_dir
    bad = shard_paths(d)[0]
    data = bytearray(bad.read_bytes())
    data[8:40] = b"[" * 32                                         # header JSON broken, size unchanged
    bad.write_bytes(bytes(data))
    with pytest.raises(ReplayError, match="checksum") as e:
        ReplayReader(d, strict=True)
    assert e.value.field == "sha256"
    with pytest.raises(ReplayError, match="bad safetensors header JSON") as e:   # without the checksum: parsed
        ReplayReader(d, strict=True, verify_checksums=False)
    assert e.value.path == str(bad) and e.value.field == "header"


def test_shard_listed_twice_is_reported_and_read_once(two_shard_dir):
    d, recs = two_shard_dir
    m = json.loads((d / MANIFEST).read_text())
    m["shards"].append(m["shards"][0])
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ReplayError, match="listed twice") as e:
        ReplayReader(d, strict=True)
    assert e.value.field == f"shards[{len(m['shards']) - 1}].file"
    with pytest.warns(UserWarning, match="listed twice"):
        reader = ReplayReader(d)
    assert len(reader) == len(recs) and len(reader.problems) == 1


def test_non_finite_features_and_bad_fp8_scales(tmp_path):
    d = tmp_path / "bf16"
    write_replay(d, spec(), make_records(4, seed=20), max_shard_tokens=80)

    def nan(t, meta):
        t["features"][1, 2] = float("inf")

    bad = rewrite_shard(d, 0, nan)
    assert not ReplayReader(d).skipped                               # the finite check is opt-in in the reader
    with pytest.raises(ReplayError, match="NaN or Inf") as e:
        ReplayReader(d, strict=True, check_finite=True)
    assert e.value.path == str(bad) and e.value.field == "features"
    d8 = tmp_path / "fp8"
    write_replay(d8, spec("float8_e4m3fn"), make_records(4, seed=21), max_shard_tokens=80)
    for value in (float("nan"), float("inf"), 0.0, -2.0):
        def scale(t, meta, value=value):
            t["feature_scale"][0, 1] = value
        bad = rewrite_shard(d8, 1, scale)
        with pytest.raises(ReplayError, match="finite and > 0") as e:
            ReplayReader(d8, strict=True)                            # always checked for fp8
        assert e.value.path == str(bad) and e.value.field == "feature_scale"

    def nan_code(t, meta):
        t["feature_scale"] = t["feature_scale"].abs() + 1e-3
        codes = t["features"].view(torch.uint8).clone()
        codes[2, 7] = 0x7F
        t["features"] = codes.view(torch.float8_e4m3fn)

    bad = rewrite_shard(d8, 1, nan_code)
    with pytest.raises(ReplayError, match="fp8 NaN code") as e:
        ReplayReader(d8, strict=True)
    assert e.value.field == "features"


def test_short_or_overlapping_offsets_fail_validation_not_training(two_shard_dir):
    d, _ = two_shard_dir
    path = shard_paths(d)[0]
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    a, b = header["input_ids"]["data_offsets"]
    header["input_ids"]["data_offsets"] = [a, b - 4]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    new = len(raw).to_bytes(8, "little") + raw + blob[8 + n:]
    path.write_bytes(new)
    m = json.loads((d / MANIFEST).read_text())
    m["shards"][0].update(bytes=len(new), sha256=hashlib.sha256(new).hexdigest())
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ReplayError, match=r"hold \d+ bytes, shape .* needs") as e:
        ReplayReader(d, strict=True)
    assert e.value.path == str(path) and e.value.field == "input_ids"


def test_finetune_has_the_no_check_finite_flag():
    from trainer.finetune import build_parser
    base = ["--replay", "r", "--target-model-path", "t", "--draft-config", "c", "--output", "o"]
    assert build_parser().parse_args(base).no_check_finite is False
    assert build_parser().parse_args(base + ["--no-check-finite"]).no_check_finite is True
