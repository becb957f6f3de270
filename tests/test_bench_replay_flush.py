"""benchmarks/bench_replay_flush.py at a tiny size: both flush paths run on a faked listing, every flushed shard
ends up listed (the benchmark checks it), and the JSON / Markdown results are written."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_replay_flush  # noqa: E402


def test_bench_replay_flush_tiny(tmp_path):
    r = bench_replay_flush.run(sizes=(5, 200), repeats=3, old_max=200, old_repeats=2, reader_shards=5,
                               work=tmp_path)
    assert [row["listed_shards"] for row in r["rows"]] == [5, 200]
    assert all(row["new_flush_ms"] > 0 and row["old_flush_ms"] > 0 for row in r["rows"])
    assert r["reader_open_ms"] > 0 and "| 200 |" in bench_replay_flush.report(r)
    out = tmp_path / "out"
    assert bench_replay_flush.main(["--sizes", "5", "--repeats", "2", "--old-repeats", "1", "--reader-shards", "0",
                                    "--work", str(tmp_path), "--out", str(out)]) == 0
    assert json.loads((out / "replay_flush.json").read_text())["rows"][0]["listed_shards"] == 5
    assert (out / "replay_flush.md").read_text().startswith("bench_replay_flush")
