"""benchmarks/soak_online_train.py's RSS figures and its --report mode, on synthetic samples (the soak itself needs
a real server for 30+ minutes and is not run in CI): the slope, the window means and the table are computed from
the samples alone, so a saved run can be re-reported."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import soak_online_train as soak  # noqa: E402


def samples(minutes: int, server_mb, step_s: float = 10.0) -> list[dict]:
    """One sample every step_s seconds; server_mb(t_seconds) gives the server RSS."""
    out = []
    t = step_s
    while t <= minutes * 60 + 1e-9:
        out.append({"t": t, "rss": {"server": server_mb(t), "trainer": 800.0,
                                    "by_process": {"sglang::scheduler": server_mb(t) - 2000.0},
                                    "scheduler_regions": {"thread_arenas": 100.0}}})
        t += step_s
    return out


def test_ramp_then_flat():
    # 60 MB/hour for 30 minutes, then flat at 4030 MB
    s = samples(90, lambda t: 4000.0 + 60.0 * min(t, 1800.0) / 3600.0)
    r = soak.rss_summary(s, minutes=90, warmup_min=5)
    assert r["rss_slope_second_half_mb_per_hour"] == pytest.approx(0.0, abs=1e-9)
    assert r["rss_slope_mb_per_hour"]["server"] > 10.0                  # the ramp after 5 min counts
    assert r["rss_server_window_min"] == 10.0                            # 10-minute windows for runs of an hour+
    means = r["rss_server_window_means"]
    assert [m for m, _ in means] == pytest.approx([5, 15, 25, 35, 45, 55, 65, 75])   # full windows only
    assert means[0][1] < means[1][1] < means[2][1] < 4030.0
    assert all(v == pytest.approx(4030.0) for _, v in means[3:])
    assert r["rss_server_after_warmup"][2] == pytest.approx(4030.0)
    assert dict(r["rss_growth_by_process"])["sglang::scheduler"] == pytest.approx(30.0 - 60.0 * 300 / 3600, abs=0.2)


def test_short_runs_use_five_minute_windows():
    r = soak.rss_summary(samples(30, lambda t: 4000.0 + 120.0 * t / 3600.0), minutes=30, warmup_min=5)
    assert r["rss_server_window_min"] == 5.0
    assert len(r["rss_server_window_means"]) == 5
    assert r["rss_slope_mb_per_hour"]["server"] == pytest.approx(120.0)


def test_report_recomputes_a_saved_run(tmp_path):
    s = samples(40, lambda t: 4100.0 + (t % 60) / 10.0)                # a saw-tooth, flat on average
    saved = {"machine": "test", "date": "2026-12-03",
             "settings": {"minutes": 40.0, "warmup_min": 5.0, "persist_max_bytes": "2MB", "replay_budget": "64MB"},
             "samples": s, "kills": [{"t": 240.0, "killed": 1}],
             "final": {"recorded": 101.0, "persisted": 101.0, "persist_lost": 0.0, "pruned_shards": 3.0,
                       "restarts": 1.0, "swaps": 2.0, "version": 3.0, "steps": 10.0, "replay_bytes": 2.0 ** 20},
             "traffic": {"sent": 110, "finished": 100, "aborted": 10, "finished_image": 20, "errors": 0},
             "log": {"error_lines": 0, "tracebacks": 0}, "server_alive_at_end": True,
             "persist_dir_bytes": 1000, "tau": 2.5}
    src = tmp_path / "saved.json"
    src.write_text(json.dumps(saved))
    out = tmp_path / "report"
    assert soak.main(["--report", str(src), "--out", str(out)]) == 0
    result = json.loads((out / "soak_online_train.json").read_text())
    assert abs(result["rss_slope_mb_per_hour"]["server"]) < 1.0
    assert len(result["rss_server_window_means"]) == 7
    md = (out / "soak_online_train.md").read_text()
    assert md.startswith("# --online-train soak (2026-12-03)")
    assert "| server RSS, 5-minute means after warm-up (MB) | 4102, 4102" in md
    assert "| records made / expected (finished requests) | 101 / 100 |" in md

    saved["traffic"]["errors"] = 1                                       # the verdict still fails a bad run
    src.write_text(json.dumps(saved))
    assert soak.main(["--report", str(src), "--out", str(out)]) == 1
