"""Fuzz the replay reader: >= 500 seeded corruptions of shards, manifests and journals, targeted (every header,
manifest and journal field replaced by wrong types and junk, short/overlapping/huge offsets, NaN/Inf features,
fp8 NaN codes and bad scales, duplicate entries, truncation, extra bytes) and random (byte flips anywhere).

For every case: no exception but ReplayError (strict or not, checksums on or off); with checksums on, no
shard whose bytes changed is accepted; every accepted record reads back; no record is read twice; and the
directory is byte-identical afterwards (the reader deletes and modifies nothing)."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from trainer.replay import MANIFEST, ReplayError, ReplayReader, ReplayRecord, ReplaySpec, ShardWriter, write_replay
from trainer.target import TargetIdentity

K, H = 2, 8
TARGET = TargetIdentity("fuzz-target", "sha256:" + "ef" * 32)
Files = dict[str, bytes]

DEEP = "[" * 5000 + "]" * 5000
JUNK = [None, True, False, 0, -1, 1.5, float("nan"), 2 ** 70, "", "x", "BF16", [], [1], [-1, 2], ["a", "b"],
        [[0, 1]], [1.0, 2.0], {}, {"a": 1}, [None], "null", "[1, 2]", {"dtype": "F32"}]


def _records(n: int, seed: int) -> list[ReplayRecord]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        S = 3 + i % 3
        out.append(ReplayRecord(torch.randint(0, 1000, (S,), generator=g), torch.randn(S, K * H, generator=g),
                                torch.arange(S).repeat(3, 1), torch.rand(S, generator=g) > 0.5,
                                meta={"rid": f"r{seed}-{i}"}))
    return out


def _snapshot(d: Path) -> Files:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Files]:
    """Built once: bf16 and fp8 directories of 3 shards (compacted manifest), and one whose writer was killed
    (its shards listed only in its journal)."""
    root = tmp_path_factory.mktemp("fuzz-corpus")
    out = {}
    for dtype in ("bfloat16", "float8_e4m3fn"):
        d = root / dtype
        write_replay(d, ReplaySpec(TARGET, (1, 3), H, dtype), _records(9, seed=len(dtype)), max_shard_tokens=8)
        out[dtype] = _snapshot(d)
        assert len(_shards(out[dtype])) == 3
    d = root / "journal"
    w = ShardWriter(d, ReplaySpec(TARGET, (1, 3), H, "bfloat16"))
    for r in _records(3, seed=7):
        w.add(r)
        w.flush()
    os.close(w._journal_fd)                           # killed: the journal was never folded
    w._journal_fd = None
    out["journal"] = _snapshot(d)
    assert len([n for n in out["journal"] if n.startswith("journal-")]) == 1
    return out


# ---- corruption helpers ----------------------------------------------------------------------------------

def _shards(files: Files) -> list[str]:
    return sorted(n for n in files if n.startswith("shard-"))


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _relist(files: Files, name: str) -> None:
    """Keep the listing's bytes/sha256 of shard `name` in step with its new content (so only the mutated
    field is wrong, and the checksum cannot be what catches it)."""
    blob = files[name]
    for lname, raw in list(files.items()):
        if lname == MANIFEST:
            m = json.loads(raw)
            for s in m["shards"]:
                if s["file"] == name:
                    s["bytes"], s["sha256"] = len(blob), hashlib.sha256(blob).hexdigest()
            files[lname] = json.dumps(m).encode()
        elif lname.startswith("journal-"):
            lines = raw.decode().splitlines()
            for i, line in enumerate(lines):
                entry = json.loads(line)
                if entry["shard"]["file"] == name:
                    entry["shard"]["bytes"], entry["shard"]["sha256"] = len(blob), hashlib.sha256(blob).hexdigest()
                    lines[i] = json.dumps(entry)
            files[lname] = ("\n".join(lines) + "\n").encode()


def _tensors(blob: bytes, tmp: Path) -> tuple[dict, dict]:
    tmp.write_bytes(blob)
    with safe_open(str(tmp), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


@dataclass
class Case:
    name: str
    corpus: str
    mutate: object                                       # (files, rng, scratch) -> None


def _header_case(field_path: tuple, value):
    def mutate(files, rng, scratch):
        name = _shards(files)[rng.randrange(3)]
        header, data = _split(files[name])
        if not field_path:
            header = value
        else:
            node = header
            for key in field_path[:-1]:
                node = node[key]
            if node.get(field_path[-1], object()) == value and type(node.get(field_path[-1])) is type(value):
                value_ = [value]
            else:
                value_ = value
            node[field_path[-1]] = value_
        files[name] = _join(header, data)
        _relist(files, name)
    return mutate


def _offsets_case(kind: str):
    def mutate(files, rng, scratch):
        name = _shards(files)[rng.randrange(3)]
        header, data = _split(files[name])
        t = header["features"]
        a, b = t["data_offsets"]
        t["data_offsets"] = {"short": [a, b - 1], "long": [a, b + 1], "overlap": [max(0, a - 2), b - 2],
                             "huge": [a, 2 ** 63], "negative": [-2, b], "swapped": [b, a],
                             "shifted": [a + 1, b + 1], "zero": [0, 0], "floats": [float(a), float(b)],
                             "strings": [str(a), str(b)], "three": [a, b, b]}[kind]
        files[name] = _join(header, data)
        _relist(files, name)
    return mutate


def _value_case(kind: str):
    def mutate(files, rng, scratch):
        name = _shards(files)[rng.randrange(3)]
        tensors, meta = _tensors(files[name], scratch)
        T = tensors["input_ids"].shape[0]
        i, j = rng.randrange(T), rng.randrange(K * H)
        if kind in ("nan", "inf", "-inf"):
            if "feature_scale" in tensors:                  # fp8: the scale carries the bad value
                tensors["feature_scale"][i, j % K] = float(kind)
            else:
                tensors["features"][i, j] = float(kind)
        elif kind in ("fp8_nan_pos", "fp8_nan_neg"):
            codes = tensors["features"].view(torch.uint8).clone()
            codes[i, j] = 0x7F if kind == "fp8_nan_pos" else 0xFF
            tensors["features"] = codes.view(torch.float8_e4m3fn)
        elif kind in ("scale_zero", "scale_negative", "scale_huge"):
            tensors["feature_scale"][i, j % K] = {"scale_zero": 0.0, "scale_negative": -1.0,
                                                  "scale_huge": 3e38}[kind]
        elif kind == "extra_tensor":
            tensors["feature_scale" if "feature_scale" not in tensors else "extra"] = torch.ones(T, K)
        elif kind == "missing_tensor":
            del tensors[sorted(tensors)[rng.randrange(len(tensors))]]
        elif kind == "int64_ids":
            tensors["input_ids"] = tensors["input_ids"].long()
        files[name] = save(tensors, metadata=meta)
        _relist(files, name)
    return mutate


def _manifest_case(path: tuple, value, op: str = "set"):
    def mutate(files, rng, scratch):
        m = json.loads(files[MANIFEST])
        node = m
        for key in path[:-1]:
            node = node[key]
        if op == "set":
            node[path[-1]] = value
        elif op == "del":
            del node[path[-1]]
        files[MANIFEST] = json.dumps(m).encode()
    return mutate


def _raw_manifest(text_fn):
    def mutate(files, rng, scratch):
        files[MANIFEST] = text_fn(files[MANIFEST])
    return mutate


def _duplicate(where: str):
    def mutate(files, rng, scratch):
        m = json.loads(files[MANIFEST])
        if where == "manifest":
            m["shards"].append(copy.deepcopy(m["shards"][rng.randrange(len(m["shards"]))]))
            files[MANIFEST] = json.dumps(m).encode()
        else:                                            # a journal line repeating a manifest entry
            line = {"op": "add", "created": 1.0, "shard": m["shards"][0]}
            files["journal-dup.jsonl"] = (json.dumps(line) + "\n").encode()
    return mutate


def _shard_bytes(kind: str):
    def mutate(files, rng, scratch):
        name = _shards(files)[rng.randrange(3)]
        blob = files[name]
        if kind == "truncate":
            files[name] = blob[:rng.randrange(len(blob))]
        elif kind == "truncate_relisted":
            files[name] = blob[:rng.randrange(len(blob))]
            _relist(files, name)
        elif kind == "extra":
            files[name] = blob + bytes(rng.randrange(1, 64))
        elif kind == "extra_relisted":
            files[name] = blob + bytes(rng.randrange(1, 64))
            _relist(files, name)
        elif kind == "header_len":
            files[name] = struct.pack("<Q", rng.choice([0, 1, 2 ** 63, 2 ** 64 - 1, len(blob)])) + blob[8:]
            _relist(files, name)
        elif kind == "empty":
            files[name] = b""
            _relist(files, name)
    return mutate


def _journal_case(kind: str):
    def mutate(files, rng, scratch):
        jname = next(n for n in files if n.startswith("journal-"))
        lines = files[jname].splitlines(keepends=True)
        i = rng.randrange(len(lines))
        if kind == "torn":
            files[jname] = b"".join(lines[:-1]) + lines[-1][:rng.randrange(1, len(lines[-1]) - 1)]
        elif kind == "junk_line":
            lines[i] = json.dumps(rng.choice(JUNK)).encode() + b"\n"
            files[jname] = b"".join(lines)
        elif kind == "deep":
            lines[i] = DEEP.encode() + b"\n"
            files[jname] = b"".join(lines)
        elif kind.startswith("field:"):
            entry = json.loads(lines[i])
            key = kind[6:]
            node, last = (entry["shard"], key[6:]) if key.startswith("shard.") else (entry, key)
            node[last] = rng.choice([v for v in JUNK if v != node.get(last)])
            lines[i] = json.dumps(entry).encode() + b"\n"
            files[jname] = b"".join(lines)
        elif kind == "remove_line":
            fname = json.loads(lines[i])["shard"]["file"]
            files[jname] = b"".join(lines) + json.dumps({"op": "remove", "file": fname}).encode() + b"\n"
    return mutate


def _flip(target: str):
    def mutate(files, rng, scratch):
        names = {"shard": _shards(files), "manifest": [MANIFEST],
                 "journal": [n for n in files if n.startswith("journal-")],
                 "any": sorted(n for n in files if n != "manifest.lock")}[target]
        name = rng.choice(names)
        data = bytearray(files[name])
        if not data:
            return
        for _ in range(rng.choice([1, 1, 2, 3])):
            pos = rng.randrange(min(len(data), 512)) if rng.random() < 0.5 else rng.randrange(len(data))
            data[pos] ^= rng.randrange(1, 256)
        files[name] = bytes(data)
    return mutate


def cases() -> list[Case]:
    out: list[Case] = []
    for corpus in ("bfloat16", "float8_e4m3fn"):
        tensors = ["input_ids", "features", "positions", "loss_mask"] + (["feature_scale"] if corpus != "bfloat16"
                                                                         else [])
        out += [Case(f"header={v!r:.20}", corpus, _header_case((), v)) for v in JUNK + [DEEP]]
        for t in tensors:
            out += [Case(f"{t}={v!r:.20}", corpus, _header_case((t,), v)) for v in JUNK[::4]]
            for fld in ("dtype", "shape", "data_offsets"):
                out += [Case(f"{t}.{fld}={v!r:.20}", corpus, _header_case((t, fld), v))
                        for v in JUNK[(len(t) + len(fld)) % 2::2]]
        out += [Case(f"__metadata__={v!r:.20}", corpus, _header_case(("__metadata__",), v)) for v in JUNK]
        for key in ("format", "schema_version", "target", "layer_ids", "hidden_size", "storage_dtype", "records"):
            for v in ["{bad json", DEEP, "null", '{"a": 1}', "7", None]:
                out.append(Case(f"meta.{key}={v!r:.20}", corpus, _header_case(("__metadata__", key), v)))
        out += [Case(f"offsets:{k}", corpus, _offsets_case(k)) for k in
                ("short", "long", "overlap", "huge", "negative", "swapped", "shifted", "zero", "floats", "strings",
                 "three")]
        kinds = ["nan", "inf", "-inf", "extra_tensor", "missing_tensor", "int64_ids"]
        if corpus != "bfloat16":
            kinds += ["fp8_nan_pos", "fp8_nan_neg", "scale_zero", "scale_negative", "scale_huge"]
        out += [Case(f"value:{k}", corpus, _value_case(k)) for k in kinds for _ in range(2)]
        out += [Case(f"bytes:{k}", corpus, _shard_bytes(k)) for k in
                ("truncate", "truncate_relisted", "extra", "extra_relisted", "header_len", "empty") for _ in range(2)]
        top = ("format", "schema_version", "target", "layer_ids", "hidden_size", "storage_dtype", "shards",
               "journals")
        out += [Case(f"manifest.{k}={v!r:.20}", corpus, _manifest_case((k,), v)) for k in top for v in JUNK[::4]]
        out += [Case(f"manifest.del.{k}", corpus, _manifest_case((k,), None, "del")) for k in top]
        for k in ("file", "bytes", "sha256", "num_tokens", "records"):
            out += [Case(f"manifest.shards[1].{k}={v!r:.20}", corpus, _manifest_case(("shards", 1, k), v))
                    for v in JUNK[::3] + ["../x", ".hidden"]]
        for k in ("offset", "length", "meta"):
            out += [Case(f"manifest.records.{k}={v!r:.20}", corpus, _manifest_case(("shards", 0, "records", 0, k),
                                                                                    v)) for v in JUNK[::3]]
        out += [Case("manifest.target.model=1", corpus, _manifest_case(("target", "model"), 1)),
                Case("manifest.shards[0]=junk", corpus, _manifest_case(("shards", 0), [1, 2])),
                Case("manifest.deep", corpus, _raw_manifest(lambda b: DEEP.encode())),
                Case("manifest.deep_value", corpus, _raw_manifest(lambda b: b[:-2] + b', "x": ' + DEEP.encode()
                                                                  + b"}")),
                Case("manifest.truncated", corpus, _raw_manifest(lambda b: b[: len(b) // 2])),
                Case("manifest.extra", corpus, _raw_manifest(lambda b: b + b"garbage")),
                Case("manifest.empty", corpus, _raw_manifest(lambda b: b"")),
                Case("manifest.binary", corpus, _raw_manifest(lambda b: b"\xff\xfe" + b)),
                Case("dup.manifest", corpus, _duplicate("manifest")),
                Case("dup.journal", corpus, _duplicate("journal"))]
    for kind in ["torn", "junk_line", "deep", "remove_line"] + [f"field:{k}" for k in
                                                                ("op", "created", "shard", "shard.file",
                                                                 "shard.bytes", "shard.sha256", "shard.num_tokens",
                                                                 "shard.records")]:
        out += [Case(f"journal:{kind}", "journal", _journal_case(kind)) for _ in range(3)]
    for corpus in ("bfloat16", "float8_e4m3fn", "journal"):
        for target in ("shard", "manifest", "journal", "any"):
            if target == "journal" and corpus != "journal":
                continue
            out += [Case(f"flip:{target}", corpus, _flip(target)) for _ in range(20)]
    return out


CASES = cases()


def _read_all(reader: ReplayReader) -> None:
    for i in range(len(reader)):
        rec = reader[i]
        assert rec.features.shape == (len(rec), K * H)


def _open(d: Path, **kwargs) -> ReplayReader | ReplayError:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ReplayReader(d, **kwargs)
        except ReplayError as e:
            return e


def test_fuzz_corpus_is_big_enough():
    assert len(CASES) >= 500, len(CASES)


def test_replay_reader_fuzz(corpora, tmp_path):
    crashes, silent, changed_dirs, double_reads = [], [], [], []
    applied = 0
    scratch = tmp_path / "scratch.safetensors"
    for n, case in enumerate(CASES):
        rng = random.Random(1000 + n)
        original = corpora[case.corpus]
        files = dict(original)
        case.mutate(files, rng, scratch)
        applied += files != original
        d = tmp_path / f"case{n}"
        d.mkdir()
        for name, blob in files.items():
            (d / name).write_bytes(blob)
        before = _snapshot(d)
        runs = [{"check_finite": True}, {"verify_checksums": False}]
        if n % 3 == 0:
            runs.append({"check_finite": True, "strict": True})
        for kwargs in runs:
            try:
                got = _open(d, **kwargs)
                if isinstance(got, ReplayReader):
                    _read_all(got)
            except Exception as e:                      # anything but ReplayError escaping is a crash
                crashes.append(f"{case.name} {kwargs}: {type(e).__name__}: {e}"[:300])
                continue
            if isinstance(got, ReplayReader) and kwargs.get("verify_checksums", True):
                accepted = {ref.shard.name for ref in got.records}
                bad = sorted(s for s in accepted if files.get(s) != original.get(s))
                if bad:
                    silent.append(f"{case.name} {kwargs}: accepted changed shard(s) {bad}")
            if isinstance(got, ReplayReader):
                refs = [(r.shard, r.offset) for r in got.records]
                if len(refs) != len(set(refs)):
                    double_reads.append(case.name)
        if _snapshot(d) != before:
            changed_dirs.append(case.name)
    assert applied >= 500, applied                     # really corrupted directories
    assert not crashes, f"{len(crashes)} crashes:\n" + "\n".join(crashes[:20])
    assert not silent, f"{len(silent)} silent accepts:\n" + "\n".join(silent[:20])
    assert not double_reads, double_reads[:20]
    assert not changed_dirs, changed_dirs[:20]


def test_targeted_cases_are_reported_not_accepted(corpora, tmp_path):
    """Every targeted shard corruption that changes a shard is skipped and named (not just survived)."""
    scratch = tmp_path / "scratch.safetensors"
    for n, case in enumerate(c for c in CASES if c.name.startswith(("offsets:", "value:", "bytes:"))):
        files = dict(corpora[case.corpus])
        case.mutate(files, random.Random(n), scratch)
        d = tmp_path / f"t{n}"
        d.mkdir()
        for name, blob in files.items():
            (d / name).write_bytes(blob)
        changed = [s for s in _shards(files) if files[s] != corpora[case.corpus].get(s)]
        got = _open(d, check_finite=True, verify_checksums=False)      # structure and values alone
        assert isinstance(got, ReplayReader), (case.name, got)
        assert sorted(p.path.name for p in got.skipped) == changed, (case.name, got.skipped)


def test_record_check_never_crashes():
    good = _records(1, seed=1)[0]
    junk = [None, 3, "x", [1, 2], torch.zeros(0), torch.zeros(2, 2, 2), torch.tensor(float("nan"))]
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    for field_name in ("input_ids", "features", "positions", "loss_mask", "meta"):
        for value in junk + ([{"x": object()}, {"deep": deep}]
                             if field_name == "meta" else []):
            rec = copy.copy(good)
            setattr(rec, field_name, value)
            with pytest.raises(ReplayError) as e:
                rec.check(K, H)
            assert e.value.field is not None
