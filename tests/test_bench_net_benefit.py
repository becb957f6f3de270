"""benchmarks/bench_net_benefit.py's figures from served turns: windows and phase summaries count each turn once
and time each span from the completion of the turn before it (no server here; the benchmark serves real SGLang)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_net_benefit as nb  # noqa: E402


def turns():
    # phase 0: 4 turns of 10 tokens done at 1..4 s, accept 1; phase 1: 4 turns of 20 tokens done at 6..9 s, accept 2
    return ([{"phase": 0, "t_done": float(t), "accept": 1.0, "tokens": 10, "turn": 0} for t in (1, 2, 3, 4)]
            + [{"phase": 1, "t_done": float(t), "accept": 2.0 + (t == 9), "tokens": 20, "turn": 0}
               for t in (6, 7, 8, 9)])


def test_windows_split_at_the_phase_boundary_and_time_from_the_previous_window():
    ws = nb.windows(turns(), 3)
    assert [(w["phase"], w["turns"]) for w in ws] == [(0, 3), (0, 1), (1, 3), (1, 1)]
    assert ws[0]["tok_s"] == pytest.approx(30 / 3) and ws[1]["tok_s"] == pytest.approx(10 / 1)
    assert ws[2]["tok_s"] == pytest.approx(60 / 4)            # from 4 s (the last turn of phase 0) to 8 s
    assert ws[3]["tau"] == 3.0


def test_phase_and_second_half_summaries():
    ts = turns()
    assert nb.summarize(ts, 0) == {"tau": 1.0, "tok_s": pytest.approx(40 / 4), "turns": 4}
    assert nb.summarize(ts, 1) == {"tau": 2.25, "tok_s": pytest.approx(80 / 5), "turns": 4}
    assert nb.summarize(ts, 1, second_half=True) == {"tau": 2.5, "tok_s": pytest.approx(40 / 2), "turns": 2}
