"""Cost of one replay flush (trainer/replay.py ShardWriter.flush) against the number of shards already listed.

    python benchmarks/bench_replay_flush.py                          # 10, 1k, 10k, 100k listed shards
    python benchmarks/bench_replay_flush.py --sizes 10 1000 --old-max 1000 --repeats 5

The existing listing is faked cheaply: a manifest.json listing N entries (1 record of 16 tokens each, as the
online buffer writes them) and N empty `shard-*.safetensors` files (the old path globbed them). Each timed
flush writes one real small shard (16 tokens, 2 layers x H=64, bf16: about 5 KB).

    new   today: shard written atomically (fsync + rename + fsync dir), then one fsync'd line appended to the
          writer's journal under manifest.lock; no glob, no manifest read or rewrite: O(1) in N
    old   the previous flush, reproduced here: glob all shards for the next index, read and validate the whole
          manifest, append, rewrite it atomically (indent=1): O(N); timed only up to --old-max listed shards

Also timed: reading the listing (read_manifest: manifest.json + journals merged and validated) at each N, and
opening a ReplayReader (every shard validated: sha256, header, safe_open) over --reader-shards real shards.
Flushes are interleaved across sizes (fsync latency on a shared machine drifts; each size sees the same drift).
Reported: median ms per flush over --repeats. Acceptance (issue 14): new flush at 100k listed shards within
2x of the cost at 10. Writes <out>/replay_flush.json, .md and, with matplotlib, .png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from trainer import replay  # noqa: E402
from trainer.fsutil import atomic_write_bytes  # noqa: E402
from trainer.target import TargetIdentity  # noqa: E402

K, H, TOKENS = 2, 64, 16
SPEC = replay.ReplaySpec(TargetIdentity("bench-target", "sha256:" + "00" * 32), (1, 3), H, "bfloat16")


def record(seed: int) -> replay.ReplayRecord:
    g = torch.Generator().manual_seed(seed)
    return replay.ReplayRecord(torch.randint(0, 1000, (TOKENS,), generator=g), torch.randn(TOKENS, K * H, generator=g),
                               torch.arange(TOKENS).repeat(3, 1), torch.ones(TOKENS, dtype=torch.bool),
                               meta={"rid": f"bench-{seed}", "seq": seed})


def fake_listing(d: Path, n: int) -> None:
    """A directory that lists n shards (entries + empty files), as a compacted manifest."""
    d.mkdir(mode=0o700, parents=True)
    entries = []
    for i in range(n):
        name = f"shard-{i:019d}-fake.safetensors"
        (d / name).touch()
        entries.append({"file": name, "bytes": 5000, "sha256": "0" * 64, "num_tokens": TOKENS,
                        "records": [{"offset": 0, "length": TOKENS, "meta": {"rid": f"old-{i}", "seq": i}}]})
    manifest = {**SPEC.manifest_header(), "shards": entries, "journals": {}}
    (d / replay.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def old_flush(d: Path, rec: replay.ReplayRecord) -> None:
    """The previous ShardWriter.flush: glob for the index, then read, validate and rewrite the whole manifest."""
    w = replay.ShardWriter.__new__(replay.ShardWriter)
    w.spec, w.share_prefixes = SPEC, False
    tensors, entries = w._pack([rec])
    from safetensors.torch import save
    header = {k: json.dumps(v) for k, v in SPEC.header().items()}
    header["records"] = json.dumps([replay._header_record(e) for e in entries])
    blob = save(tensors, metadata=header)
    index = sum(1 for _ in d.glob("shard-*.safetensors"))
    name = f"shard-{index:06d}-{os.urandom(4).hex()}.safetensors"
    atomic_write_bytes(d / name, blob, mode=0o600)
    shard = {"file": name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
             "num_tokens": TOKENS, "records": entries}
    with replay._exclusive_lock(d):
        path = d / replay.MANIFEST
        m = json.loads(path.read_text())
        replay._check_manifest_header(m, path)
        for i, s in enumerate(m["shards"]):
            replay._check_entry(s, path, f"shards[{i}].")
        m["shards"].append(shard)
        atomic_write_bytes(path, (json.dumps(m, indent=1) + "\n").encode(), mode=0o600)


def time_ms(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def reader_open_ms(root: Path, n: int) -> float:
    """ReplayReader over n real (identical content, distinct names) shards: validation of every shard."""
    d = root / f"reader-{n}"
    d.mkdir()
    with replay.ShardWriter(d, SPEC) as w:
        w.add(record(0))
        first = w.flush()
    blob = first.read_bytes()
    m = replay.read_manifest(d)
    entry = m["shards"][0]
    shards = []
    for i in range(n):
        name = f"shard-{i:019d}-copy.safetensors"
        (d / name).write_bytes(blob)
        shards.append({**entry, "file": name})
    m["shards"] = shards
    first.unlink()
    (d / replay.MANIFEST).write_text(json.dumps(m))
    t0 = time.perf_counter()
    reader = replay.ReplayReader(d)
    ms = (time.perf_counter() - t0) * 1e3
    assert len(reader) == n
    shutil.rmtree(d)
    return ms


def run(sizes=(10, 1000, 10000, 100000), repeats: int = 30, old_max: int = 100000, old_repeats: int = 3,
        reader_shards: int = 10000, work: Path | None = None) -> dict:
    """All listings are set up first; then the flushes are interleaved across sizes (one per size per round),
    so disk noise (fsync latency varies with whatever else the machine writes) hits every size alike."""
    root = Path(tempfile.mkdtemp(prefix="bench-replay-flush-", dir=work))
    rows = []
    try:
        dirs, writers, listing_ms, setup_s = {}, {}, {}, {}
        for n in sizes:
            d = dirs[n] = root / f"n{n}"
            t0 = time.perf_counter()
            fake_listing(d, n)
            setup_s[n] = time.perf_counter() - t0
            t0 = time.perf_counter()
            assert len(replay.read_manifest(d)["shards"]) == n
            listing_ms[n] = (time.perf_counter() - t0) * 1e3
            writers[n] = replay.ShardWriter(d, SPEC, max_shard_tokens=1 << 62)
            writers[n].add(record(0))
            writers[n].flush()                                      # warm-up (journal created)
            print(f"{n:>7} listed: set up in {setup_s[n]:.1f} s, listing read {listing_ms[n]:.1f} ms", flush=True)
        os.sync()                                                   # the set-up's writes are not a flush's cost
        new_ms = {n: [] for n in sizes}
        old_ms = {n: [] for n in sizes if n <= old_max}
        seed = 1
        for r in range(max(repeats, old_repeats)):
            for n in sizes:
                seed += 1
                if r < repeats:
                    rec = record(seed)
                    t0 = time.perf_counter()
                    writers[n].add(rec)
                    writers[n].flush()
                    new_ms[n].append((time.perf_counter() - t0) * 1e3)
                if n in old_ms and r < old_repeats:
                    rec = record(seed + 10 ** 6)
                    t0 = time.perf_counter()
                    old_flush(dirs[n], rec)
                    old_ms[n].append((time.perf_counter() - t0) * 1e3)
        for n in sizes:
            writers[n].close()
            listed_after = len(replay.read_manifest(dirs[n])["shards"])
            assert listed_after == n + 1 + repeats + len(old_ms.get(n, [])), listed_after
            ms = sorted(new_ms[n])
            rows.append({"listed_shards": n, "new_flush_ms": statistics.median(ms),
                         "new_flush_p90_ms": ms[int(0.9 * (len(ms) - 1))],
                         "old_flush_ms": statistics.median(old_ms[n]) if old_ms.get(n) else None,
                         "listing_read_ms": listing_ms[n], "setup_s": round(setup_s[n], 2)})
            print(f"{n:>7} listed: new flush {rows[-1]['new_flush_ms']:.2f} ms, old "
                  f"{'-' if not old_ms.get(n) else format(rows[-1]['old_flush_ms'], '.1f')} ms", flush=True)
            shutil.rmtree(dirs[n])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader_ms = reader_open_ms(root, reader_shards) if reader_shards else None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base, top = rows[0]["new_flush_ms"], rows[-1]["new_flush_ms"]
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "python": platform.python_version(),
            "filesystem_dir": str(work or tempfile.gettempdir()), "shard_tokens": TOKENS, "hidden": H, "layers": K,
            "repeats": repeats, "old_repeats": old_repeats, "rows": rows,
            "ratio_largest_to_smallest": top / base, "acceptance_within_2x": top <= 2 * base,
            "reader_open_shards": reader_shards, "reader_open_ms": reader_ms}


def report(r: dict) -> str:
    f = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    lines = [f"bench_replay_flush: {r['machine']}, Python {r['python']}; one shard of {r['shard_tokens']} tokens "
             f"({r['layers']} layers x H={r['hidden']}, bf16) per flush; median of {r['repeats']} (old: "
             f"{r['old_repeats']}); directory under {r['filesystem_dir']}",
             "",
             "| listed shards | new flush, ms (median) | new flush, ms (p90) | old flush, ms (median) | "
             "listing read (read_manifest), ms |",
             "| --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        lines.append(f"| {row['listed_shards']:,} | {f(row['new_flush_ms'])} | {f(row['new_flush_p90_ms'])} | "
                     f"{f(row['old_flush_ms'], 1)} | {f(row['listing_read_ms'], 1)} |")
    lines += ["", f"new flush at {r['rows'][-1]['listed_shards']:,} listed shards / at "
                  f"{r['rows'][0]['listed_shards']:,}: {r['ratio_largest_to_smallest']:.2f}x "
                  f"({'within' if r['acceptance_within_2x'] else 'NOT within'} 2x)"]
    if r["reader_open_ms"] is not None:
        lines.append(f"ReplayReader over {r['reader_open_shards']:,} real shards (sha256 + header + safe_open each): "
                     f"{r['reader_open_ms']:.0f} ms ({r['reader_open_ms'] / r['reader_open_shards']:.2f} ms/shard)")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = [row["listed_shards"] for row in r["rows"]]
    ax.plot(xs, [row["new_flush_ms"] for row in r["rows"]], "o-", label="new: journal append (O(1))")
    old = [(row["listed_shards"], row["old_flush_ms"]) for row in r["rows"] if row["old_flush_ms"] is not None]
    if old:
        ax.plot(*zip(*old), "s--", label="old: glob + manifest rewrite (O(N))")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("shards already listed")
    ax.set_ylabel("ms per flush (median)")
    ax.set_title(f"replay flush cost, {r['machine']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return f"wrote {path}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000, 100000],
                    help="numbers of already listed shards (default 10 1000 10000 100000)")
    ap.add_argument("--repeats", type=int, default=30, help="timed flushes per size, new path (default 30)")
    ap.add_argument("--old-max", type=int, default=100000, help="time the old path up to this many listed shards")
    ap.add_argument("--old-repeats", type=int, default=3, help="timed flushes per size, old path (default 3)")
    ap.add_argument("--reader-shards", type=int, default=10000,
                    help="real shards for the ReplayReader open timing (0: skip; default 10000)")
    ap.add_argument("--work", type=Path, default=None, help="where the scratch directories go (default: $TMPDIR)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results", help="JSON / MD / PNG directory")
    args = ap.parse_args(argv)
    r = run(tuple(args.sizes), args.repeats, args.old_max, args.old_repeats, args.reader_shards, args.work)
    text = report(r)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replay_flush.json").write_text(json.dumps(r, indent=1) + "\n")
    (args.out / "replay_flush.md").write_text(text + "\n")
    print(f"wrote {args.out / 'replay_flush.json'}, {args.out / 'replay_flush.md'}")
    print(plot(r, args.out / "replay_flush.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
