"""The server launcher's startup-hang handling: a start that neither exits nor gets ready is diagnosed (each
process's Python stacks) and retried once; the report reaches the end of the test session's output."""
import shutil
import subprocess
import sys
import time

import pytest

from sglang_ext import launcher


def test_process_stacks_names_what_each_thread_runs():
    code = ("import threading, time\n"
            "def stuck_in_warmup():\n    time.sleep(60)\n"
            "threading.Thread(target=stuck_in_warmup, daemon=True).start()\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1.0)
        report = launcher.process_stacks(child.pid)
    finally:
        child.kill()
        child.wait()
    assert f"=== pid {child.pid}" in report and "state=" in report
    if shutil.which("py-spy"):
        assert "stuck_in_warmup" in report, report
    else:
        assert "py-spy not on PATH" in report


def test_a_hung_start_is_retried_once_and_reported(tmp_path, monkeypatch):
    calls = []

    def start(self):
        calls.append(1)
        if len(calls) == 1:
            raise launcher.StartupHang("hung", "hang report 1", tmp_path / "r.hang.txt")
        return "server"

    monkeypatch.setattr(launcher.launch_server, "_start", start)
    monkeypatch.setattr(launcher, "STARTUP_HANGS", [])
    assert launcher.launch_server(tmp_path, log_dir=tmp_path).__enter__() == "server"
    assert len(calls) == 2 and launcher.STARTUP_HANGS == ["hang report 1"]

    calls.clear()

    def always_hangs(self):
        calls.append(1)
        raise launcher.StartupHang("hung", "again", tmp_path / "r.hang.txt")

    monkeypatch.setattr(launcher.launch_server, "_start", always_hangs)
    with pytest.raises(launcher.StartupHang):
        launcher.launch_server(tmp_path, log_dir=tmp_path, hang_retries=1).__enter__()
    assert len(calls) == 2                      # no third try


def test_a_crash_at_startup_is_not_retried(tmp_path, monkeypatch):
    calls = []

    def start(self):
        calls.append(1)
        raise launcher.ServerError("exited with code 1 during startup")

    monkeypatch.setattr(launcher.launch_server, "_start", start)
    with pytest.raises(launcher.ServerError, match="exited"):
        launcher.launch_server(tmp_path, log_dir=tmp_path).__enter__()
    assert calls == [1]
