"""benchmarks/bench_swap.py at a tiny size: both swap paths run on the real weight slot and the staged path
writes exactly the slot's values (the benchmark checks it) into the same parameter storage."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_swap  # noqa: E402


def test_bench_swap_tiny(tmp_path):
    r = bench_swap.run(params=2e6, layers=2, dtype="bfloat16", device="cpu", repeats=2)
    assert r["params"] > 1e6 and r["old_stall_ms"] > 0 and r["staged_stall_ms"] > 0 and r["staging_ms"] > 0
    assert "staged: bfloat16 slot, device-to-device copy" in bench_swap.report(r)
    assert bench_swap.main(["--params", "2e6", "--layers", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "swap.json").is_file()
